"""DARE (Drop And REscale): drop each task-vector entry with probability ``1 − density`` and rescale
the rest, then add them linearly (``dare_linear``) or with TIES' sign consensus (``dare_ties``).

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024, arXiv:2311.03099).

The paper rescales the kept entries by ``1/density`` (``rescale: density``: the merged task vector
is then unbiased, ``E[δ̃] = δ``); mergekit's default, kept here for configurations written for it,
rescales so that the L1 norm of the kept entries equals the task vector's (``rescale: true``).
The drop is drawn from a generator seeded by (``--seed``, tensor name, model): the same seed gives
the same merge, in any order and across a resume. See ``_task_vectors.py``.
"""
from __future__ import annotations

from ..registry import Method, TensorJob, register
from ._task_vectors import bernoulli, check_density, common_params, merge_task_vectors


def dare_linear(job: TensorJob):
    return merge_task_vectors(job, sparsify=bernoulli)


def dare_ties(job: TensorJob):
    return merge_task_vectors(job, sparsify=bernoulli, consensus=True)


REF = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"
register(Method(
    name="dare_linear", fn=dare_linear, base="required", min_inputs=1, seeded=True,
    params=common_params(normalize=False, rescale=True), reference=REF,
    description="random drop and rescale, summed", check=check_density("dare_linear"),
))
register(Method(
    name="dare_ties", fn=dare_ties, base="required", min_inputs=1, seeded=True,
    params=common_params(normalize=False, rescale=True), reference=REF,
    description="random drop and rescale, TIES sign consensus", check=check_density("dare_ties"),
))
