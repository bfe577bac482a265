"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024 (arXiv:2306.11695; reference code locuslab/wanda, read, not copied). The score of weight
``W_ij`` is ``|W_ij| · ‖X_j‖₂`` with ``X_j`` the j-th input feature over the calibration tokens;
weights are compared within each output row (the paper's key choice), and no weight is updated.
N:M patterns keep the N best scores of every M consecutive inputs. Needs only the per-channel input
norms (``LayerStats.norms``), not ``XᵀX``.
"""
from __future__ import annotations

from typing import Literal

from ..errors import WeightsmithError
from ..quant.registry import register
from .common import PruneFields, prune_state


class WandaConfig(PruneFields):
    name: Literal["wanda"] = "wanda"


def prune(state, cfg: WandaConfig, ctx) -> None:
    """Wanda (Sun et al. 2024): zero the lowest |W_ij|·‖X_j‖ within each output row."""
    if state.stats is None or state.stats.norms is None:
        raise WeightsmithError("wanda needs the calibration inputs' norms")
    norms = state.stats.norms.to(state.W.device, state.W.dtype)
    prune_state(state, cfg, lambda w, _rows: w.abs() * norms[None, :], per_row=True)


register("wanda", WandaConfig, kind="pruner", needs={"input_norms"}, produces=("sparsity",))(prune)
