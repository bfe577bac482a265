"""The algorithms as pure functions on small real inputs: grid, RTN, clip search, GPTQ."""
from __future__ import annotations

import pytest
import torch

from weightsmith.config import GridConfig
from weightsmith.quant.grid import dequantize_groups, fake_quant, find_params, grouped_params, relative_error
from weightsmith.quant.gptq import gptq_quantize, inverse_cholesky
from weightsmith.quant.rtn import rtn_quantize


def correlated_inputs(n=2048, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.5 * torch.randn(d, generator=g)
    x[:, :4] *= 8  # a few outlier channels, as in real activations
    return x


def correlated_layer(rows: int, d: int = 256, n: int = 2048):
    """A (rows, d) weight (seed 1, scale 0.05) and H = XᵀX/N of :func:`correlated_inputs` (n, d)."""
    x = correlated_inputs(n=n, d=d)
    w = torch.randn(rows, d, generator=torch.Generator().manual_seed(1)) * 0.05
    return w, x.t() @ x / x.shape[0]


@pytest.fixture
def layer():
    x = correlated_inputs()
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    return w, x.t() @ x / x.shape[0], x


def test_relative_error_matches_activations(layer):
    w, h, x = layer
    q = rtn_quantize(w, GridConfig(bits=3, group_size=32)).weight
    direct = ((x @ (w - q).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()
    assert relative_error(q - w, w, h) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_lies_on_grid_and_is_nearest(bits, sym):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(bits))
    grid = GridConfig(bits=bits, group_size=16, sym=sym)  # 40 = 16 + 16 + 8: group size need not divide
    r = rtn_quantize(w, grid)
    assert r.scale.shape == (16, 3) and r.g_idx.tolist() == [0] * 16 + [1] * 16 + [2] * 8
    codes = torch.round(r.weight / r.scale[:, r.g_idx.long()] + r.zero[:, r.g_idx.long()])
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(dequantize_groups(r.weight, r.scale, r.zero, r.g_idx, bits), r.weight)
    # no other grid point of the same group is closer than the chosen one (up to clamping)
    step = r.scale[:, r.g_idx.long()]
    assert ((r.weight - w).abs() <= step / 2 + 1e-6).float().mean() > 0.95
    if sym:
        assert torch.all(r.zero == 2 ** (bits - 1))


def test_clip_search_lowers_weight_mse():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w[:, 0] *= 6  # heavy tails make clipping worthwhile
    plain = rtn_quantize(w, GridConfig(bits=3, group_size=64)).weight
    clipped = rtn_quantize(w, GridConfig(bits=3, group_size=64, clip_search=True)).weight
    assert ((clipped - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()


@pytest.mark.parametrize("act_order,static", [(False, False), (False, True), (True, True), (True, False)])
@pytest.mark.parametrize("gs,sym", [(32, True), (40, False), (-1, True)])
def test_gptq_beats_rtn_and_stays_on_its_grid(layer, act_order, static, gs, sym):
    w, h, _ = layer
    grid = GridConfig(bits=4, group_size=gs, sym=sym)
    r = gptq_quantize(w, h, grid, act_order=act_order, static_groups=static)
    e_gptq = relative_error(r.weight - w, w, h)
    e_rtn = relative_error(rtn_quantize(w, grid).weight - w, w, h)
    assert e_gptq < 0.75 * e_rtn
    assert torch.equal(dequantize_groups(r.weight, r.scale, r.zero, r.g_idx, 4), r.weight)
    n_groups = 1 if gs == -1 else -(-w.shape[1] // gs)
    assert r.scale.shape == (w.shape[0], n_groups)
    assert sorted(torch.bincount(r.g_idx.long()).tolist()) == sorted(torch.bincount(torch.arange(w.shape[1]) // (w.shape[1] if gs == -1 else gs)).tolist())
    assert r.info["damp"] == 0.01 and not r.info["damp_escalated"]


def test_gptq_dead_inputs_get_zero_weight(layer):
    w, h, _ = layer
    h = h.clone()
    h[5, :] = 0
    h[:, 5] = 0
    r = gptq_quantize(w, h, GridConfig(bits=4, group_size=32))
    assert r.info["dead_columns"] == 1
    assert torch.all(r.weight[:, 5] == 0)
    assert torch.isfinite(r.weight).all()


def test_damping_escalates_on_indefinite_hessian(layer):
    w, h, _ = layer
    evals, evecs = torch.linalg.eigh(h.double())
    evals[0] = -0.05 * evals.mean()  # not positive semi-definite: 1% damping cannot fix it
    bad = (evecs @ torch.diag(evals) @ evecs.t()).float()
    u, lam = inverse_cholesky(bad, 0.01)
    assert u is not None and lam == pytest.approx(0.1)
    r = gptq_quantize(w, bad, GridConfig(bits=4, group_size=32))
    assert r.info["damp_escalated"] and r.info["damp"] == pytest.approx(0.1)
    assert torch.isfinite(r.weight).all()


def test_hopeless_hessian_falls_back_to_rtn(layer):
    w, _, _ = layer
    bad = -torch.eye(w.shape[1])  # negative definite: no damping up to 100% of the mean diagonal helps
    r = gptq_quantize(w, bad, GridConfig(bits=4, group_size=32))
    assert "rtn" in r.info["fallback"]
    assert torch.equal(r.weight, rtn_quantize(w, GridConfig(bits=4, group_size=32)).weight)


def test_find_params_handles_zero_rows():
    w = torch.zeros(3, 8)
    s, z = find_params(w, GridConfig(bits=4, group_size=8, sym=False))
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(fake_quant(w, s, z, 4), w)
    s, z = grouped_params(w, GridConfig(bits=4, group_size=8))[:2]
    assert (s > 0).all()


def test_coarse_to_fine_clip_search_matches_exhaustive(monkeypatch):
    import weightsmith.quant.grid as G

    w = torch.randn(2048, 64, generator=torch.Generator().manual_seed(3))
    w[:, 0] *= 4
    grid = GridConfig(bits=3, group_size=64, clip_search=True)
    err = lambda sz: float((fake_quant(w, *sz, 3) - w).abs().pow(2.4).sum())
    fast = err(find_params(w, grid))
    monkeypatch.setattr(G, "CLIP_STRIDE", 1)
    full = err(find_params(w, grid))
    assert full <= fast <= full * 1.001


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False)])
def test_clip_search_by_slabs_is_bit_identical(monkeypatch, bits, sym):
    """The clip search runs over slabs of rows (cache-sized); the result is the whole tensor's, bit for bit."""
    from weightsmith.quant import grid as G

    w = torch.randn(300, 512, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, 512)
    cfg = GridConfig(bits=bits, group_size=64, sym=sym, clip_search=True)
    monkeypatch.setattr(G, "CLIP_CHUNK", 10**12)
    whole = grouped_params(w, cfg)
    monkeypatch.setattr(G, "CLIP_CHUNK", 64 * 37)  # 37 rows of groups per slab: slabs of unequal size
    slabs = grouped_params(w, cfg)
    for a, b in zip(whole, slabs):
        assert torch.equal(a, b)


def test_clip_search_equals_the_textbook_trials(monkeypatch):
    """The clip search's in-place trials pick, bit for bit, the factor the plain formula picks
    (exhaustive search: every candidate p, error Σ|fake_quant(w) − w|^2.4 per row, first minimum)."""
    import weightsmith.quant.grid as G

    w = torch.randn(500, 64, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 2, 64)
    grid = GridConfig(bits=3, group_size=64, sym=False, clip_search=True)
    monkeypatch.setattr(G, "CLIP_STRIDE", 1)
    scale, zero = find_params(w, grid)
    xmin, xmax = w.min(1, keepdim=True).values.clamp(max=0), w.max(1, keepdim=True).values.clamp(min=0)
    best, bs, bz = None, None, None
    for i in range(int(grid.clip_maxshrink * grid.clip_grid)):
        p = 1 - i / grid.clip_grid
        s1, z1 = G._range_params(p * xmin, p * xmax, 3, False)
        err = (fake_quant(w, s1, z1, 3) - w).abs().pow(2.4).sum(1, keepdim=True)
        if best is None:
            best, bs, bz = err, s1, z1
        else:
            better = err < best
            best, bs, bz = torch.where(better, err, best), torch.where(better, s1, bs), torch.where(better, z1, bz)
    assert torch.equal(scale, bs) and torch.equal(zero, bz)


@pytest.mark.parametrize("n", [100, 300, 513])
def test_triu_solve_term_by_blocks_equals_the_two_products(n):
    """``triu(A Uᵀ, 1) U`` computed in 2×2 blocks (the zero blocks skipped) equals the two full products."""
    from weightsmith.quant.gptq import triu_solve_term

    x = correlated_inputs(n=4 * n, d=n)
    U, _ = inverse_cholesky(x.t() @ x / x.shape[0], 0.01)
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(2)) * 0.1
    U64 = U.double()
    direct = (torch.triu(A.double() @ U64.t(), diagonal=1) @ U64).float()
    got = triu_solve_term(A, U)
    assert got.dtype == torch.float32 and torch.allclose(got, direct, rtol=1e-6, atol=1e-7 * float(direct.abs().max()))
    assert torch.equal(torch.tril(got), torch.zeros_like(got))


def test_output_errors_match_activations():
    """The report's output errors from H and dXX alone equal their definitions on the activations."""
    from weightsmith.engine.layers import output_errors
    from weightsmith.quant.registry import LayerStats

    x = correlated_inputs(n=3000, d=96)
    xt = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))  # the float path's inputs
    h = x.t() @ x / x.shape[0]
    h = torch.triu(h) + torch.triu(h, 1).t()  # exactly symmetric, as HessianStats.finalize gives it
    dxx = (xt - x).t() @ x / x.shape[0]
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    q = rtn_quantize(w, GridConfig(bits=3, group_size=32)).weight
    r = rtn_quantize(w, GridConfig(bits=2, group_size=32)).weight
    got = output_errors(q, r, w, LayerStats(h, x.shape[0], dxx, torch.diag(h).sqrt()))
    den = float(((x @ w.t()) ** 2).sum())
    for key, m in (("", q), ("rtn_", r)):
        assert got[key + "error"] == pytest.approx(float(((x @ (m - w).t()) ** 2).sum()) / den, rel=1e-4)
        excess = float(((xt @ w.t() - x @ m.t()) ** 2).sum() - ((xt @ w.t() - x @ w.t()) ** 2).sum())
        assert got[key + "float_error"] == pytest.approx(excess / den, rel=1e-3)
    plain = output_errors(q, None, w, LayerStats(h, x.shape[0], None, torch.diag(h).sqrt()))
    assert set(plain) == {"error"}
    zero = output_errors(torch.zeros_like(w), None, torch.zeros_like(w), LayerStats(h, x.shape[0], None, torch.diag(h).sqrt()))
    assert zero == {"error": 0.0}
