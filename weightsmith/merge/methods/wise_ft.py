"""WiSE-FT: interpolate a fine-tuned model's weights with its base ("robust fine-tuning").

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (arXiv:2109.01903).

``θ = (1 − α) θ_base + α θ_ft``: a linear merge of the base and one fine-tune with weights
``1 − α`` and ``α`` (mergekit writes it as ``linear`` with those two weights; both give the same
tensors). Not a mergekit method name: a weightsmith one.
"""
from __future__ import annotations

import torch

from ...errors import WeightsmithError
from ..registry import Method, Param, TensorJob, register


def wise_ft(job: TensorJob) -> torch.Tensor:
    a = job.params["alpha"]
    out = job.base.load().mul_(1 - a)
    return out.add_(job.non_base[0].load(), alpha=a)


def _check(key: str, shared: dict, inputs: list[dict]) -> None:
    if not 0 <= shared["alpha"] <= 1:
        raise WeightsmithError(f"wise_ft: alpha must lie in [0, 1], got {shared['alpha']}")


register(Method(
    name="wise_ft", fn=wise_ft, base="required", min_inputs=2, max_inputs=2,
    params=(Param("alpha", float, "shared", 0.5, "weight of the fine-tuned model (0: the base, 1: the fine-tune)"),),
    reference="Wortsman et al. 2022, Robust fine-tuning of zero-shot models (arXiv:2109.01903)",
    description="(1 - alpha)·base + alpha·fine-tune", check=_check,
))
