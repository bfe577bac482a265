"""SparseGPT: one-shot pruning with second-order (OBS) reconstruction of the layer output.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023 (arXiv:2301.00774; reference code IST-DASLab/sparsegpt ``sparsegpt.py``, read, not
copied). It is the GPTQ loop with a mask: with ``H = XᵀX/N`` (damped, ``damp`` escalating ×10 as
in :func:`weightsmith.quant.gptq.inverse_cholesky`) and ``U`` the upper Cholesky factor of ``H⁻¹``,
columns are visited in their natural order; column ``j``'s pruned (and, jointly, rounded) value
``q_j`` leaves the error ``(w_j − q_j)/U_jj``, pushed onto the not-yet-visited columns through
``U_j,:`` — the OBS update of the remaining weights. Updates are applied lazily, ``block_size``
columns at a time.

Mask selection (the paper's adaptive mask selection) scores every weight by ``w² / U_jj²`` — the
OBS saliency ``w² / [H_F⁻¹]_jj`` of the remaining set ``F`` — on the weights *as compensated so
far*:

- unstructured: at the start of each lazy block, per output row, the lowest-scoring columns of
  the block are pruned. The count per block is ``round(i2·s) − round(i1·s)`` for the block's
  columns ``[i1, i2)``, so every row ends with exactly ``round(cols·s)`` zeros (the reference
  code thresholds the whole block across rows; per row gives each row, hence each stacked layer
  of a group, the exact density);
- N:M (along the input dimension): at the first column of every ``M`` consecutive columns, the
  ``M − N`` lowest scores of those ``M`` are pruned (the block size is rounded up to a multiple of
  ``M`` so no group straddles a block).

**Joint mode** (``quantize=true``, the paper's joint sparsification and quantization): the same
pass also rounds every kept weight onto the layer group's grid; the OBS update then carries both
the pruning and the rounding error. A group's scale and zero are found at its first column
(``joint_params=dynamic``, the default), as GPTQ finds them, from the group's weights as compensated
so far and only those the mask keeps (the block's mask where it is chosen; for N:M windows not yet
chosen, the keep set today's scores would give) — the compensated kept weights grow past the
original range, which static scales clip. ``joint_params=static``: the scales computed up front
from the weights the step receives (RTN's ``grouped_params``, shared through ``ctx.rtn``). Natural column
order throughout (no act-order: N:M groups need consecutive columns). The step then records a
``Sparsity`` and a ``Grid`` encoding, so ``sparsegpt:quantize=true`` alone is a full recipe (and a
quantizer after it is refused: the weights already lie on the grid).

Dead inputs (``H_jj = 0``) get a unit diagonal and a zero weight (then pruned first); an earlier
pruner's mask is kept (its zeros are pruned first and stay zero). Rows are independent given
``H``, so stacked groups (q/k/v) are handled as one matrix. When ``H`` is not positive definite
even at damping 1, the step falls back to ``w²`` per row (magnitude within rows, then RTN in joint
mode) and says so in ``info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import Field

from ..config import GridConfig
from ..encodings import Sparsity
from ..errors import WeightsmithError
from ..quant import grid as G
from ..quant.gptq import inverse_cholesky
from ..quant.registry import QuantResult, register
from .common import PruneFields, mask_from_scores, nm


class SparseGPTConfig(PruneFields):
    name: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, description="columns per lazy update block (and per unstructured mask selection)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="initial damping, a fraction of mean(diag H) (escalates x10 on failure)")
    quantize: bool = Field(False, description="joint mode: also round every kept weight onto the grid in the same pass")
    joint_params: Literal["dynamic", "static"] = Field(
        "dynamic", description="joint mode's group scales: dynamic = at each group's first column from its kept, compensated "
                               "weights (as GPTQ); static = RTN's, from the weights before pruning")


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (rows, cols) float32: pruned (and in joint mode rounded) weights
    mask: torch.Tensor  # (rows, cols) bool, True = kept
    info: dict = field(default_factory=dict)
    quant: Optional[QuantResult] = None  # joint mode: the grid (weight = ``weight``)


def _prune_count(i1: int, i2: int, sparsity: float) -> int:
    return int(round(i2 * sparsity)) - int(round(i1 * sparsity))


def sparsegpt(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, pattern: str = "unstructured", block_size: int = 128,
              damp: float = 0.01, grid: GridConfig | None = None, base: QuantResult | None = None,
              keep: torch.Tensor | None = None, joint_params: str = "dynamic") -> SparseGPTResult:
    """Prune ``w`` (rows, cols) given ``h`` (cols, cols) by SparseGPT (module docstring).

    ``grid`` turns on joint mode; ``joint_params`` "dynamic" finds each group's parameters at its
    first column from its kept, compensated weights, "static" uses ``base`` (RTN of ``w`` on
    ``grid``; else computed from ``w``) for every group. ``keep`` (rows, cols) bool is an earlier mask
    whose zeros stay zero."""
    W = w.float().clone()
    rows, cols = W.shape
    p = nm(pattern, cols)
    if p is not None:
        n_keep, m = p
        block_size = -(-block_size // m) * m
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_dead = int(dead.sum())
    forced = None if keep is None else ~keep.to(W.device, torch.bool)  # pruned before: pruned again, first
    if forced is not None:
        W[forced] = 0.0
    if grid is not None:
        scale, zero, g_idx = (base.scale, base.zero, base.g_idx) if base is not None else G.grouped_params(W, grid)
        col_group = g_idx.long().tolist()
        scale_t, zero_t = scale.t().contiguous(), zero.t().contiguous()  # (n_groups, rows): contiguous per group
        if joint_params not in ("dynamic", "static"):
            raise WeightsmithError(f"joint_params must be dynamic or static, not {joint_params!r}")
        gs = cols if grid.group_size == -1 else grid.group_size
        dynamic = joint_params == "dynamic"
    U, lam = inverse_cholesky(H, damp)
    info = {"damp": lam, "damp_escalated": lam is not None and lam > damp * (1 + 1e-9), "dead_columns": n_dead}
    if U is None:
        score = W.square()
        if forced is not None:
            score[forced] = -1.0
        mask = mask_from_scores(score, sparsity, pattern, per_row=True)
        Q = W * mask
        info.update(damp=None, fallback="magnitude within rows: Hessian not positive definite even at damping 1.0")
        quant = None
        if grid is not None:
            Q = G.dequantize_groups(W, scale, zero, g_idx, grid.bits) * mask
            quant = QuantResult(Q, scale, zero, g_idx, dict(info), latent=W)
        return SparseGPTResult(Q, mask, info, quant)

    # work on Wᵀ (as GPTQ does) so that each column is a contiguous vector
    Wt = W.t().contiguous()
    Ft = None if forced is None else forced.t().contiguous()
    Qt = torch.zeros_like(Wt)
    Lt = torch.empty_like(Wt) if grid is not None else None
    Mt = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)
    dU = torch.diag(U)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        M1 = torch.ones_like(W1, dtype=torch.bool)
        if p is None:
            k = _prune_count(i1, i2, sparsity)
            if k > 0:
                score = W1.square() / dU[i1:i2].square()[:, None]
                if Ft is not None:
                    score[Ft[i1:i2]] = -1.0
                idx = torch.argsort(score, dim=0, stable=True)[:k]
                M1.scatter_(0, idx, False)
        for i in range(i2 - i1):
            j = i1 + i
            if p is not None and j % m == 0:
                M1[i : i + m] = _nm_keep(W1[i : i + m], dU[j : j + m], None if Ft is None else Ft[j : j + m], n_keep)
            if grid is not None and dynamic and j % gs == 0:
                scale_t[col_group[j]], zero_t[col_group[j]] = _group_params(W1, M1, Wt, i, i2, j, gs, cols, p, dU, Ft, grid)
            col = W1[i]
            if grid is not None:
                Lt[j] = col
                g = col_group[j]
                q = G.fake_quant(col, scale_t[g], zero_t[g], grid.bits) * M1[i]
            else:
                q = col * M1[i]
            Qt[j] = q
            err = (col - q) / U1[i, i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            E1[i] = err
        Mt[i1:i2] = M1
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    Q, mask = Qt.t().contiguous(), Mt.t().contiguous()
    L = None if Lt is None else Lt.t().contiguous()
    if forced is not None:
        mask &= ~forced
        Q = Q * mask
    info["density"] = float(mask.float().mean())
    if grid is not None:
        scale, zero = scale_t.t().contiguous(), zero_t.t().contiguous()
    quant = QuantResult(Q, scale, zero, g_idx, dict(info), latent=L) if grid is not None else None
    return SparseGPTResult(Q, mask, info, quant)


def _nm_keep(w: torch.Tensor, du: torch.Tensor, forced: torch.Tensor | None, n_keep: int) -> torch.Tensor:
    """The keep mask (m, rows) of one N:M window of columns ``w`` (m, rows): the ``n_keep`` highest OBS
    saliencies w²/[H⁻¹]jj² per row, earlier-pruned weights (``forced``) last."""
    score = w.square() / du.square()[:, None]
    if forced is not None:
        score[forced] = -1.0
    idx = torch.argsort(score, dim=0, descending=True, stable=True)[:n_keep]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(0, idx, True)


def _group_params(W1, M1, Wt, i, i2, j, gs, cols, p, dU, Ft, grid):
    """Scale and zero (rows,) of the group starting at column ``j`` (block-local ``i``): its columns as
    compensated so far, the pruned ones zeroed — the block's mask where chosen; N:M windows not chosen
    yet get the keep set the current scores give (the same rule as the pass, a provisional choice)."""
    end = min(j + gs, cols)
    part = torch.cat([W1[i:], Wt[i2:end]], 0)[: end - j]  # (group cols, rows), a new tensor
    keep = torch.cat([M1[i:], torch.ones(max(0, end - i2), part.shape[1], dtype=torch.bool, device=part.device)], 0)[: end - j]
    if p is not None:
        n_keep, m = p
        for a in range(0, end - j, m):
            b = min(a + m, end - j)
            keep[a:b] = _nm_keep(part[a:b], dU[j + a : j + b], None if Ft is None else Ft[j + a : j + b], n_keep)
    elif Ft is not None:
        keep &= ~Ft[j:end]
    s, z = G.find_params((part * keep).t(), grid)
    return s[:, 0], z[:, 0]


def prune(state, cfg: SparseGPTConfig, ctx) -> None:
    """SparseGPT (Frantar & Alistarh 2023): prune by OBS saliency, compensating in the kept weights (optionally rounding them jointly)."""
    if state.H is None:
        raise WeightsmithError("sparsegpt needs the calibration inputs' H = XᵀX/N")
    base = ctx.rtn(state.W, state.grid) if cfg.quantize else None
    res = sparsegpt(state.W, state.H.to(state.W.device), sparsity=cfg.sparsity, pattern=cfg.pattern, block_size=cfg.block_size,
                    damp=cfg.damp, grid=state.grid if cfg.quantize else None, base=base, keep=state.mask,
                    joint_params=cfg.joint_params)
    state.add(Sparsity(res.mask, cfg.pattern), res.weight, res.info)
    if res.quant is not None:
        state.set_grid(res.quant)


def _produces(cfg: SparseGPTConfig) -> tuple[str, ...]:
    return ("sparsity", "grid") if cfg.quantize else ("sparsity",)


register("sparsegpt", SparseGPTConfig, kind="pruner", needs={"H"}, produces=_produces)(prune)
