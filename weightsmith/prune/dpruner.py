"""D-Pruner: domain-specific pruning from a general and a domain calibration set.

Zhang, Li, Tang, Zhao, Wang, Zhang, "Pruning as a Domain-specific LLM Extractor", Findings of NAACL 2024
(arXiv:2405.06275; reference code psunlpgroup/D-Pruner, read, not copied). Two whole-model gradient
passes (``engine/fisher.py``, the ``weight_fisher`` need): on the run's (general) calibration windows and
on windows of the domain text (``domain_calib``, sampled like ``--calib``: same count, length, seed).
For each weight, the second-order estimate of the loss change on removing it,
``I = |−ḡ w + ½ F w²|`` (mean gradient ``ḡ``, diagonal empirical Fisher ``F``), is the **general
importance** ``G`` on the general set. The domain loss is then regularised toward the generally
important weights, ``L_dom + λ Σ_m Ĝ_m F̄ (θ_m − θ⁰_m)²`` (``Ĝ = G / mean G`` per layer, ``F̄`` the layer's
mean domain Fisher, so that the term is in loss units), and the score is that regularised loss's removal
estimate: ``S = |−ḡ_dom w + ½ F_dom w²| + λ Ĝ F̄ w²``. The lowest ``sparsity`` of each layer (or of each
row, ``per_row``; or of each N:M group) is pruned, with no update of the kept weights. The authors'
code folds the regulariser into the gradients of a fine-tuning step (LOMO) instead; this is the one-shot,
training-free reading of the same score.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from ..errors import WeightsmithError
from ..quant.registry import register
from .common import PruneFields, prune_state


class DPrunerConfig(PruneFields):
    name: Literal["dpruner"] = "dpruner"
    domain_calib: Optional[str] = Field(None, description="the domain calibration text (file, .jsonl or directory), required")
    reg: float = Field(0.1, ge=0.0, description="λ: weight of the regularisation toward the generally important weights")
    per_row: bool = Field(False, description="compare scores within each output row instead of the whole layer")
    fisher_samples: int = Field(0, ge=0, description="calibration windows of each set in the gradient passes (0 = all)")

    def gradient_request(self) -> dict:
        return {"step": self.name, "domain_calib": self.domain_calib, "samples": self.fisher_samples or None}


def importance(w: torch.Tensor, g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``|−g w + ½ f w²|``: the second-order estimate of the loss change when ``w`` is set to 0."""
    w = w.double()
    return (-g.double() * w + 0.5 * f.double() * w.square()).abs()


def dpruner_score(w, g_gen, f_gen, g_dom, f_dom, reg: float) -> torch.Tensor:
    G = importance(w, g_gen, f_gen)
    Gn = G / G.mean().clamp_min(1e-30)
    fbar = f_dom.double().mean()
    return (importance(w, g_dom, f_dom) + reg * Gn * fbar * w.double().square()).float()


def prune(state, cfg: DPrunerConfig, ctx) -> None:
    """D-Pruner (Zhang et al. 2024): prune by domain importance regularised toward the generally important weights."""
    grads = None if state.stats is None else state.stats.grads
    keys = ("grad_general", "fisher_general", "grad_domain", "fisher_domain")
    if not grads or any(k not in grads for k in keys):
        raise WeightsmithError("dpruner needs the gradients of the general and the domain calibration sets (the weight_fisher need)")
    parts = {k: torch.cat(grads[k], 0).to(state.W.device) for k in keys}
    prune_state(state, cfg, lambda w, rows: dpruner_score(w, *(parts[k][rows] for k in keys), cfg.reg), per_row=cfg.per_row)


register("dpruner", DPrunerConfig, kind="pruner", needs={"weight_fisher"}, produces=("sparsity",))(prune)
