"""Block-wise tuning of the grid's scales by gradient descent on the block output error.

A block step (kind ``block``), run after a quantizer has put the block's layers on a grid — the
engine's hook for learned rounding and block reconstruction, with one built-in use. In the spirit
of the block-wise optimisers that tune quantization parameters against the float block with a
straight-through estimate of rounding (OmniQuant's learnable clipping, Shao et al. ICLR 2024;
AutoRound's signed-gradient rounding, Cheng et al. 2023; FlexRound, Lee et al. ICML 2023); written
for this engine, not taken from any of them.

For every layer of the block with a grid, each (row, group) scale gets a learnable log-factor
``θ`` (0 at the start): ``s' = s·exp(θ)``, and the layer's weight is rounded again on the new scale:

    W(θ) = s'·(clamp(⌊W_q / s'⌉ + z, 0, 2^b − 1) − z)

with ``W_q`` the quantizer's result. The rounding is passed straight through as a *constant* in the
backward pass (``ste: constant``, the default: the codes' derivative is taken as 0, so
``∂W/∂s' = q − z``): for small changes of the scale the codes stay the quantizer's — GPTQ's
compensated codes — and the scales move along the exact gradient; a scale that moves far enough
re-rounds its codes in the forward. So at ``θ = 0`` the layer is exactly the quantizer's result, and
the zero points and the grid stay as they are (the tuned scales are what the checkpoint stores;
bits per weight do not change). ``ste: identity`` is the LSQ-style estimator instead (``∂⌊x⌉/∂x = 1``,
re-rounding the values the solver rounded, ``Grid.latent``); measured on the pico Llama at W3 g32 it
*raises* the block error for every learning rate tried (1e-4 … 1e-2): moving a scale re-rounds GPTQ's
latent values, and flipped codes break the column-by-column compensation they were computed with.

``θ`` is fitted with Adam on minibatches of the block's quantized-path inputs against a target: the
float block on the same inputs (``target: float_block``, the default) or the float model's block
outputs on its own inputs (``float_path``). The block output error ``Σ‖B_q(X) − T‖² / Σ‖T‖²`` over
the samples used is measured before and after; the tuned scales are kept only when it went down
(otherwise the report says so and the quantizer's result stays).
"""
from __future__ import annotations

import time
from typing import Literal, Optional

import torch
from pydantic import Field

from ..config import Strict
from ..encodings import Grid
from transformers.pytorch_utils import Conv1D

from ..model.adapter import get_weight, set_weight
from .registry import register


class TuneScalesConfig(Strict):
    name: Literal["tune_scales"] = "tune_scales"
    iters: int = Field(60, ge=1, description="Adam iterations per block")
    lr: float = Field(3e-3, gt=0.0, description="learning rate on the log-scale factors")
    batch: int = Field(2, ge=1, description="calibration samples per iteration")
    samples: Optional[int] = Field(None, ge=1, description="calibration samples used (default: all, or those with a float path)")
    target: Literal["float_block", "float_path"] = Field("float_block", description="float_block: the float block on the quantized-path inputs; "
                                                          "float_path: the float model's outputs (carries the float path through the model)")
    ste: Literal["constant", "identity"] = Field("constant", description="the rounding's backward: constant (the quantizer's codes re-rounded "
                                                 "in the forward, dW/ds = q - z) or identity (LSQ-style, re-rounding the solver's latent values)")
    seed: int = 0


