"""Per-window quality metrics, computed in float32 and summed in float64 Python floats.

* perplexity: ``exp(mean over windows of the mean next-token cross-entropy of the window)``;
* KL(reference ‖ model) and top-1 agreement over the predicted positions ``0 .. seqlen-2``;
* cosine similarity of final hidden states over every token position (encoders).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary of the positions that predict a next token
    (all but the last), shape (seqlen - 1, vocab) for one window's logits (seqlen, vocab)."""
    return torch.log_softmax(logits[:-1].float(), dim=-1)


def window_nll(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy of one window: ``logp`` (seqlen - 1, vocab) against labels ``ids[1:]``."""
    labels = ids[1:].to(logp.device).unsqueeze(-1)
    return float(-logp.gather(-1, labels).mean())


def kl_sum(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Σ over positions of KL(ref ‖ model) = Σ_v p_ref (log p_ref − log p_model)."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum(dtype=torch.float64))


def top1_matches(logp_ref: torch.Tensor, logp: torch.Tensor) -> int:
    """Number of positions where the two argmax tokens agree."""
    return int((logp_ref.argmax(dim=-1) == logp.argmax(dim=-1)).sum())


def cosine_sum(hidden: torch.Tensor, hidden_ref: torch.Tensor) -> float:
    """Σ over token positions of the cosine similarity of two (…, hidden) tensors."""
    return float(torch.nn.functional.cosine_similarity(hidden.float(), hidden_ref.float(), dim=-1).sum(dtype=torch.float64))


@dataclass
class CausalStats:
    """Running sums over windows for a causal model (and, optionally, its reference)."""

    windows: int = 0
    positions: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    top1: int = 0

    def add_window(self, logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """Account one window: ``logits`` / ``ref_logits`` (seqlen, vocab), ``ids`` (seqlen,)."""
        logp = log_probs(logits)
        self.windows += 1
        self.positions += logp.shape[0]
        self.nll += window_nll(logp, ids)
        if ref_logits is not None:
            logp_ref = log_probs(ref_logits)
            self.ref_nll += window_nll(logp_ref, ids)
            self.kl += kl_sum(logp_ref, logp)
            self.top1 += top1_matches(logp_ref, logp)

    def perplexity(self) -> float:
        return math.exp(self.nll / self.windows)

    def reference_perplexity(self) -> float:
        return math.exp(self.ref_nll / self.windows)

    def mean_kl(self) -> float:
        return self.kl / self.positions

    def top1_rate(self) -> float:
        return self.top1 / self.positions


@dataclass
class EncoderStats:
    """Running sum of cosine similarities over token positions."""

    positions: int = 0
    cosine: float = 0.0

    def add_batch(self, hidden: torch.Tensor, hidden_ref: torch.Tensor) -> None:
        self.positions += hidden.shape[0] * hidden.shape[1]
        self.cosine += cosine_sum(hidden, hidden_ref)

    def mean_cosine(self) -> float:
        return self.cosine / self.positions
