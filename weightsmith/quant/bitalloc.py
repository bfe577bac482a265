"""Bit allocation under a size budget: per layer group the grid (bits, group size) that minimises the
measured output error of the whole model's layers, with the bits per weight at most a target.

A planner step (``--target-bpw X``, or ``bitalloc:target_bpw=X`` first in a recipe). Measure → plan →
apply: a first pass over the float model gives each layer group's statistics ``H``; for every
candidate grid (``bits`` × ``group_sizes``) the group is quantized (GPTQ with the recipe's
quantizer options, or RTN) and its error recorded — the relative output error ‖ΔW X‖²/‖W X‖² of each
of its layers, summed (``objective: relative``), the absolute ``tr(E H Eᵀ)`` (``absolute``), or the
estimated loss increase ``½ Σ_i f_i (E H Eᵀ)_ii`` with ``f`` the float model's output Fisher of the layer
(``fisher``, the default; ``engine/fisher.py``: each output weighted by how much the loss cares about it) — with
its storage in bits counted as the report counts them (codes, 16-bit scales, zero points of
asymmetric grids, a permuting ``g_idx``). Choosing one candidate per group to minimise the summed
error under ``Σ bits ≤ X · Σ weights`` is a multiple-choice knapsack, solved by dynamic programming
over the budget: exactly, in units of the costs' greatest common divisor, when that takes at most
200,000 steps; else in ``resolution`` steps with the costs rounded up (the plan never exceeds the budget). The plan becomes per-layer rules; the second pass runs the recipe with them. Layers that
read one input (q/k/v, gate/up) are one group and get one grid.
"""
from __future__ import annotations

import math
import re
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..config import Strict
from ..encodings import Grid
from ..errors import WeightsmithError
from .registry import Planner, register


EXACT_STEPS = 200_000


class BitAllocConfig(Strict):
    name: Literal["bitalloc"] = "bitalloc"
    target_bpw: float = Field(4.0, gt=1.0, le=16.0, description="bits per weight of the quantized layers, at most (as the report counts them)")
    bits: list[int] = Field(default_factory=lambda: [3, 4, 5, 8], description="candidate bit widths (2 bits: add them; on SmolLM2 they "
                            "hurt more than the estimates say, bench/results/target_bpw.md)")
    group_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128], description="candidate group sizes (-1: per output row)")
    measure_with: Literal["recipe", "rtn"] = Field("recipe", description="recipe: the recipe's GPTQ-family quantizer as plain GPTQ (RTN if it has none); rtn: round-to-nearest")
    objective: Literal["relative", "absolute", "fisher"] = Field(
        "fisher", description="summed relative layer output errors; absolute tr(E H Eᵀ); or fisher: Σ_i f_i (E H Eᵀ)_ii, each output "
        "weighted by the float model's mean squared loss gradient there (an estimate of the loss increase; one extra forward+backward)")
    fisher_samples: int = Field(16, ge=1, description="objective fisher: calibration windows of the forward+backward that measures f")
    fisher_labels: Literal["auto", "data", "model"] = Field(
        "auto", description="objective fisher: the loss differentiated is the next-token loss on the text's tokens (data: the "
        "empirical Fisher) or on tokens drawn from the float model's own predictions (model: the true Fisher, the curvature of the KL "
        "to the float model's outputs; causal LMs); auto: model for causal LMs, data (the masked-LM loss) for encoders")
    measure_clip_search: bool = Field(False, description="run the grid's clip search in the measurements too (its cost dominates the first "
                                      "pass: ~10x; the applied plan uses the recipe's own setting either way)")
    resolution: int = Field(4000, ge=100, le=100000, description="budget steps of the knapsack")

    def gradient_request(self) -> dict:
        """What the gradient pass for the ``out_fisher`` need takes (the same contract as the gradient steps')."""
        return {"samples": self.fisher_samples, "labels": self.fisher_labels}

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if not v or any(not 2 <= b <= 8 for b in v):
            raise ValueError("candidate bits must lie in 2..8")
        return sorted(set(v))

    @field_validator("group_sizes")
    @classmethod
    def _gs(cls, v):
        if not v or any(g != -1 and g < 2 for g in v):
            raise ValueError("candidate group sizes must be -1 or at least 2")
        return sorted(set(v))


def _quantizer(cfg, qcfg):
    """The solver the measurements use: plain GPTQ with the recipe quantizer's options, or RTN."""
    from .gptq import GPTQConfig

    q = qcfg.quantizer if qcfg is not None else None
    if cfg.measure_with == "rtn" or q is None or not isinstance(q, GPTQConfig):
        return None
    return GPTQConfig(name="gptq", act_order=q.act_order, static_groups=q.static_groups, damp=q.damp, block_size=q.block_size)


