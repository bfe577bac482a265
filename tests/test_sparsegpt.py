"""SparseGPT (weightsmith/prune/sparsegpt.py): the math on bare matrices (output error against magnitude
and Wanda, exact density and N:M pattern, joint mode on the grid, dead inputs, an earlier mask kept),
the recipe rules of its joint mode, and recipes end to end on a pico llama with the encodings they write."""
from __future__ import annotations

import pytest
import torch
from conftest import calib_ids
from test_quant_math import correlated_layer

import weightsmith
from weightsmith.config import GridConfig, build_config
from weightsmith.errors import WeightsmithError
from weightsmith.export.common import QuantizedCheckpoint
from weightsmith.prune.common import mask_from_scores
from weightsmith.prune.sparsegpt import sparsegpt
from weightsmith.quant import grid as G
from weightsmith.quant.pipeline import output_error, run_group
from weightsmith.quant.registry import LayerStats
from weightsmith.quant.rtn import rtn_quantize

L0 = "model.layers.0."


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(64, n=2048)


def _pruners(w, H, pattern):
    """Magnitude and Wanda on the same layer, through the engine's own layer pass."""
    stats = LayerStats(H, n=2048, norms=H.diag().sqrt())
    out = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        cfg = build_config({"method": f"{name}:sparsity=0.5:pattern={pattern}"})
        out[name] = run_group([w], stats, cfg).weight
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_below_magnitude_and_wanda(layer, pattern):
    w, H = layer
    ws = _pruners(w, H, pattern)
    err = {k: output_error(v - w, H) for k, v in ws.items()}
    # measured (64x256, correlated inputs): unstructured 2.05 / 7.10 / 3.64, 2:4 4.65 / 15.7 / 13.7 (sparsegpt / magnitude / wanda)
    assert err["sparsegpt"] < 0.7 * err["wanda"] and err["sparsegpt"] < 0.5 * err["magnitude"], err
    # the engine's step is the bare function
    assert torch.equal(ws["sparsegpt"], sparsegpt(w, H, sparsity=0.5, pattern=pattern).weight)


def test_exact_density_and_pattern(layer):
    w, H = layer
    for s in (0.5, 0.3, 0.77):
        r = sparsegpt(w, H, sparsity=s, block_size=40)  # blocks that do not divide the width
        zeros = (~r.mask).sum(1)
        assert torch.all(zeros == round(256 * s)), (s, zeros.unique())  # every row exactly
        assert torch.equal(r.weight == 0, ~r.mask) and torch.equal(r.weight[r.mask], r.weight[r.weight != 0])
    for n, m in ((2, 4), (1, 4), (4, 8)):
        r = sparsegpt(w, H, pattern=f"{n}:{m}", block_size=6)  # rounded up to a multiple of M
        assert torch.all(r.mask.reshape(64, -1, m).sum(-1) == n)
        assert torch.all(r.weight[~r.mask] == 0)
    with pytest.raises(WeightsmithError, match="multiple of 3"):
        sparsegpt(w[:, :100], H[:100, :100], pattern="2:3")


