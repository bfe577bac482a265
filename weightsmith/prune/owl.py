"""OWL: non-uniform layer sparsity weighted by each block's share of outlier weights.

Yin, Wu, Zhang, Jaiswal, Chen, Pechenizkiy, Wang, Liu, "Outlier Weighed Layerwise Sparsity (OWL):
A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024 (arXiv:2310.05175; reference
code luuyin/OWL ``lib/prune_all.py``, read, not copied). A planner step (``owl``) placed before a
pruner: ``--method owl,sparsegpt --sparsity 0.7`` (or ``owl,wanda``, ``owl,magnitude``; YAML
``steps: [owl, {name: sparsegpt, sparsity: 0.7}]``). The target is the pruner's own ``sparsity``.

Measure (first pass, float model, input norms only — no ``XᵀX``): every weight's Wanda score
``A_ij = |W_ij| · ‖X_j‖₂``; a weight is an *outlier* when ``A_ij > M · mean(A)``, the mean taken
over all the scored weights of its transformer block. As in the paper, a "layer" of OWL is a
decoder block: all its linear layers are scored together and get one sparsity (so layers reading
one input — q/k/v, gate/up — trivially agree, as the engine's ``check_rules`` requires). The
block's outlier ratio is ``D_b = #outliers / #weights``.

Plan: ratios are mapped linearly (min–max) onto ``[0, 2λ]`` — the largest ratio gets the largest
*density* offset — and shifted so that the mean density is the target's ``1 − S``::

    d_b = 2λ · (D_b − min D) / (max D − min D)
    density_b = d_b − Σ_b n_b d_b / Σ_b n_b + (1 − S),     sparsity_b = 1 − density_b

This is the reference code's normalisation (min–max to ``[0, 2λ]``, then mean shift), with one
change: the mean is weighted by each block's number of scored weights ``n_b``, so the share of
zeros over all pruned weights stays exactly ``S`` even when blocks differ in size (or a rule keeps
some layers of some blocks in float); for the equal blocks of a decoder it is the paper's plain
mean. The spread is exactly ``2λ`` (``max − min``), but the band is centred on ``S`` only when the
ratios are symmetric about their mean: it is ``[S − λ + δ, S + λ + δ]`` with ``δ`` the distance of
the weighted mean of ``d`` from ``λ`` — clipping it onto ``[S − λ, S + λ]`` would break the mean.
When every block has the same ratio, every block gets ``S``. A plan that would put a block at or
beyond 0 or 1 is refused (lower ``lam``).

Each block's sparsity becomes a per-layer rule ``{"steps": {PRUNER: {"sparsity": s_b}}}`` on that
block's layers, which the second pass applies. Unstructured only: an N:M pattern fixes the
sparsity of every layer (refused with the reason).
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..errors import WeightsmithError
from ..quant.registry import Planner, register


class OWLConfig(Strict):
    name: Literal["owl"] = "owl"
    outlier_m: float = Field(5.0, gt=0.0, description="M: a weight is an outlier when its Wanda score |W_ij|·‖X_j‖ exceeds M times its block's mean score")
    lam: float = Field(0.08, ge=0.0, le=0.5, description="λ: the block sparsities span 2λ around the pruner's target (mean kept at the target)")


def _pruner(qcfg):
    from ..quant import registry

    return next((s for s in qcfg.steps if registry.get(s.name).kind == "pruner"), None)


def check(cfg: OWLConfig, qcfg) -> None:
    """A pruner after OWL, unstructured, and no rule of the user's setting its sparsity (the plan would override it)."""
    p = _pruner(qcfg)
    if p is None:
        raise WeightsmithError(f"invalid recipe: owl plans the sparsity of a pruner after it; add one (e.g. {qcfg.recipe},sparsegpt)")
    if p.pattern != "unstructured":
        raise WeightsmithError(f"invalid recipe: owl varies the sparsity per block, but {p.name}:pattern={p.pattern} fixes it "
                               f"({p.pattern} keeps a set share of every group); use pattern=unstructured")
    for r in qcfg.rules:
        if {"sparsity", "pattern"} & set(r.steps.get(p.name, {})):
            raise WeightsmithError(f"invalid configuration: rule {r.match!r} sets {p.name}'s sparsity or pattern, which owl plans per block; "
                                   "drop the rule or the owl step")


