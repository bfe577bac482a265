"""Magnitude pruning: drop the weights of smallest absolute value.

The classic baseline (e.g. Han, Pool, Tran, Dally, "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015; the layer-wise one-shot variant SparseGPT and Wanda
compare against). Within each layer: the smallest ``sparsity`` fraction of ``|W|`` over the whole
matrix (unstructured), or the smallest ``M − N`` of every ``M`` consecutive inputs (N:M). Needs no
calibration data.
"""
from __future__ import annotations

from typing import Literal

from ..quant.registry import register
from .common import PruneFields, prune_state


class MagnitudeConfig(PruneFields):
    name: Literal["magnitude"] = "magnitude"


def prune(state, cfg: MagnitudeConfig, ctx) -> None:
    """Magnitude pruning: zero the smallest |w| of each layer (unstructured or N:M)."""
    prune_state(state, cfg, lambda w, _rows: w.abs(), per_row=False)


register("magnitude", MagnitudeConfig, kind="pruner", produces=("sparsity",))(prune)
