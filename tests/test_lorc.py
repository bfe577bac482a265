"""LoRC: low-rank correction of the quantization error, and the bits-per-weight accounting."""
from __future__ import annotations

import pytest
import torch

from weightsmith.config import build_config
from weightsmith.quant.grid import relative_error
from weightsmith.quant.lorc import lowrank_factors
from weightsmith.encodings import Grid, LowRank, layer_bits
from weightsmith.quant.pipeline import run_group
from weightsmith.quant.registry import LayerStats
from weightsmith.quant.rtn import rtn_quantize


def problem(seed=0, out=48, cols=96):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05
    X = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))  # correlated inputs
    X[:, :3] *= 10
    H = X.T @ X / X.shape[0]
    grid = build_config({"method": "rtn", "grid": {"bits": 3, "group_size": 32}}).grid
    return W, H, rtn_quantize(W, grid).weight


def h_err(E, H):
    return float(((E @ H) * E).sum())


@pytest.mark.parametrize("whiten", [False, True])
def test_error_decreases_with_rank_and_full_rank_is_exact(whiten):
    W, H, Q = problem()
    E = W - Q
    errs = []
    for r in (1, 2, 4, 8, 16, 32, 48):
        A, B = lowrank_factors(E, r, H if whiten else None, damp=0.01)
        assert A.shape == (48, r) and B.shape == (r, 96)
        R = E - A @ B
        errs.append(h_err(R, H) if whiten else float(R.norm()))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # rank ≥ min(shape): Q + A·B recovers W
    A, B = lowrank_factors(E, 1000, H if whiten else None)
    assert A.shape[1] == 48
    assert torch.allclose(Q + A @ B, W, atol=1e-5)


def test_whitened_beats_plain_on_output_error():
    W, H, Q = problem(1)
    E = W - Q
    for r in (2, 8):
        Ap, Bp = lowrank_factors(E, r)
        Aw, Bw = lowrank_factors(E, r, H, damp=0.01)
        plain, white = h_err(E - Ap @ Bp, H), h_err(E - Aw @ Bw, H)
        assert white < 0.9 * plain, (r, white, plain)
        # and plain is the better one on the weight error it optimises
        assert float((E - Ap @ Bp).norm()) <= float((E - Aw @ Bw).norm())


def test_pipeline_lorc_per_layer_after_gptq():
    W, H, _ = problem(2)
    base = build_config({"method": "gptq", "grid": {"bits": 3, "group_size": 32}})
    lorc = build_config({"method": ["gptq", {"name": "lorc", "rank": 4}], "grid": {"bits": 3, "group_size": 32}})
    r0 = run_group([W[:16], W[16:]], LayerStats(H), base)
    r1 = run_group([W[:16], W[16:]], LayerStats(H), lorc)
    assert r0.state.find(LowRank) is None
    per_layer = r1.state.find(LowRank).split([16, 32])
    (A0, B0), = per_layer[0].factors
    assert [lr.factors[0][0].shape for lr in per_layer] == [(16, 4), (32, 4)] and [lr.factors[0][1].shape for lr in per_layer] == [(4, 96), (4, 96)]
    # the correction sits on top of the same grid weights
    assert torch.allclose(r1.weight[:16], r0.weight[:16] + A0 @ B0, atol=1e-6)
    assert relative_error(r1.effective - W, W, H) < 0.8 * relative_error(r0.effective - W, W, H)


def test_bits_per_weight_exact():
    # 128×256, 4 bits, groups of 64 → 4 groups per row
    n = 128 * 256
    natural = (torch.arange(256) // 64).int()

    def grid(sym=True, g_idx=natural):
        return Grid(4, 64, sym, torch.ones(128, 4), torch.full((128, 4), 8), g_idx)

    assert layer_bits((128, 256), [grid()])["bits_per_weight"] == pytest.approx(4 + 16 * 128 * 4 / n)  # 4.25
    assert layer_bits((128, 256), [grid(False)])["bits_per_weight"] == pytest.approx(4.25 + 4 * 128 * 4 / n)  # + 4-bit zero per group
    perm = grid(g_idx=natural[torch.randperm(256, generator=torch.Generator().manual_seed(0))])
    assert layer_bits((128, 256), [perm])["bits_per_weight"] == pytest.approx(4.25 + 32 * 256 / n)  # + int32 g_idx per column
    lr = layer_bits((128, 256), [grid(), LowRank([(torch.zeros(128, 8), torch.zeros(8, 256))])])
    assert lr["bits_per_weight"] == pytest.approx(4.25 + 16 * 8 * (128 + 256) / n) == 5.75
    assert lr["bits"] == {"weights": 4 * n, "scales": 16 * 512, "zeros": 0, "g_idx": 0, "lowrank": 16 * 8 * 384}


def test_report_counts_lorc_and_stores_factors(pico, tmp_path):
    import weightsmith
    from safetensors.torch import load_file
    from conftest import calib_ids

    rep = weightsmith.quantize(pico("llama"), {"method": "gptq,lorc", "grid": {"bits": 4, "group_size": 32, "sym": False}},
                               calib_ids(8, 32), out=tmp_path / "q", progress=False)
    row = next(r for r in rep["layers"] if r["name"].endswith("layers.0.mlp.down_proj"))
    o, i = row["shape"]  # 64×128
    assert row["lorc_rank"] == 8
    assert row["bits_per_weight"] == pytest.approx((4 * o * i + (16 + 4) * o * (i // 32) + 16 * 8 * (o + i)) / (o * i))
    qp = load_file(tmp_path / "q" / "qparams" / "block-00000.safetensors")
    assert qp["model.layers.0.mlp.down_proj.lowrank_a"].shape == (64, 8) and qp["model.layers.0.mlp.down_proj.lowrank_b"].shape == (8, 128)
    assert "bits_per_weight" in rep["summary"] and rep["summary"]["bits_per_weight_parts"]["lowrank"] > 0
