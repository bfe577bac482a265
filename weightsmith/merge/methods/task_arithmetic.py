"""Task arithmetic: add the weighted task vectors ``θ_i − θ_base`` to the base.

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR 2023, arXiv:2212.04089).

``θ = θ_base + λ Σ_i w_i (θ_i − θ_base)``, divided by ``Σ_i w_i`` with ``normalize`` (default
off, as in mergekit). See ``_task_vectors.py`` for the exact definition shared with TIES/DARE.
"""
from __future__ import annotations

from ..registry import Method, TensorJob, register
from ._task_vectors import common_params, merge_task_vectors


def task_arithmetic(job: TensorJob):
    return merge_task_vectors(job)


register(Method(
    name="task_arithmetic", fn=task_arithmetic, base="required", min_inputs=1,
    params=common_params(normalize=False, rescale=None),
    reference="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    description="base + lambda · Σ weight · task vector",
))
