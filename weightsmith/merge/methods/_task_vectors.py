"""What the task-vector methods (task arithmetic, TIES, DARE) share: task vectors, their
sparsification and the sign-consensus sum. The definitions follow mergekit's
``generalized_task_arithmetic`` (checked against it to 1e-6, ``bench/bench_merge.py``):

1. ``δ_i = θ_i − θ_base`` for every input but the base;
2. sparsified, when the method does (TIES: keep the ``density`` fraction of largest ``|δ_i|``;
   DARE: keep each entry with probability ``density``), then rescaled as ``rescale`` says;
3. weighted: ``δ_i ← w_i δ_i``;
4. with sign consensus (TIES, DARE-TIES): the elected sign per entry is that of ``Σ_i δ_i`` (+ where
   the sum is 0); an entry of ``δ_i`` counts only where its sign is the elected one (a zeroed entry
   never counts); ``Δ = Σ_i [counted] δ_i`` and the divisor ``Σ_i [counted] w_i`` (1 where 0) —
   the *disjoint mean* when normalising. Without consensus ``Δ = Σ_i δ_i``, divisor ``Σ_i w_i``
   (1 where |·| < 1e-8);
5. ``Δ ← Δ / divisor`` when ``normalize``; ``Δ ← λ Δ``; ``θ = θ_base + Δ``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...errors import WeightsmithError
from ..registry import Input, Param, TensorJob

RESCALE_HELP = "true (match the L1 norm of the task vector, as mergekit), false, or density (divide by the density, as the DARE paper)"


def parse_rescale(v) -> str:
    if v is True or (isinstance(v, str) and v.lower() in ("true", "l1")):
        return "l1"
    if v is False or (isinstance(v, str) and v.lower() in ("false", "none")):
        return "none"
    if isinstance(v, str) and v.lower() == "density":
        return "density"
    raise ValueError(v)


def common_params(normalize: bool, rescale: bool | None) -> tuple[Param, ...]:
    ps = [
        Param("weight", float, "non_base", help="the task vector's weight"),
        Param("normalize", bool, "shared", normalize, "divide the summed task vectors by the sum of the weights"),
        Param("lambda", float, "shared", 1.0, "scale of the merged task vector"),
        Param("int8_mask", bool, "shared", False, "mergekit's memory option for the sign mask (no effect on the result here)"),
    ]
    if rescale is not None:
        ps += [Param("density", float, "non_base", 1.0, "fraction of the task vector's entries kept"),
               Param("rescale", str, "shared", "l1" if rescale else "none", RESCALE_HELP, parse=parse_rescale)]
    return tuple(ps)


def check_density(method: str) -> Callable[[str, dict, list[dict]], None]:
    def check(key: str, shared: dict, inputs: list[dict]) -> None:
        for p in inputs:
            if "density" in p and not 0 < p["density"] <= 1:
                raise WeightsmithError(f"{method}: density must lie in (0, 1], got {p['density']} (for {key})")
    return check


def rescale(kept: torch.Tensor, full: torch.Tensor, how: str, density: float) -> torch.Tensor:
    if how == "density":
        return kept.div_(density)
    if how == "l1":
        before, after = float(full.abs().sum()), float(kept.abs().sum())
        if before >= 1e-7 and after >= 1e-7:  # mergekit's guard
            kept.mul_(before / after)
    return kept


def magnitude(delta: torch.Tensor, inp: Input, job: TensorJob) -> torch.Tensor:
    """Keep the ``k = max(1, ⌊density·n⌋)`` entries of largest magnitude. The order is
    ``argsort(|δ|, descending)`` as in mergekit, so that ties in magnitude (frequent in bf16
    checkpoints) keep the same entries."""
    density = inp.params["density"]
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    top = torch.argsort(delta.abs().reshape(-1), descending=True)[:k]
    kept = torch.zeros_like(delta).reshape(-1)
    kept[top] = delta.reshape(-1)[top]
    del top
    return rescale(kept.reshape(delta.shape), delta, job.params["rescale"], density)


def bernoulli(delta: torch.Tensor, inp: Input, job: TensorJob) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density``, from the job's seeded generator."""
    density = inp.params["density"]
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=job.generator(inp))
    return rescale(delta * mask, delta, job.params["rescale"], density)


def merge_task_vectors(job: TensorJob, sparsify=None, consensus: bool = False) -> torch.Tensor:
    base = job.base.load()
    others = job.non_base
    if not others:
        return base
    weights = [inp.params["weight"] for inp in others]
    if not consensus:  # one task vector at a time: base, the sum and one input in memory
        mixed = torch.zeros_like(base)
        for inp, w in zip(others, weights):
            d = inp.load().sub_(base)
            if sparsify is not None:
                d = sparsify(d, inp, job)
            mixed.add_(d, alpha=w)
            del d
        divisor = sum(weights)
        if job.params["normalize"] and abs(divisor) >= 1e-8:
            mixed.div_(divisor)
    else:  # the elected sign needs every weighted task vector first
        deltas = torch.empty((len(others), *base.shape), dtype=base.dtype)
        for i, (inp, w) in enumerate(zip(others, weights)):
            d = inp.load().sub_(base)
            if sparsify is not None:
                d = sparsify(d, inp, job)
            deltas[i] = d.mul_(w)
            del d
        positive = deltas.sum(dim=0) >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, weights):
            counted = torch.where(positive, d > 0, d < 0)
            mixed.add_(torch.where(counted, d, 0))
            divisor.add_(torch.where(counted, w, 0.0))
        del deltas
        if job.params["normalize"]:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    if job.params["lambda"] != 1:
        mixed.mul_(job.params["lambda"])
    return base.add_(mixed)
