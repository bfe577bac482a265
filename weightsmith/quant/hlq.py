"""Hierarchical linear quantization (HLQ, from "ELUTQ: Efficient LUT-Aware Quantization for Deploying
Large Language Models on Edge Devices"): a ``bits``-bit code per weight whose bit planes each carry
their own scale per row and group,

    w ≈ offset[g] + Σ_i plane_scale[g, i] · bit_i(q)

instead of the uniform grid's ``plane_scale[g, i] = 2^i · scale[g]``. A lookup-table kernel already
looks up and sums one table entry per bit plane, so free plane scales fit its layout; the price is
``bits`` 16-bit scales and an offset per row and group (the report counts them) instead of a scale
and a zero point.

The fit is data-free and per group (rows of ``group_size`` consecutive weights), alternating two
exact minimisations of the squared error, so it never ends above its start:

1. codes: with the levels fixed, every weight takes its nearest of the ``2^bits`` levels;
2. scales: with the codes fixed, ``offset`` and the plane scales are the least-squares solution of
   ``x ≈ [1, bit_0, …, bit_{b-1}] · θ`` (normal equations in float64, ridge-regularised where a plane
   is constant over the group).

It starts from the configured grid's round-to-nearest (its scale and zero point from
``grid.grouped_params``, clip search included), and a group keeps its best iterate, so each group's
error is at most RTN's on the same grid. Needs no calibration data.

**Data-aware** (``hlq:data_aware=true``): each input column's squared error is weighted by its
calibration energy ``h_j = ‖X_j‖² / N`` (the diagonal of ``H``, the ``input_norms`` need: one
calibration forward, no ``XᵀX``), so the fit minimises ``Σ_j h_j (w_j − q_j)²`` — the output error
``‖(W − Q) X‖²`` with the cross terms between input columns dropped, as AWQ and SqueezeLLM weigh
salient channels. The codes step is unchanged (a positive weight does not move a weight's nearest
level); the scales step solves the weighted normal equations; the "never above RTN" guarantee holds
for the weighted error.

**GPTQ-solved** (``hlq:solver=gptq``, needs ``H``): the levels of the data-aware fit, then GPTQ's
column-by-column rounding onto them (``gptq.gptq_quantize`` with a rounder: each column, in act-order,
to its group's nearest level, the rounding error spread over the not yet rounded columns by the
inverse-Hessian update). The levels stay those fitted to the original weights (GPTQ's static groups);
the codes are the solver's. Should the Hessian stay singular at every damping, the fit's own codes are
kept (said in the layer's info).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import GridConfig, Strict
from ..encodings import Planes, nearest_level, plane_bits
from ..errors import WeightsmithError
from . import grid as G
from .registry import register

MAX_BITS = 4  # the fit enumerates the 2^bits levels of every group


class HLQConfig(Strict):
    name: Literal["hlq"] = "hlq"
    iters: int = Field(12, ge=1, le=200, description="alternations of code assignment and least-squares plane scales")
    data_aware: bool = Field(False, description="weight each input column's squared error by its calibration energy "
                                                "‖X_j‖²/N (one calibration forward); false: data-free")
    solver: Literal["fit", "gptq"] = Field("fit", description="fit: the codes of the level fit; gptq: the data-aware levels, then "
                                                              "GPTQ's error-compensating rounding onto them (needs H)")
    damp: float = Field(0.01, gt=0.0, description="solver=gptq: GPTQ's damping, a fraction of H's mean diagonal (escalates)")


def fit_groups(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, iters: int,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HLQ of ``n`` groups, the rows of ``x`` (n, gs), started from the uniform grid ``scale``, ``zero``
    (n,); ``weight`` (n, gs) > 0 weighs each element's squared error (None: all 1). Returns
    ``(plane_scale (n, bits), offset (n,), codes (n, gs))``, float64 / int64."""
    x = x.double()
    h = torch.ones_like(x) if weight is None else weight.double().expand_as(x)
    B = plane_bits(bits, x.device, torch.float64)
    ps = scale.double()[:, None] * (2.0 ** torch.arange(bits, device=x.device, dtype=torch.float64))
    off = -zero.double() * scale.double()
    theta = torch.cat([off[:, None], ps], 1)  # (n, bits + 1)
    design = torch.cat([torch.ones(B.shape[0], 1, dtype=torch.float64, device=x.device), B], 1)  # (L, bits + 1)

    def evaluate(th):
        lv = th @ design.T  # (n, L)
        c = nearest_level(x, lv)
        err = (h * (x - lv.gather(1, c)) ** 2).sum(1)
        return c, err

    codes, best = evaluate(theta)
    eye = torch.eye(bits + 1, dtype=torch.float64, device=x.device)
    for _ in range(iters):
        onehot_counts = torch.zeros(x.shape[0], design.shape[0], dtype=torch.float64, device=x.device)
        onehot_counts.scatter_add_(1, codes, h)  # the (weighted) count of each level
        sums = torch.zeros_like(onehot_counts).scatter_add_(1, codes, h * x)
        A = torch.einsum("nl,la,lb->nab", onehot_counts, design, design)  # DᵀWD per group, from the level counts
        rhs = sums @ design  # DᵀWx
        ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        new = torch.linalg.solve(A + ridge * eye, rhs[..., None])[..., 0]
        c_new, err = evaluate(new)
        better = err < best
        theta = torch.where(better[:, None], new, theta)
        codes = torch.where(better[:, None], c_new, codes)
        best = torch.where(better, err, best)
        if not bool(better.any()):
            break
    return theta[:, 1:], theta[:, 0], codes


