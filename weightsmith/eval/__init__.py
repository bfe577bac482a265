"""Model quality evaluation: perplexity on text, and KL / top-1 agreement (causal models) or cosine
similarity of hidden states (encoders) against a reference model."""
from __future__ import annotations

from .loading import load_for_eval, model_kind
from .metrics import CausalStats, EncoderStats
from .runner import cut_windows, evaluate, evaluate_many

__all__ = ["CausalStats", "EncoderStats", "cut_windows", "evaluate", "evaluate_many", "load_for_eval", "model_kind"]
