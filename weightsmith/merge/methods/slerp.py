"""SLERP: spherical linear interpolation between the base and one other model, tensor by tensor.

Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH '85), as applied to weights
by mergekit (Goddard et al. 2024, "Arcee's MergeKit", arXiv:2403.13257).

Each tensor is flattened; with ``a``, ``b`` the base's and the other model's, normalised by their
norms (a norm at or below 1e-8 is left unnormalised), ``d = ⟨â, b̂⟩`` clamped to [-1, 1]. When
``|d| > 0.9995`` the two are (anti-)colinear and the result is the plain lerp ``(1 − t) a + t b``;
otherwise ``θ = acos d`` and the result is ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b`` — the
unnormalised tensors, as mergekit does: the interpolation is between directions, the norms follow
linearly in the coefficients. ``t = 0`` gives the base, ``t = 1`` the other model. Norms and the
dot product are accumulated in float64 over chunks, the result computed in float32.
"""
from __future__ import annotations

import math

import torch

from ..registry import Method, Param, TensorJob, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8
CHUNK = 1 << 20


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.reshape(-1), y.reshape(-1)
    return float(sum(torch.dot(x[i:i + CHUNK].double(), y[i:i + CHUNK].double()) for i in range(0, x.numel(), CHUNK)))


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mergekit's SLERP of two tensors of one shape (see the module docstring)."""
    na, nb = math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b))
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    d = min(1.0, max(-1.0, _dot(a, b) / (na * nb)))
    if abs(d) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(d)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return a.mul_(ca).add_(b, alpha=cb)


def slerp(job: TensorJob) -> torch.Tensor:
    return slerp_tensors(job.params["t"], job.base.load(), job.non_base[0].load())


register(Method(
    name="slerp", fn=slerp, base="required", min_inputs=2, max_inputs=2,
    params=(Param("t", float, "shared", help="0: the base, 1: the other model"),),
    reference="Shoemake 1985 (SLERP); mergekit's weight-space form (arXiv:2403.13257)",
    description="spherical interpolation from the base (t=0) to the other model (t=1)",
))
