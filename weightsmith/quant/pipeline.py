"""One layer group through a recipe: transforms → quantizer → corrections.

A recipe (``config.QuantizeConfig``) has an ordered list of ``transforms`` (kind "transform", e.g.
``awq``), exactly one quantizer (``method``: rtn, gptq, ...) and an ordered list of ``corrections``
(kind "correction", e.g. ``lorc``). For the stacked weights ``W`` (out, in) of layers that read one
input and their statistics:

- each transform returns a per-input-channel scale ``s`` (``transform(W, stats, grid, cfg, foldable=,
  where=, why_not=) -> (s, info)``); the following steps see ``W·diag(s)`` and
  ``H' = diag(1/s) H diag(1/s)`` (the statistics of the rescaled input ``x/s``), and the engine folds
  ``1/s`` into the op producing the input;
- the quantizer is called as ``quantize(W, H, grid, cfg, base=rtn_of_W, stats=stats)``;
- each correction is applied per layer, ``correct(W_l, Q_l, stats, grid, cfg) -> ((A, B), info)``,
  and the layer's weight becomes ``Q_l + A·B``.

All errors the report shows are in the original input space: the effective weight is
``(Q + A·B)·diag(1/s)``, compared with ``W`` under the original ``H``; the RTN baseline is plain RTN
of the original ``W``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import WeightsmithError
from . import registry
from .registry import LayerStats
from .rtn import rtn_quantize


@dataclass
class GroupResult:
    weight: torch.Tensor  # (out, in) what the model holds: Q(W·diag(s)) + A·B, stacked over the group's layers
    effective: torch.Tensor  # weight·diag(1/s): the weight in the original input space
    baseline: torch.Tensor  # plain RTN of the original W (the report's baseline)
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    lowrank: list = field(default_factory=list)  # per layer: (A, B) or None
    input_scale: torch.Tensor | None = None  # s, to fold into the producer (None: nothing to fold)
    info: dict = field(default_factory=dict)


def scaled_stats(stats: LayerStats, s: torch.Tensor) -> LayerStats:
    """Statistics of the input ``x / s``."""
    inv = 1.0 / s
    outer = inv[:, None] * inv[None, :]
    return replace(
        stats,
        H=stats.H * outer,
        dXX=None if stats.dXX is None else stats.dXX * outer,
        absmean=None if stats.absmean is None else stats.absmean * inv,
    )


def run_group(ws: list[torch.Tensor], stats: LayerStats | None, cfg, *, where: str = "", foldable: bool = True, why_not: str = "") -> GroupResult:
    """Run the recipe ``cfg`` on the layers ``ws`` (each (out_l, in) float32) sharing ``stats``."""
    W0 = torch.cat([w.float() for w in ws], 0)
    grid = cfg.grid
    W, st = W0, stats
    s_total: torch.Tensor | None = None
    info: dict = {}
    verify = False
    for t in cfg.transforms:
        verify = verify or bool(getattr(t, "verify", False))
        algo = registry.get(t.name)
        if st is None:
            raise WeightsmithError(f"{t.name} needs calibration statistics")
        s, tinfo = algo.quantize(W, st, grid, t, foldable=foldable, where=where, why_not=why_not)
        info.update(tinfo)
        if bool((s == 1).all()):
            continue
        s = s.to(W.device, torch.float32)
        W = W * s
        st = scaled_stats(st, s)
        s_total = s if s_total is None else s_total * s
    qalgo = registry.get(cfg.method.name)
    rtn = rtn_quantize(W, grid)
    res = qalgo.quantize(W, None if st is None else st.H, grid, cfg.method, base=rtn, stats=st)
    if not torch.isfinite(res.weight).all():
        raise WeightsmithError(f"{cfg.method.name} produced NaN/Inf for {where}")
    rtn0 = rtn if s_total is None else rtn_quantize(W0, grid)
    baseline = rtn0.weight
    if s_total is not None and verify:  # pick the scale by the quantizer's own result (see quant/awq.py)
        best = (_output_error(res.weight / s_total - W0, stats.H), 1.0, res, W, st, s_total)
        for p in (0.5, 0.0):
            sp = s_total.pow(p)
            Wp, stp = (W0 * sp, scaled_stats(stats, sp)) if p else (W0, stats)
            rp = qalgo.quantize(Wp, stp.H, grid, cfg.method, base=rtn_quantize(Wp, grid) if p else rtn0, stats=stp)
            e = _output_error(rp.weight / sp - W0, stats.H)
            if e < best[0]:
                best = (e, p, rp, Wp, stp, sp)
        e, p, res, W, st, s_total = best
        tr = info.setdefault("awq", {})
        if p == 0.0:
            tr["dropped"] = f"unscaled {cfg.method.name} had the lowest group output error"
            s_total = None
        elif p == 0.5:
            tr["alpha"] = tr.get("alpha", 0) / 2
            tr["halved"] = f"α/2 gave the lowest group output error after {cfg.method.name}"
    info.update(res.info)
    weight = res.weight.clone()
    lowrank: list = [None] * len(ws)
    if cfg.corrections:
        a = 0
        for i, w in enumerate(ws):
            b = a + w.shape[0]
            for c in cfg.corrections:
                calgo = registry.get(c.name)
                (A, B), cinfo = calgo.quantize(W[a:b], weight[a:b], st, grid, c)
                weight[a:b] += A @ B
                if lowrank[i] is not None:  # two corrections: concatenate the factors (rank adds up)
                    A0, B0 = lowrank[i]
                    A, B = torch.cat([A0, A], 1), torch.cat([B0, B], 0)
                lowrank[i] = (A, B)
                info.update(cinfo)
            a = b
    effective = weight if s_total is None else weight / s_total
    return GroupResult(weight, effective, baseline, res.scale, res.zero, res.g_idx, lowrank, s_total, info)


def _output_error(E: torch.Tensor, H: torch.Tensor) -> float:
    return float(((E @ H) * E).sum())


def bits_per_weight(shape: tuple[int, int], bits: int, n_groups: int, sym: bool, g_idx_stored: bool, rank: int = 0) -> dict:
    """Storage of one quantized layer in bits per weight, as packed formats store it.

    ``bits`` per weight; one 16-bit scale per (row, group); for an asymmetric grid one zero point per
    (row, group) at ``bits`` bits (symmetric grids have an implicit zero); a 32-bit ``g_idx`` per input
    column only when act-order leaves columns outside their natural group; the LoRC factors ``A``
    (out, r) and ``B`` (r, in) at 16 bits. AWQ's scales are folded into the model and cost nothing.
    """
    out, cols = shape
    n = out * cols
    parts = {
        "weights": bits * n,
        "scales": 16 * out * n_groups,
        "zeros": 0 if sym else bits * out * n_groups,
        "g_idx": 32 * cols if g_idx_stored else 0,
        "lowrank": 16 * rank * (out + cols),
    }
    return {"bits_per_weight": sum(parts.values()) / n, "bits": parts}


def g_idx_is_natural(g_idx: torch.Tensor, group_size: int) -> bool:
    cols = g_idx.numel()
    gs = cols if group_size == -1 else group_size
    return bool(torch.equal(g_idx.long().cpu(), torch.arange(cols) // gs))
