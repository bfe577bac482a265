"""Which op produces a layer group's input, and folding a per-channel scale into it (a transform's, e.g. AWQ's).

No per-architecture code. For each group (layers reading one input tensor) the candidates are, in order:

1. a module whose output *is* the group's input tensor (by identity, from forward hooks) and that
   has a 1-D ``weight`` of the input width — a norm (RMSNorm, LayerNorm: weight and bias);
2. linear layers of the block that ran before the group and whose output width equals the group's
   input width, latest first (up_proj → down_proj through ``act(gate)·up``; v_proj → o_proj through
   the attention when the shapes match; fc1 → fc2 through a ReLU).

A candidate is accepted only when an empirical check passes: on a calibration chunk, dividing the
candidate's output channels by a random positive ``s`` (norm weight and bias; linear rows and bias)
and multiplying the group's weight columns by ``s`` leaves the block's output unchanged (relative
error < 1e-4). That rejects gate_proj (SiLU is not homogeneous), q/k (softmax), GELU MLPs, Gemma's
``(1 + w)`` norms, GQA's v_proj → o_proj, and producers whose output also feeds something else.
Groups with no accepted candidate are not scaled; the reason is kept for the report.

True-sequential engine: a chunk parks at the group's first layer with its input already computed
by the unscaled producer. :class:`FoldSession` records those parked inputs (in the engine's parking
mode) and divides them by ``s`` in place when the scale is folded, so the rest of that forward runs
through exactly the folded model. A linear producer is usually already quantized by then: dividing
its rows by ``s`` keeps it on the grid when its encodings' per-row scales (and low-rank ``A`` rows)
are divided by ``s`` too, which :meth:`FoldSession.fold` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.adapter import get_weight, is_linear, set_weight

CHECK_RTOL = 1e-4


@dataclass
class Producer:
    rel: str | None  # module name inside the block; None: nothing absorbs the scale
    kind: str = "none"  # "norm" | "linear" | "none"
    reason: str = ""


def _out_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _norm_like(m: nn.Module, width: int) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == width and not is_linear(m)


def _out_features(m: nn.Module) -> int:
    return get_weight(m).shape[0]


def scale_producer(m: nn.Module, kind: str, inv: torch.Tensor) -> None:
    """Multiply the producer's output channels by ``inv`` (= 1/s)."""
    with torch.no_grad():
        if kind == "norm":
            m.weight.data.mul_(inv.to(m.weight.dtype))
        else:
            set_weight(m, get_weight(m) * inv[:, None].to(m.weight.dtype))
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor):
            b.data.mul_(inv.to(b.dtype))