def hlq_quantize(w: torch.Tensor, grid: GridConfig, iters: int = 12,
                 col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Planes, dict]:
    """The HLQ weight of ``w`` (out, in), its :class:`Planes` encoding and the fit's statistics;
    ``col_weight`` (in,) ≥ 0 weighs each input column's squared error (the data-aware fit: ``diag H``)."""
    if not 1 <= grid.bits <= MAX_BITS:
        raise WeightsmithError(f"hlq fits 1 to {MAX_BITS} bits (it enumerates every level of a group), not {grid.bits}")
    w = w.float()
    rows, cols = w.shape
    scale, zero, g_idx = G.grouped_params(w, grid)  # the RTN start, as the grid config says (clip search included)
    gs = cols if grid.group_size == -1 else grid.group_size
    full = cols // gs
    ps_parts, off_parts, code_parts = [], [], []
    spans = [(0, full * gs, full)] if full else []
    if cols % gs:
        spans.append((full * gs, cols, 1))
    if col_weight is not None:  # dead inputs keep a floor, so that no group's normal equations vanish
        cw = col_weight.double().to(w.device)
        if cw.shape != (cols,) or not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise WeightsmithError(f"hlq: the column weights must be {cols} finite values >= 0")
        col_weight = cw.clamp_min(1e-8 * max(float(cw.mean()), 1e-30))
    g0 = 0
    for a, b, ng in spans:
        x = w[:, a:b].reshape(rows * ng, (b - a) // ng)
        h = None if col_weight is None else col_weight[a:b].reshape(ng, -1).repeat(rows, 1)  # row r, group k → columns of k
        ps, off, codes = fit_groups(x, scale[:, g0 : g0 + ng].reshape(-1), zero[:, g0 : g0 + ng].reshape(-1).float(), grid.bits, iters, h)
        ps_parts.append(ps.float().reshape(rows, ng, grid.bits))
        off_parts.append(off.float().reshape(rows, ng))
        code_parts.append(codes.reshape(rows, b - a))
        g0 += ng
    enc = Planes(grid.bits, grid.group_size, torch.cat(ps_parts, 1), torch.cat(off_parts, 1))
    # the dense weight from the stored float32 parameters (what a reader recomputes), code by code
    levels = enc.levels()  # (out, n_groups, L)
    codes = torch.cat(code_parts, 1)
    dense = torch.empty_like(w)
    if full:
        dense[:, : full * gs] = levels[:, :full].gather(2, codes[:, : full * gs].reshape(rows, full, gs)).reshape(rows, full * gs)
    if cols % gs:
        dense[:, full * gs :] = levels[:, full].gather(1, codes[:, full * gs :])
    rtn = G.dequantize_groups(w, scale, zero, g_idx, grid.bits)
    wn = float((w**2).sum().clamp_min(1e-30))
    info = {"weight_error": float(((dense - w) ** 2).sum()) / wn, "rtn_weight_error": float(((rtn - w) ** 2).sum()) / wn}
    return dense, enc, info


def gptq_onto_levels(w: torch.Tensor, h: torch.Tensor, enc: Planes, group_size: int, damp: float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, dict]:
    """GPTQ's rounding of ``w`` onto the levels of ``enc`` (each column to its group's levels, act-order,
    static groups) under ``h``: (the dense weight on the levels, GPTQ's info), or (None, info) when the
    Hessian could not be factorised (the caller keeps its own codes)."""
    from .gptq import gptq_quantize

    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    g_idx = torch.clamp(torch.arange(cols, device=w.device) // gs, max=enc.offset.shape[1] - 1).to(torch.int32)
    levels = enc.levels().to(w.device)  # (rows, n_groups, L)

    def round_to(col: torch.Tensor, g: int) -> torch.Tensor:
        lv = levels[:, g]
        return lv.gather(1, nearest_level(col[:, None], lv)).squeeze(1)

    grid = GridConfig(bits=enc.bits_, group_size=group_size, sym=False)
    res = gptq_quantize(w, h, grid, act_order=True, static_groups=True, damp=damp, mask=mask, rounder=(g_idx, round_to))
    if res.info.get("fallback"):
        return None, {"gptq_fallback": "the fit's own codes: the Hessian is not positive definite even at damping 1.0"}
    return res.weight, {"gptq_damp": res.info["damp"], "dead_columns": res.info["dead_columns"]}


def _needs(cfg: HLQConfig) -> set:
    return {"H"} if cfg.solver == "gptq" else {"input_norms"} if cfg.data_aware else set()


@register("hlq", HLQConfig, kind="quantizer", produces=("planes",), needs=_needs)
def quantize(state, cfg: HLQConfig, ctx) -> None:
    """Hierarchical linear levels (ELUTQ's HLQ): a free scale per bit plane and group, data-free, data-aware or GPTQ-solved."""
    cw = None
    if cfg.solver == "gptq":
        if state.stats is None or state.stats.H is None:
            raise WeightsmithError("hlq:solver=gptq needs the layer's Hessian H (the H need)")
        cw = state.stats.H.diagonal().double()  # the data-aware levels: diag H = ‖X_j‖²/N
    elif cfg.data_aware:
        if state.stats is None or state.stats.norms is None:
            raise WeightsmithError("hlq:data_aware needs the layer's input norms (the input_norms need)")
        cw = state.stats.norms.double() ** 2
    w, enc, info = hlq_quantize(state.W, state.grid, cfg.iters, cw)
    if cfg.solver == "gptq":
        solved, ginfo = gptq_onto_levels(state.W, state.stats.H, enc, state.grid.group_size, cfg.damp, state.mask)
        info.update(ginfo)
        if solved is not None:
            w = solved
            info["weight_error"] = float(((w - state.W.float()) ** 2).sum()) / float((state.W.float() ** 2).sum().clamp_min(1e-30))
    mask = state.mask
    state.add(enc, w if mask is None else w * mask, info)