def measure(W: torch.Tensor, stats, grid, cfg: OWLConfig, sizes: list[int], qcfg=None) -> dict:
    """The group's Wanda scores (held in memory until its block is done, see :func:`finish_block`)."""
    if stats is None or stats.norms is None:
        raise WeightsmithError("owl needs the calibration inputs' norms")
    return {"scores": W.abs() * stats.norms.to(W.device, W.dtype)[None, :], "sizes": list(sizes)}


def finish_block(entries: list[dict], cfg: OWLConfig) -> None:
    """Count each layer's outliers against the whole block's mean score; keep only the counts."""
    if not entries:
        return
    total = sum(float(e["measure"]["scores"].double().sum()) for e in entries)
    numel = sum(e["measure"]["scores"].numel() for e in entries)
    mean = total / numel
    thr = cfg.outlier_m * mean
    for e in entries:
        s = e["measure"]["scores"]
        per_layer = [int((part > thr).sum()) for part in s.split(e["measure"]["sizes"], 0)]
        e["measure"] = {"outliers": sum(per_layer), "outliers_per_layer": per_layer, "block_mean_score": mean, "threshold": thr}


def block_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """The plan's formula (module docstring): outlier ratios → per-block sparsities, size-weighted mean = ``target``."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [target] * len(ratios)
    d = [2 * lam * (r - lo) / (hi - lo) for r in ratios]
    n = sum(sizes)
    mean_d = sum(x * m for x, m in zip(d, sizes)) / n
    return [1.0 - (x - mean_d + (1.0 - target)) for x in d]


def plan(groups: list[dict], cfg: OWLConfig, qcfg) -> tuple[list[dict], dict]:
    """Per-block outlier ratios → per-block sparsities of the recipe's pruner, as rules."""
    if not groups:
        raise WeightsmithError("owl: no layer group was measured")
    p = _pruner(qcfg)
    blocks: dict[int, dict] = {}
    for g in groups:
        b = blocks.setdefault(g["block"], {"block": g["block"], "layers": [], "numel": 0, "outliers": 0})
        b["layers"].extend(g["layers"])
        b["numel"] += g["numel"]
        b["outliers"] += g["measure"]["outliers"]
    order = sorted(blocks)
    ratios = [blocks[i]["outliers"] / blocks[i]["numel"] for i in order]
    sizes = [blocks[i]["numel"] for i in order]
    sp = block_sparsities(ratios, sizes, p.sparsity, cfg.lam)
    bad = [(i, s) for i, s in zip(order, sp) if not 0.0 <= s < 1.0]
    if bad:
        i, s = bad[0]
        raise WeightsmithError(f"owl: block {i} would get sparsity {s:.4f}, outside [0, 1) (target {p.sparsity}, lam {cfg.lam}); lower lam")
    rules, rows = [], []
    for i, r, s in zip(order, ratios, sp):
        b = blocks[i]
        rules.append({"match": "^(" + "|".join(re.escape(n) for n in b["layers"]) + ")$", "steps": {p.name: {"sparsity": s}}})
        rows.append({"block": i, "layers": b["layers"], "outlier_ratio": r, "sparsity": s, "numel": b["numel"]})
    n = sum(sizes)
    summary = {"planner": cfg.name, "pruner": p.name, "target_sparsity": p.sparsity, "outlier_m": cfg.outlier_m, "lam": cfg.lam,
               "planned_sparsity": sum(s * m for s, m in zip(sp, sizes)) / n, "min_sparsity": min(sp), "max_sparsity": max(sp),
               "blocks": rows}
    return rules, summary


def _plan_step(measurements, cfg, qcfg):
    """OWL (Yin et al. 2024): per-block sparsity of the following pruner from the block's share of outlier Wanda scores."""
    return plan(measurements, cfg, qcfg)


register("owl", OWLConfig, kind="planner", needs=(),
         planner=Planner(measure, plan, frozenset({"input_norms"}), finish_block=finish_block, check=check))(_plan_step)
