"""What the pruners share: their config fields, masks from scores (unstructured or N:M), the step body."""
from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator

from ..config import Strict
from ..encodings import Sparsity
from ..errors import WeightsmithError


class PruneFields(Strict):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the weights set to zero (for N:M patterns: 1 - N/M, implied)")
    pattern: str = Field("unstructured", description="'unstructured' or N:M along the input dimension, e.g. 2:4 (N kept in every M consecutive inputs)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v) -> str:
        v = str(v).strip()
        if v == "unstructured":
            return v
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M (e.g. 2:4), got {v!r}")
        return v


def nm(pattern: str, cols: int | None = None) -> tuple[int, int] | None:
    """``(N, M)`` of an N:M pattern (None: unstructured); with ``cols``, refuses a width M does not divide."""
    if pattern == "unstructured":
        return None
    n, m = map(int, pattern.split(":"))
    if cols is not None and cols % m:
        raise WeightsmithError(f"pattern {pattern}: the input width {cols} is not a multiple of {m}")
    return n, m


def mask_from_scores(score: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Keep the highest scores: the top ``1 - sparsity`` of each row (``per_row``) or of the whole
    matrix, or the top N of every M consecutive inputs for an N:M ``pattern``. Ties go to the
    lower index (a stable sort), so the mask is deterministic."""
    rows, cols = score.shape
    p = nm(pattern, cols)
    if p is not None:
        n, m = p
        s = score.reshape(rows, cols // m, m)
        idx = torch.argsort(s, dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(rows, cols)
    if per_row:
        k = int(round(cols * (1 - sparsity)))
        idx = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    k = int(round(score.numel() * (1 - sparsity)))
    idx = torch.argsort(score.flatten(), descending=True, stable=True)[:k]
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(rows, cols)


def prune_state(state, cfg, score_fn, per_row: bool) -> None:
    """Mask each layer of the group by its own scores and add the :class:`Sparsity` encoding.
    ``score_fn(w, rows)``: the scores of one layer's weights ``w``, which are ``rows`` of the stacked group."""
    masks, a = [], 0
    for n in state.sizes:
        rows = slice(a, a + n)
        masks.append(mask_from_scores(score_fn(state.W[rows], rows), cfg.sparsity, cfg.pattern, per_row))
        a += n
    mask = torch.cat(masks, 0)
    if state.mask is not None:
        mask &= state.mask
    state.add(Sparsity(mask, cfg.pattern), state.W * mask, {"density": float(mask.float().mean())})