def _first_out(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return _out_tensor(block(*args, **kwargs))


def detect_producers(block: nn.Module, groups: list, args: tuple, kwargs: dict, seed: int = 0) -> dict[str, Producer]:
    """``{group leader: Producer}`` for every group of ``block`` (see module doc); the block is left unchanged."""
    mods = dict(block.named_modules())
    args, kwargs = _few_rows(args, kwargs)
    order: dict[str, int] = {}
    outputs: list[tuple[str, torch.Tensor]] = []
    leader_in: dict[str, torch.Tensor] = {}
    leaders = {g.leader for g in groups}
    hooks = []

    def fwd(rel):
        def h(_m, _a, out):
            order.setdefault(rel, len(order))
            t = _out_tensor(out)
            if t is not None and getattr(mods[rel], "weight", None) is not None and mods[rel].weight.ndim == 1:
                outputs.append((rel, t))  # only norm-like outputs are compared by identity: keep no other activations
        return h

    def pre(rel):
        def h(_m, a):
            leader_in.setdefault(rel, a[0])
            order.setdefault("<in>" + rel, len(order))
        return h

    for rel, m in mods.items():
        if rel:
            hooks.append(m.register_forward_hook(fwd(rel)))
        if rel in leaders:
            hooks.append(m.register_forward_pre_hook(pre(rel)))
    try:
        ref = _first_out(block, args, kwargs)
    finally:
        for h in hooks:
            h.remove()

    gen = torch.Generator().manual_seed(seed)
    result: dict[str, Producer] = {}
    for g in groups:
        x = leader_in.get(g.leader)
        if x is None:
            result[g.leader] = Producer(None, reason="never called")
            continue
        width = x.shape[-1]
        t_in = order["<in>" + g.leader]
        cands: list[tuple[str, str]] = []
        for rel, t in outputs:
            if t is x and _norm_like(mods[rel], width) and (rel, "norm") not in cands:
                cands.append((rel, "norm"))
        lin = [rel for rel, m in mods.items() if rel and is_linear(m) and rel not in g.names and order.get(rel, 1 << 30) < t_in
               and _out_features(m) == width]
        cands += [(rel, "linear") for rel in sorted(lin, key=lambda r: -order[r])]
        s = torch.empty(width).uniform_(0.5, 2.0, generator=gen).to(x.device)
        found = None
        for rel, kind in cands:
            if _fold_is_exact(block, [mods[n] for n in g.names], mods[rel], kind, s, args, kwargs, ref):
                found = Producer(rel, kind)
                break
        if found is None:
            tried = ", ".join(r for r, _ in cands) or "none"
            found = Producer(None, reason=f"no op producing the input of {g.leader} absorbs a per-channel scale exactly (candidates tried: {tried})")
        result[g.leader] = found
    return result


def _few_rows(args: tuple, kwargs: dict, k: int = 2) -> tuple[tuple, dict]:
    """The first ``k`` samples of a chunk: tensors whose leading size is the batch size are sliced."""
    b = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
    if b <= k:
        return args, kwargs

    def cut(v):
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == b:
            return v[:k]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return tuple(cut(a) for a in args), {n: cut(v) for n, v in kwargs.items()}


def _fold_is_exact(block, layers, prod, kind, s, args, kwargs, ref) -> bool:
    saved = [(p, p.data.clone()) for p in list(prod.parameters(recurse=False)) + [l.weight for l in layers]]
    try:
        scale_producer(prod, kind, 1.0 / s)
        for l in layers:
            set_weight(l, get_weight(l) * s[None, :])
        out = _first_out(block, args, kwargs)
        if out is None or out.shape != ref.shape:
            return False
        return float((out - ref).norm() / ref.norm().clamp(min=1e-30)) < CHECK_RTOL
    except Exception:  # noqa: BLE001 - a candidate that breaks the forward is simply not a producer
        return False
    finally:
        for p, d in saved:
            p.data.copy_(d)


class FoldSession:
    """Folds AWQ scales into producers during one block's run, keeping parked inputs consistent.

    ``with FoldSession(block, groups, producers, record) as fs:`` — installs pre-hooks on the group
    leaders (before the engine's own, so they see each chunk's input before it parks) that keep a
    reference to the input while ``record`` (the engine's parking mode); ``fs.fold(leader, s, qparams,
    prefix)`` scales the producer and divides the recorded inputs in place.
    """

    def __init__(self, block: nn.Module, groups: list, producers: dict[str, Producer], record: bool):
        self.mods = dict(block.named_modules())
        self.groups, self.producers, self.record = groups, producers, record
        self.pending: dict[str, list[torch.Tensor]] = {g.leader: [] for g in groups}
        self._hooks = []

    def __enter__(self) -> "FoldSession":
        if self.record:
            for g in self.groups:
                if self.producers.get(g.leader, Producer(None)).rel is not None:
                    self._hooks.append(self.mods[g.leader].register_forward_pre_hook(self._pre(g)))
        return self

    def _pre(self, g):
        def h(_m, a):
            if not g.done:
                self.pending[g.leader].append(a[0])
        return h

    def __exit__(self, *exc) -> bool:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.pending = {k: [] for k in self.pending}
        return False

    def release(self, leader: str) -> None:
        self.pending[leader] = []

    def fold(self, leader: str, s: torch.Tensor, records: dict, prefix: str) -> str:
        p = self.producers[leader]
        assert p.rel is not None
        inv = 1.0 / s
        m = self.mods[p.rel]
        scale_producer(m, p.kind, inv.to(m.weight.device))
        rec = records.get(prefix + p.rel) if p.kind == "linear" else None
        if rec is not None:  # keep a quantized producer's encodings consistent with its scaled rows
            from .layers import scale_producer_encodings

            scale_producer_encodings(rec, inv)
        seen: set[int] = set()
        for x in self.pending.get(leader, []):
            if id(x) not in seen:
                seen.add(id(x))
                x.mul_(inv.to(x.device, x.dtype))
        self.pending[leader] = []
        return p.rel


def needs_folding(cfg) -> bool:
    """Whether a step of the recipe leaves an input scale for the engine to fold."""
    from ..quant import registry

    return any("input_scale" in registry.get(s.name).outputs(s) for s in cfg.steps)