def measure(W: torch.Tensor, stats, grid, cfg: BitAllocConfig, sizes: list[int], qcfg=None) -> list[dict]:
    """Every candidate grid on the group ``W`` (stacked rows of ``sizes``): error and storage."""
    from .gptq import family_quantize
    from .rtn import rtn_quantize

    H = stats.H
    gq = _quantizer(cfg, qcfg)
    den = [float(((w @ H) * w).sum()) for w in W.split(sizes, 0)]
    out = []
    for b in cfg.bits:
        for gs in cfg.group_sizes:
            if gs > W.shape[1]:
                continue
            g = grid.model_copy(update={"bits": b, "group_size": gs, **({} if cfg.measure_clip_search else {"clip_search": False})})
            base = rtn_quantize(W, g)
            res = base if gq is None else family_quantize(W, H, g, gq, base=base, stats=stats)
            E = res.weight - W
            rows = ((E @ H) * E).sum(1)  # (E H Eᵀ)_ii per stacked output row
            errs = [float(r.sum()) for r in rows.split(sizes, 0)]
            enc = Grid(b, gs, g.sym, res.scale, res.zero, res.g_idx)
            bits = sum(enc.bits((W.shape[0], W.shape[1])).values())
            m = {"bits": b, "group_size": gs, "storage_bits": int(bits),
                 "relative": sum(e / d if d > 0 else 0.0 for e, d in zip(errs, den)), "absolute": sum(errs)}
            if stats.out_fisher is not None:
                m["fisher"] = 0.5 * float((stats.out_fisher.double() * rows.double()).sum())
            out.append(m)
    return out


def plan(groups: list[dict], cfg: BitAllocConfig, qcfg=None) -> tuple[list[dict], dict]:
    """The multiple-choice knapsack over the measured groups → (rules, summary)."""
    if not groups:
        raise WeightsmithError("bitalloc: no layer group was measured")
    numel = sum(g["numel"] for g in groups)
    budget = cfg.target_bpw * numel
    opts = [[o for o in g["measure"]] for g in groups]
    if any(not o for o in opts):
        raise WeightsmithError("bitalloc: a layer group has no candidate grid (group sizes larger than its width?)")
    floor = sum(min(o["storage_bits"] for o in os) for os in opts)
    if floor > budget:
        raise WeightsmithError(f"--target-bpw {cfg.target_bpw}: the smallest candidates need {floor / numel:.3f} bits per weight; "
                               "raise the target or add smaller candidates (bits, group sizes)")
    # exact when the costs share a unit that leaves at most EXACT_STEPS budget steps, else `resolution` steps with costs rounded up
    g = 0
    for os in opts:
        for o in os:
            g = math.gcd(g, int(o["storage_bits"]))
    if g and budget / g <= EXACT_STEPS:
        unit, R = float(g), int(budget // g)
    else:
        R = cfg.resolution
        unit = budget / R
    INF = float("inf")
    dp = np.full(R + 1, INF)
    dp[0] = 0.0
    choice = np.zeros((len(opts), R + 1), dtype=np.int16)
    for gi, os in enumerate(opts):
        new = np.full(R + 1, INF)
        pick = np.zeros(R + 1, dtype=np.int16)
        for k, o in enumerate(os):
            c = int(math.ceil(o["storage_bits"] / unit - 1e-9))
            if c > R:
                continue
            cand = np.full(R + 1, INF)
            cand[c:] = dp[: R + 1 - c] + o[cfg.objective]
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        dp, choice[gi] = new, pick
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):
        raise WeightsmithError(f"--target-bpw {cfg.target_bpw}: no plan fits the budget at resolution {R} (raise the resolution)")
    picks = [0] * len(opts)
    b = end
    for gi in range(len(opts) - 1, -1, -1):
        k = int(choice[gi, b])
        picks[gi] = k
        b -= int(math.ceil(opts[gi][k]["storage_bits"] / unit - 1e-9))
    rules, chosen, used = [], [], 0
    for g, os, k in zip(groups, opts, picks):
        o = os[k]
        used += o["storage_bits"]
        rules.append({"match": "^(" + "|".join(re.escape(n) for n in g["layers"]) + ")$", "grid": {"bits": o["bits"], "group_size": o["group_size"]}})
        chosen.append({"layers": g["layers"], "bits": o["bits"], "group_size": o["group_size"], "bits_per_weight": o["storage_bits"] / g["numel"],
                       "error": o[cfg.objective]})
    hist: dict[str, float] = {}
    for g, c in zip(groups, chosen):
        key = f"W{c['bits']} g{c['group_size']}"
        hist[key] = hist.get(key, 0) + g["numel"] / numel
    summary = {"planner": cfg.name, "target_bpw": cfg.target_bpw, "planned_bpw": used / numel, "objective": cfg.objective,
               "predicted_error": float(sum(c["error"] for c in chosen)), "share_of_weights": dict(sorted(hist.items())), "groups": chosen}
    return rules, summary


def _plan_step(measurements, cfg, qcfg):
    """Bit allocation (multiple-choice knapsack): per layer group the grid minimising the measured error under a bits-per-weight budget."""
    return plan(measurements, cfg, qcfg)


def _needs(cfg: BitAllocConfig) -> frozenset:
    return frozenset({"H", "out_fisher"} if cfg.objective == "fisher" else {"H"})


register("bitalloc", BitAllocConfig, kind="planner", needs=(), planner=Planner(measure, plan, _needs))(_plan_step)