def _rows(args: tuple, kwargs: dict, a: int, b: int) -> tuple[tuple, dict]:
    """Samples ``a:b`` of a chunk: tensors whose leading size is the chunk's batch size are sliced."""
    n = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n and n > 1:
            return v[a:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return tuple(cut(x) for x in args), {k: cut(v) for k, v in kwargs.items()}


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def qweight(g: Grid, theta: torch.Tensor, mask: torch.Tensor | None, ste: str, ongrid: torch.Tensor) -> torch.Tensor:
    s = g.scale * torch.exp(theta)
    gi = g.g_idx.long()
    S, Z = s[:, gi], g.zero[:, gi].float()
    x = (g.latent if ste == "identity" else ongrid) / S
    if ste == "identity":
        x = x + (torch.round(x) - x).detach()  # straight-through rounding: d⌊x⌉/dx = 1
        q = torch.clamp(x + Z, 0, 2**g.bits_ - 1)
    else:  # the codes re-rounded in the forward, held constant in the backward: dW/ds = q − z
        q = torch.clamp(torch.round(x) + Z, 0, 2**g.bits_ - 1).detach()
    W = S * (q - Z)
    return W if mask is None else W * mask


def tune(ctx, cfg: TuneScalesConfig) -> None:
    """Tune each grid scale of the block by gradient descent on the block output error (rounding passed straight through)."""
    from ..encodings import Sparsity

    t0 = time.perf_counter()
    tuned = []
    for name, rec in ctx.records.items():
        g = next((e for e in rec.encodings if isinstance(e, Grid)), None)
        if g is None or (cfg.ste == "identity" and g.latent is None) or rec.rel not in ctx.modules:  # constant: no latent needed
            continue
        sp = next((e for e in rec.encodings if isinstance(e, Sparsity)), None)
        m = ctx.modules[rec.rel]
        w0 = get_weight(m).detach().clone()
        tuned.append((rec, g, m, None if sp is None else sp.mask.to(w0), w0))
    if not tuned:
        return
    if cfg.target == "float_path":
        n_chunks = len(ctx.targets)
    else:
        n_chunks = len(ctx.inputs)
    batches = []
    for c in range(n_chunks):
        args, kw = ctx.inputs[c]
        n = (args[0] if args else kw["hidden_states"]).shape[0]
        for a in range(0, n, cfg.batch):
            batches.append((c, a, min(a + cfg.batch, n)))
    if cfg.samples is not None:
        keep, total = [], 0
        for b in batches:
            if total >= cfg.samples:
                break
            keep.append(b)
            total += b[2] - b[1]
        batches = keep
    inputs = [_rows(*ctx.inputs[c], a, b) for c, a, b in batches]
    with torch.no_grad():
        if cfg.target == "float_path":
            targets = [ctx.targets[c][a:b] for c, a, b in batches]
        else:
            targets = [_out(ctx.float_block(*x[0], **x[1])) for x in inputs]
    params = {f"{rec.rel}.weight": None for rec, *_ in tuned}
    for p in ctx.block.parameters():
        p.requires_grad_(False)
    thetas = [torch.zeros_like(g.scale, requires_grad=True) for _, g, _, _, _ in tuned]
    conv = [isinstance(m, Conv1D) for _, _, m, _, _ in tuned]  # HF Conv1D stores (in, out)

    def weights(th):
        for (rec, g, m, mask, w0), t, tr in zip(tuned, th, conv):
            w = qweight(g, t, mask, cfg.ste, w0)
            params[f"{rec.rel}.weight"] = w.t() if tr else w
        return params

    def error(th) -> float:
        num = den = 0.0
        with torch.no_grad():
            w = weights(th)
            for x, t in zip(inputs, targets):
                o = _out(torch.func.functional_call(ctx.block, w, x[0], x[1]))
                num += float(((o - t) ** 2).sum())
                den += float((t * t).sum())
        return num / den if den > 0 else 0.0

    before = error(thetas)
    opt = torch.optim.Adam(thetas, lr=cfg.lr)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(cfg.seed + ctx.index)).tolist()
    for it in range(cfg.iters):
        k = order[it % len(order)]
        x, t = inputs[k], targets[k]
        opt.zero_grad(set_to_none=True)
        o = _out(torch.func.functional_call(ctx.block, weights(thetas), x[0], x[1]))
        loss = ((o - t) ** 2).mean()
        loss.backward()
        opt.step()
    after = error(thetas)
    kept = after < before
    if kept:
        with torch.no_grad():
            for (rec, g, m, mask, w0), t in zip(tuned, thetas):
                w = qweight(g, t, mask, cfg.ste, w0)
                g.scale = (g.scale * torch.exp(t)).detach().contiguous()
                set_weight(m, w.detach())
    info = {"block_error_before": before, "block_error_after": after if kept else before, "kept": kept,
            "iters": cfg.iters, "samples": sum(b - a for _, a, b in batches), "seconds": round(time.perf_counter() - t0, 2)}
    if not kept:
        info["why"] = f"tuning did not lower the block output error ({after:.4e} ≥ {before:.4e}): the quantizer's scales stay"
    for rec, *_ in tuned:
        rec.row["tune_scales"] = info


def _needs(cfg: TuneScalesConfig) -> frozenset:
    return frozenset({"grad", "float_block" if cfg.target == "float_block" else "float_targets"})


def _summary(rows: list[dict]) -> dict:
    infos = {r["block"]: r["tune_scales"] for r in rows if isinstance(r.get("tune_scales"), dict)}
    if not infos:
        return {}
    b = [i["block_error_before"] for i in infos.values()]
    a = [i["block_error_after"] for i in infos.values()]
    return {"tune_scales": {"blocks": len(infos), "kept": sum(i["kept"] for i in infos.values()),
                            "mean_block_error_before": sum(b) / len(b), "mean_block_error_after": sum(a) / len(a)}}


def _cell(row: dict) -> str:
    i = row.get("tune_scales")
    return "" if not isinstance(i, dict) else f"{i['block_error_before']:.3e} → {i['block_error_after']:.3e}"


register("tune_scales", TuneScalesConfig, kind="block", needs=_needs, requires=("grid",), summary=_summary, cell=_cell,
         float_samples=lambda cfg: cfg.samples if cfg.target == "float_path" else None)(tune)
