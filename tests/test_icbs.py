"""iCBS (weightsmith/prune/icbs.py): the block solver against exhaustive enumeration, exact per-row
density and N:M patterns, the layer error below SparseGPT's and Wanda's (synthetic and real SmolLM2
layers with their real inputs), an earlier mask and dead inputs, the quality knob, and the recipe
through the engine, CLI flags and YAML."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import calib_ids
from test_quant_math import correlated_layer

import weightsmith
from weightsmith.config import build_config
from weightsmith.export.common import QuantizedCheckpoint
from weightsmith.prune.common import mask_from_scores
from weightsmith.prune.icbs import icbs, lstsq_rows, solve_block
from weightsmith.prune.sparsegpt import sparsegpt
from weightsmith.quant.pipeline import output_error, run_group
from weightsmith.quant.registry import LayerStats

L0 = "model.layers.0."


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(64, n=2048)


def test_block_solver_finds_the_enumerated_optimum():
    """Random 10-variable QUBOs with 4 pruned: annealing + greedy swaps vs all C(10, 4) = 210 choices."""
    g = torch.Generator().manual_seed(0)
    R, b, k = 32, 10, 4
    M = torch.randn(R, b, b, generator=g)
    Q = M @ M.transpose(1, 2) / b
    c = torch.randn(R, b, generator=g)
    x0 = torch.zeros(R, b)
    x0[:, :k] = 1
    free = torch.ones(R, b, dtype=torch.bool)
    x = solve_block(Q, c, x0, free, None, 8, torch.Generator().manual_seed(1))
    assert torch.all(x.sum(1) == k)
    E = lambda z: torch.einsum("ri,rij,rj->r", z, Q, z) + 2 * (c * z).sum(1)  # noqa: E731
    best = torch.full((R,), float("inf"))
    for comb in itertools.combinations(range(b), k):
        z = torch.zeros(R, b)
        z[:, list(comb)] = 1
        best = torch.minimum(best, E(z))
    got = E(x)
    assert torch.all(got >= best - 1e-5)
    assert float((got <= best + 1e-5).float().mean()) >= 0.9  # measured: 32 of 32 rows optimal (greedy alone: 31)
    greedy = solve_block(Q, c, x0, free, None, 0, torch.Generator())
    assert torch.all(E(greedy) <= E(x0) + 1e-6)  # never worse than the start
    # frozen variables and groups: swaps stay inside a group, frozen ones never move
    grp = torch.arange(b).div(5, rounding_mode="floor").expand(R, -1)
    x0g = torch.zeros(R, b)
    x0g[:, [0, 1, 5, 6]] = 1
    fr = free.clone()
    fr[:, 0] = False
    xg = solve_block(Q, c, x0g, fr, grp, 4, torch.Generator().manual_seed(2))
    assert torch.all(xg[:, :5].sum(1) == 2) and torch.all(xg[:, 5:].sum(1) == 2) and torch.all(xg[:, 0] == 1)


def test_lstsq_rows_is_the_least_squares_refit(layer):
    w, H = layer
    m = mask_from_scores(w.abs(), 0.5, "unstructured", per_row=True)
    Hd = H.double() + 1e-3 * torch.eye(256, dtype=torch.float64)
    v = lstsq_rows(w, Hd, m)
    assert torch.all(v[~m] == 0)
    r = 3
    K = m[r].nonzero()[:, 0]
    ref = torch.linalg.solve(Hd[K][:, K], (Hd @ w[r].double())[K])
    assert torch.allclose(v[r, K].double(), ref, atol=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_error_below_sparsegpt_and_wanda(layer, pattern):
    w, H = layer
    stats = LayerStats(H, n=2048, norms=H.diag().sqrt())
    got = {name: run_group([w], stats, build_config({"method": f"{name}:sparsity=0.5:pattern={pattern}"})).weight
           for name in ("wanda", "sparsegpt", "icbs")}
    err = {k: output_error(v - w, H) for k, v in got.items()}
    # measured (64x256, correlated inputs): unstructured icbs 0.92 / sparsegpt 2.05 / wanda 3.64; 2:4: 2.87 / 4.65 / 13.7
    assert err["icbs"] < 0.7 * err["sparsegpt"] and err["icbs"] < 0.3 * err["wanda"], err
    # the block descent itself, beyond the least-squares refit of SparseGPT's mask (measured 1.24 -> 0.92, 3.00 -> 2.87)
    info = icbs(w, H, sparsity=0.5, pattern=pattern)[2]
    assert info["icbs_error"] < 0.97 * info["icbs_init_error"], info
    W = got["icbs"]
    if pattern == "unstructured":
        assert torch.all((W == 0).sum(1) == 128)
    else:
        assert torch.all((W != 0).reshape(64, -1, 4).sum(-1) == 2)
    # the engine's step is the bare function
    assert torch.equal(W, icbs(w, H, sparsity=0.5, pattern=pattern, norms=H.diag().sqrt())[0])


def test_exact_density_knobs_and_the_paper_variant(layer):
    w, H = layer
    for s in (0.3, 0.77):
        W, m, info = icbs(w, H, sparsity=s, block_size=24, sweeps=1, anneal=0)
        assert torch.all((~m).sum(1) == round(256 * s)) and torch.equal(W == 0, ~m)
        assert info["icbs_error"] <= info["icbs_init_error"]
    for n, mm in ((1, 4), (4, 8)):
        W, m, _ = icbs(w, H, pattern=f"{n}:{mm}", block_size=20, sweeps=2, anneal=1)
        assert torch.all(m.reshape(64, -1, mm).sum(-1) == n) and torch.all(W[~m] == 0)
    # more sweeps and larger blocks: lower error (the quality/time knob)
    e1 = icbs(w, H, sweeps=1, anneal=0)[2]["icbs_error"]
    e3 = icbs(w, H, sweeps=4, block_size=128, anneal=0)[2]["icbs_error"]
    assert e3 < 0.97 * e1, (e1, e3)
    # update=false is the paper's mask-only iCBS: kept weights keep their values, error still below Wanda's mask
    W, m, info = icbs(w, H, update=False, init="wanda", anneal=0)
    assert torch.equal(W[m], w[m])
    wm = mask_from_scores(w.abs() * H.diag().sqrt(), 0.5, "unstructured", per_row=True)
    assert output_error(W - w, H) < 0.8 * output_error(w * wm - w, H)


def test_earlier_mask_and_dead_inputs(layer):
    w, H = layer
    H = H.clone()
    H[:, 7] = 0
    H[7, :] = 0
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.1
    W, m, info = icbs(w, H, sparsity=0.5, keep=keep, anneal=1)
    assert torch.isfinite(W).all() and not (m & ~keep).any() and not m[:, 7].any()
    assert torch.all((~m).sum(1) >= 128)


@pytest.mark.slow
def test_real_smollm2_layers(smollm2_layers):
    """Block 1 of SmolLM2-135M, its q/k/v group (960x576) and down_proj (576x1536), real inputs: the
    relative layer error tr(EHEᵀ)/tr(WHWᵀ) of iCBS below SparseGPT's and Wanda's at 50 % and 2:4.
    Measured (defaults, 2 sweeps): qkv 50 % 0.00175 / SparseGPT 0.00340 / Wanda 0.00749, 2:4 0.00346 /
    0.00639 / 0.0153; down 50 % 0.00559 / 0.0112 / 0.0288, 2:4 0.0107 / 0.0213 / 0.0552 (1 sweep here)."""
    for g, (w, H) in smollm2_layers.items():
        base = output_error(w, H)
        for pattern in ("unstructured", "2:4"):
            sg = output_error(sparsegpt(w, H, sparsity=0.5, pattern=pattern).weight - w, H) / base
            wm = mask_from_scores(w.abs() * H.diag().sqrt(), 0.5, pattern, per_row=True)
            wa = output_error(w * wm - w, H) / base
            W, m, info = icbs(w, H, sparsity=0.5, pattern=pattern, sweeps=1)
            e = output_error(W - w, H) / base
            assert e < 0.6 * sg and e < 0.3 * wa, (g, pattern, e, sg, wa)
            assert info["icbs_error"] < 0.99 * info["icbs_init_error"]  # the mask moved, beyond the refit
            if pattern == "2:4":
                assert torch.all((W != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)
            else:
                assert torch.all((W == 0).sum(1) == w.shape[1] // 2)


def test_recipe_cli_and_yaml(pico, calib_file, tmp_path, capsys):
    from weightsmith.cli import main

    cfg = build_config({"method": "icbs:sparsity=0.6:block_size=32:sweeps=1"})
    assert cfg.needs() == {"H"} and cfg.steps[0].block_size == 32 and not cfg.has_grid
    assert build_config({"method": "icbs:pattern=2:4,gptq"}).has_grid  # prune, then quantize with the mask kept
    src = pico("llama")
    rep = weightsmith.quantize(src, {"method": "icbs:pattern=2:4:sweeps=1", "grid": {"bits": 4, "group_size": 32}}, calib_ids(8, 32),
                               out=tmp_path / "s", progress=False)
    row = next(r for r in rep["layers"] if r["name"] == L0 + "mlp.up_proj")
    assert row["density"] == pytest.approx(0.5) and "2:4" in row["nm"]
    with QuantizedCheckpoint(tmp_path / "s") as ck:
        assert [e["kind"] for e in ck.encodings(L0 + "mlp.down_proj")] == ["sparsity"]
    code = main(["quantize", str(src), str(tmp_path / "c"), "--quiet", "--method", "icbs,gptq", "--sparsity", "0.5", "--sweeps", "1",
                 "--bits", "4", "--group-size", "32", "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32"])
    assert code == 0, capsys.readouterr().err
    with QuantizedCheckpoint(tmp_path / "c") as ck:
        assert [e["kind"] for e in ck.encodings(L0 + "mlp.down_proj")] == ["sparsity", "grid"]
    y = tmp_path / "r.yaml"
    y.write_text("steps: [{name: icbs, sparsity: 0.5, block_size: 16, sweeps: 1, anneal: 0}]\n")
    code = main(["quantize", str(src), str(tmp_path / "y"), "--quiet", "--recipe", str(y), "--calib", str(calib_file), "--nsamples", "8",
                 "--seqlen", "32"])
    assert code == 0, capsys.readouterr().err
    with QuantizedCheckpoint(tmp_path / "y") as ck:
        assert ck.encodings(L0 + "mlp.up_proj")[0]["density"] == pytest.approx(0.5)
