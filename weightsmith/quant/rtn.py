"""Round-to-nearest: every weight goes to its nearest grid point; the grid's scale optionally comes
from an MSE clip search (``grid.clip_search``). Needs no calibration data."""
from __future__ import annotations

from typing import Literal

import torch

from ..config import GridConfig, Strict
from . import grid as G
from .registry import QuantResult, register


class RTNConfig(Strict):
    name: Literal["rtn"] = "rtn"


def rtn_quantize(w: torch.Tensor, grid: GridConfig) -> QuantResult:
    w = w.float()
    scale, zero, g_idx = G.grouped_params(w, grid)
    q = G.dequantize_groups(w, scale, zero, g_idx, grid.bits)
    return QuantResult(q, scale, zero, g_idx, latent=w)


@register("rtn", RTNConfig, kind="quantizer", produces=("grid",))
def quantize(state, cfg: RTNConfig, ctx) -> None:
    """Round to nearest on the grid (with --clip-search: MSE-optimal range per group)."""
    state.set_grid(ctx.rtn(state.W, state.grid))
