"""Linear merge: the weighted average of the inputs' weights ("model soups").

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (arXiv:2203.05482).

``θ = Σ_i w_i θ_i`` over every input (a base model listed among ``models`` is an input like any
other), divided by ``Σ_i w_i`` when ``normalize`` (the default, as in mergekit). Accumulated in
float32 (float64 for float64 inputs) one input at a time, so the peak is two tensors whatever the
number of models.
"""
from __future__ import annotations

import torch

from ...errors import WeightsmithError
from ..registry import Method, Param, TensorJob, register


def linear(job: TensorJob) -> torch.Tensor:
    acc = torch.zeros(job.shape, dtype=job.dtype)
    for inp in job.inputs:
        acc.add_(inp.load(), alpha=inp.params["weight"])
    if job.params["normalize"]:
        acc.div_(sum(inp.params["weight"] for inp in job.inputs))
    return acc


def _check(key: str, shared: dict, inputs: list[dict]) -> None:
    if shared["normalize"] and sum(p["weight"] for p in inputs) == 0:
        raise WeightsmithError(f"linear: the weights of {key} sum to 0, which normalize cannot divide by "
                               "(set normalize: false or change the weights)")


register(Method(
    name="linear", fn=linear, base="optional",
    params=(Param("weight", float, "input", help="the input's weight"),
            Param("normalize", bool, "shared", True, "divide by the sum of the weights")),
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    description="weighted average of every input", check=_check,
))
