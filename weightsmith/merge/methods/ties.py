"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, and take the
disjoint mean of the entries that agree with it.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023,
arXiv:2306.01708).

Trim: keep the ``density`` fraction of entries of largest ``|θ_i − θ_base|`` per tensor (mergekit's
per-tensor top-k, not the paper's global one). Elect: the sign of the sum of the weighted trimmed
task vectors. Disjoint merge: per entry, the sum of the agreeing weighted entries divided by the sum
of their weights (``normalize``, default on). See ``_task_vectors.py``.
"""
from __future__ import annotations

from ..registry import Method, TensorJob, register
from ._task_vectors import check_density, common_params, magnitude, merge_task_vectors


def ties(job: TensorJob):
    return merge_task_vectors(job, sparsify=magnitude, consensus=True)


register(Method(
    name="ties", fn=ties, base="required", min_inputs=1,
    params=common_params(normalize=True, rescale=False),
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    description="trim by magnitude, elect the sign, disjoint mean", check=check_density("ties"),
))