def test_mask_selection_uses_the_hessian(layer):
    """The mask is not magnitude's: SparseGPT keeps weights of high OBS saliency w²/[H⁻¹]jj."""
    w, H = layer
    r = sparsegpt(w, H, sparsity=0.5)
    mag = mask_from_scores(w.abs(), 0.5, "unstructured", per_row=True)
    assert (r.mask != mag).float().mean() > 0.05
    assert not torch.allclose(r.weight[r.mask], w[r.mask])  # compensation: kept weights moved
    # adaptive mask selection: choosing the mask per block, on the weights compensated so far, beats one
    # selection for the whole row up front (measured: block 16/32/64/128 → 2.12/1.97/1.94/2.05; 256 = whole row → 2.64)
    whole = output_error(sparsegpt(w, H, sparsity=0.5, block_size=256).weight - w, H)
    for b in (32, 64, 128):
        assert output_error(sparsegpt(w, H, sparsity=0.5, block_size=b).weight - w, H) < 0.85 * whole, b


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_mode_on_the_grid_and_below_prune_then_quantize(layer, pattern):
    """Joint mode: every kept weight on the grid, the pruned ones exactly 0; with each group's scales
    found at its first column from its kept, compensated weights (dynamic, the default) below
    magnitude/Wanda + RTN, SparseGPT + RTN and SparseGPT + GPTQ with the mask kept — the two-pass
    recipe; with static scales (RTN's, from the weights before pruning) at 2:4 it is not (measured
    error: static 5.40, SparseGPT + GPTQ 5.12, dynamic 4.96 at g64)."""
    w, H = layer
    g = GridConfig(bits=4, group_size=32)
    base = rtn_quantize(w, g)
    r = sparsegpt(w, H, sparsity=0.5, pattern=pattern, grid=g, base=base)
    q = r.quant
    assert q is not None and torch.equal(q.weight, r.weight)
    assert torch.all(r.weight[~r.mask] == 0)  # masked: exactly 0
    codes = r.weight / q.scale[:, q.g_idx.long()] + q.zero[:, q.g_idx.long()]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= G.maxq(4) + 1e-3
    assert not torch.equal(q.scale, base.scale)  # found as the pass goes
    static = sparsegpt(w, H, sparsity=0.5, pattern=pattern, grid=g, base=base, joint_params="static")
    assert torch.equal(static.quant.scale, base.scale)  # static: the original weights' RTN scales
    err = output_error(r.weight - w, H)
    norms = H.diag().sqrt()
    for score in (w.abs(), w.abs() * norms):  # magnitude / Wanda, then RTN
        m = mask_from_scores(score, 0.5, pattern, per_row=True)
        assert err < 0.6 * output_error(rtn_quantize(w * m, g).weight * m - w, H)
    p = sparsegpt(w, H, sparsity=0.5, pattern=pattern)  # SparseGPT, then RTN (measured 2.35 vs 2.89; 2:4 4.93 vs 5.39)
    assert err < 0.92 * output_error(rtn_quantize(p.weight, g).weight * p.mask - w, H)
    stats = LayerStats(H, n=2048, norms=norms)
    spec = f"sparsity=0.5:pattern={pattern}"
    for gs in (32, 64, 128):  # SparseGPT, then GPTQ keeping the mask: the joint pass is lower at every group size
        grid = {"bits": 4, "group_size": gs}
        two = run_group([w], stats, build_config({"method": f"sparsegpt:{spec},gptq", "grid": grid})).weight
        one = run_group([w], stats, build_config({"method": f"sparsegpt:{spec}:quantize=true", "grid": grid})).weight
        assert output_error(one - w, H) < 0.985 * output_error(two - w, H), gs
    with pytest.raises(WeightsmithError, match="joint_params"):
        sparsegpt(w, H, grid=g, joint_params="later")


def test_dead_inputs_and_an_earlier_mask(layer):
    w, H = layer
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    r = sparsegpt(w, H, sparsity=0.5)
    assert torch.isfinite(r.weight).all() and r.info["dead_columns"] == 1
    assert torch.all(r.weight[:, 5] == 0) and not r.mask[:, 5].any()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.2
    r = sparsegpt(w, layer[1], sparsity=0.5, keep=keep)
    assert not (r.mask & ~keep).any() and torch.all(r.weight[~keep] == 0)
    assert torch.all((~r.mask).sum(1) == 128)


