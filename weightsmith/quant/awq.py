"""AWQ: activation-aware per-input-channel scaling before quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization
for On-Device LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978). Written from the
paper: input channels that carry large activations matter most, so the weights are quantized as
``Q(W·diag(s))`` and the inverse scale is folded into the op that produces the layer group's input
(``x → x / s``), which leaves the float model unchanged and the weights exactly on the grid.

- ``s = a^α / sqrt(max(a^α)·min(a^α))`` with ``a`` the per-channel activation magnitude and ``α`` on a
  grid of ``n_grid`` points ``k / n_grid`` in ``[0, 1)`` (α = 0 is plain quantization, so the search
  never does worse than it on its objective). ``a`` is the RMS per channel, ``sqrt(diag H)``
  (documented difference to the paper, which uses the mean |x|; both rank outlier channels the same way).
- **Search objective** (exact, no extra forward): the output error of the group's own layers,
  ``Σ_layers tr(E H Eᵀ)`` with ``E = Q(W·diag(s))·diag(1/s) − W`` and ``H = XᵀX/N``, round-to-nearest
  on the configured grid *without* clip search (as llm-awq searches its scales before its clip step).
  llm-awq scores the candidates on the output of the enclosing module (attention / MLP) for q/k/v
  and gate/up; for o_proj and down_proj both objectives coincide. Block-output scoring is not
  implemented.
- Clip search runs after scaling: the quantizer that follows quantizes ``W·diag(s)`` with the grid's
  clip search (``grid.clip_search``) and receives ``H' = diag(1/s) H diag(1/s)``.
- ``verify`` (default on; not in the paper): the α search scores round-to-nearest, but a quantizer such
  as GPTQ compensates errors itself and often does better on less-scaled weights (measured on
  SmolLM2-135M W4 g64: the RTN-chosen scales made GPTQ's group output error 3–12 % *worse* in 5 of 6
  groups). So this step runs the recipe's steps up to its quantizer (``ctx.rest``) with ``s``, ``s^½``
  (exactly the α/2 scale) and no scale, keeps the one with the lowest group output error
  ``tr(E H Eᵀ)`` — three quantizer runs per group — and runs the steps after the quantizer on it; AWQ+quantizer is then never worse than the quantizer alone on the
  calibration statistics. The report marks groups where the scale was halved or dropped.
- Folding ``1/s`` into the producer (norm weight/bias or the rows of a preceding linear layer) is done by
  the engine (``engine/fold.py``) for any step that leaves an ``input_scale``; where no producer can
  absorb it the group gets ``s = 1`` and the report says why (or, with ``require_fold``, the run stops).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import GridConfig, Strict
from ..errors import WeightsmithError
from .pipeline import FINISHED, output_error
from .registry import LayerStats, register
from .rtn import rtn_quantize


class AWQConfig(Strict):
    name: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=1, le=1000, description="α candidates k/n_grid, k = 0..n_grid-1")
    verify: bool = Field(True, description="run the quantizer with s, s^1/2 and no scale and keep the lowest group output error tr(E H Eᵀ) (two more quantizer runs per group)")
    require_fold: bool = Field(False, description="stop with an error when a layer group's producer cannot absorb the scale (default: leave that group unscaled, s = 1, and report it)")


def channel_magnitude(stats: LayerStats) -> torch.Tensor:
    """Per-input-channel activation magnitude: the RMS = sqrt(diag H)."""
    return torch.diag(stats.H).float().clamp(min=0).sqrt()


def scales_for(a: torch.Tensor, alpha: float) -> torch.Tensor:
    s = a.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(W: torch.Tensor, stats: LayerStats, grid: GridConfig, n_grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of α; returns ``(s, α, errors per α)`` minimising ``tr(E H Eᵀ)`` (see module doc)."""
    W = W.float()
    H = stats.H.float()
    a = channel_magnitude(stats)
    g = grid.model_copy(update={"clip_search": False})
    errs: list[float] = []
    best = (float("inf"), 0.0, torch.ones_like(a))
    for k in range(n_grid):
        alpha = k / n_grid
        s = scales_for(a, alpha)
        q = rtn_quantize(W * s, g).weight / s
        err = output_error(q - W, H)
        errs.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errs


def transform(state, cfg: AWQConfig, ctx):
    """AWQ (Lin et al. 2024): per-input-channel scales s = a^α searched on the group output error, folded into the input's producer."""
    if state.stats is None or state.stats.H is None:
        raise WeightsmithError("awq needs calibration statistics")
    if not ctx.foldable:
        if cfg.require_fold:
            raise WeightsmithError(f"awq: cannot fold the scale of {ctx.where} into the op producing its input ({ctx.why_not}); drop require_fold to leave such groups unscaled")
        state.info["awq"] = {"skipped": ctx.why_not or "no producer absorbs the scale"}
        return None
    s, alpha, errs = search_scale(state.W, state.stats, state.grid, cfg.n_grid)
    base = errs[0]
    state.info["awq"] = {"alpha": alpha, "search_error_ratio": (min(errs) / base) if base > 0 else 1.0}
    if bool((s == 1).all()):
        return None
    if not cfg.verify:
        state.rescale(s)
        return None
    # pick the scale by the quantizer's own result: s, s^1/2, none (see the module docstring); then the steps after it
    q = ctx.next_of_kind("quantizer")
    stop = None if q is None else q + 1
    H0, W0 = state.stats.H, state.W0
    best = None
    for p in (1.0, 0.5, 0.0):
        v = state.copy()
        if p:
            v.rescale(s.pow(p) if p != 1.0 else s)
        ctx.rest(v, 0, stop)
        e = output_error(v.effective - W0, H0)
        if best is None or e < best[0]:
            best = (e, p, v)
    _, p, v = best
    if stop is not None:
        ctx.rest(v, stop)
    tr = dict(state.info["awq"])
    if p == 0.0:
        tr["dropped"] = "unscaled had the lowest group output error"
    elif p == 0.5:
        tr["alpha"] = tr.get("alpha", 0) / 2
        tr["halved"] = "α/2 gave the lowest group output error"
    state.__dict__.update(v.__dict__)
    state.info["awq"] = tr
    return FINISHED


def _summary(rows: list[dict]) -> dict:
    awq = [r for r in rows if isinstance(r.get("awq"), dict)]
    if not awq:
        return {}
    return {"awq_scaled_layers": sum(1 for r in awq if "folded_into" in r),
            "awq_unscaled": [{"name": r["name"], "why": r["awq"].get("skipped") or r["awq"]["dropped"]}
                             for r in awq if {"skipped", "dropped"} & set(r["awq"])]}


def _cell(row: dict) -> str:
    a = row.get("awq")
    if not isinstance(a, dict):
        return ""
    if "skipped" in a or "dropped" in a:
        return "unscaled: " + str(a.get("skipped") or a["dropped"]).replace("|", "/")
    return f"α={a.get('alpha')} → {row.get('folded_into', '?')}"


register("awq", AWQConfig, kind="transform", needs={"H"}, produces=("input_scale",), summary=_summary, cell=_cell)(transform)
