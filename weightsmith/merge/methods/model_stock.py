"""Model Stock: average the fine-tunes, then pull the average towards the base by an amount set by
the angle between their task vectors.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (arXiv:2403.19522).

With base ``w0`` and fine-tunes ``w_1 … w_N`` (N ≥ 2), ``cos θ`` is the mean over pairs of the
cosine between task vectors ``w_i − w0`` (per tensor, or per row with ``filter_wise``),
``t = N cos θ / (1 + (N − 1) cos θ)`` and the result ``t · mean(w_i) + (1 − t) · w0``. Where the
denominator vanishes (|·| < 1e-6) ``t = 0`` (the base), and norms are clamped at 1e-6, as in
mergekit.
"""
from __future__ import annotations

import torch

from ..registry import Method, Param, TensorJob, register


def model_stock(job: TensorJob) -> torch.Tensor:
    w0 = job.base.load()
    shape = w0.shape
    rows = job.params["filter_wise"]
    w0 = (w0.unsqueeze(0) if w0.ndim == 1 else w0) if rows else w0.reshape(-1)
    others = [i.load() for i in job.non_base]
    ws = [(w.unsqueeze(0) if w.ndim == 1 else w) if rows else w.reshape(-1) for w in others]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=1e-6)
            cos.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    del offsets
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)


register(Method(
    name="model_stock", fn=model_stock, base="required", min_inputs=3,
    params=(Param("filter_wise", bool, "shared", False, "one interpolation ratio per row instead of per tensor"),),
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    description="average of the fine-tunes pulled towards the base by their task vectors' angle",
))