def test_recipe_rules():
    cfg = build_config({"method": "sparsegpt:quantize=true"})  # a full recipe on its own
    assert cfg.has_grid and cfg.needs() == {"H"}
    assert not build_config({"method": "sparsegpt"}).has_grid
    assert build_config({"method": "sparsegpt:pattern=2:4,gptq"}).has_grid
    with pytest.raises(WeightsmithError, match="already did"):
        build_config({"method": "sparsegpt:quantize=true,gptq"})
    with pytest.raises(WeightsmithError, match="already did"):
        build_config({"method": "sparsegpt:quantize=true,rtn"})
    assert build_config({"method": "sparsegpt:quantize=true,lorc:rank=2"}).steps[1].name == "lorc"
    with pytest.raises(WeightsmithError, match=r"rules\[0\].*already did"):  # a rule cannot make a second grid either
        build_config({"method": "sparsegpt,gptq", "rules": [{"match": "mlp", "steps": {"sparsegpt": {"quantize": True}}}]})
    cfg = build_config({"method": "sparsegpt", "rules": [{"match": "mlp", "steps": {"sparsegpt": {"quantize": True}}}]})
    assert cfg.has_grid  # the format checks see the rule's grid


def test_pico_end_to_end(pico, tmp_path):
    from transformers import AutoModelForCausalLM

    src = pico("llama")
    ids = calib_ids(8, 32)
    rep = weightsmith.quantize(src, {"method": "sparsegpt:pattern=2:4"}, ids, out=tmp_path / "s", progress=False)
    row = next(r for r in rep["layers"] if r["name"] == L0 + "mlp.up_proj")
    assert row["density"] == pytest.approx(0.5) and "grid" not in row
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()[L0 + "mlp.up_proj.weight"]
    assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2
    with QuantizedCheckpoint(tmp_path / "s") as ck:
        assert [e["kind"] for e in ck.encodings(L0 + "self_attn.q_proj")] == ["sparsity"]
        assert ck.encodings(L0 + "self_attn.q_proj")[0]["pattern"] == "2:4"

    rep = weightsmith.quantize(src, {"method": "sparsegpt:quantize=true", "grid": {"bits": 4, "group_size": 32}}, ids,
                               out=tmp_path / "j", progress=False)
    rows = {r["name"]: r for r in rep["layers"]}
    row = rows[L0 + "mlp.up_proj"]
    assert row["density"] == pytest.approx(0.5) and row["error"] < 1.0
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "j").state_dict()[L0 + "mlp.up_proj.weight"]
    assert float((w == 0).float().mean(1).min()) >= 0.5
    with QuantizedCheckpoint(tmp_path / "j") as ck:
        assert [e["kind"] for e in ck.encodings(L0 + "mlp.up_proj")] == ["sparsity", "grid"]
        ql = ck.layer(L0 + "mlp.up_proj")  # codes checked to lie on the grid
        assert ql.bits == 4
    # the report's RTN baseline is there (a grid and an H): joint SparseGPT at 50 % costs more than dense RTN, but not absurdly
    assert row.get("rtn_error") is not None


def test_cli_flags_and_export(pico, calib_file, tmp_path, capsys):
    """``--method sparsegpt --quantize --pattern 2:4`` through the generated flags, then exported packed."""
    from weightsmith.cli import main
    from weightsmith.export import export

    src = pico("llama")
    out = tmp_path / "q"
    code = main(["quantize", str(src), str(out), "--quiet", "--method", "sparsegpt", "--quantize", "--pattern", "2:4",
                 "--bits", "4", "--group-size", "32", "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32"])
    assert code == 0, capsys.readouterr().err
    with QuantizedCheckpoint(out) as ck:
        enc = ck.encodings(L0 + "mlp.down_proj")
        assert [e["kind"] for e in enc] == ["sparsity", "grid"] and enc[0]["pattern"] == "2:4"
    export(out, tmp_path / "ct", "compressed-tensors")
    assert (tmp_path / "ct" / "config.json").exists()
    code = main(["quantize", str(src), str(tmp_path / "bad"), "--quiet", "--method", "sparsegpt:quantize=true,gptq"])
    assert code == 2 and "already did" in capsys.readouterr().err
