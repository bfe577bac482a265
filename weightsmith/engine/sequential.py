"""True-sequential statistics in a single forward pass over the calibration chunks.

Every chunk of calibration samples runs through the block in a greenlet of its own (a coroutine
on the one OS thread, so torch keeps a single thread pool). A forward pre-hook on each linear
layer accumulates the layer's input statistics and parks the chunk's greenlet. When every chunk
is parked (or finished), the earliest parked group of layers has complete statistics: it is
rewritten by the algorithm, and the chunks parked there resume — through the rewritten weights. So later layers see the outputs of the already
quantized earlier ones, each chunk's forward runs exactly once, and no graph is traced.

Layers that read the same input tensor (q/k/v, gate/up) form one group with one Hessian; the
groups and their order come from one recording forward of the block (:func:`discover_groups`).

Parked chunks keep their intermediate tensors alive, so peak memory grows with the calibration
set. ``low_memory`` replays instead: one pass per group that stops at the group's first layer,
then a final pass for the outputs — one chunk in flight at a time, about twice the forward work.

Float path (only when the algorithm needs it, e.g. GPTAQ; :class:`FloatPath`): a float copy of the
block runs each chunk's float-path inputs in a greenlet of its own (a :class:`_FloatStepper`). When
the quantized-path chunk reaches a group's first layer, it steps its float twin to the same layer,
takes that layer's float input ``X̃``, adds ``(X̃ − X)ᵀX`` to the group's statistics and drops it;
the float twin stays parked there until the next group. The float outputs become the next
block's float-path inputs. This doubles the activation memory (parked float twins, and the float
hidden states carried between blocks) and adds one float forward per block; ``low_memory``
replays the float forward up to each group instead (one chunk in flight), non-sequential mode
steps both paths through all groups in its one statistics pass. The float path may carry only the
first chunks (``FloatPath.chunks`` shorter than the quantized path's): ``dXX`` is then estimated
on those samples while ``H`` still sees all of them, and the float forward and ``dXX`` cost
shrink in proportion. Without a float path nothing of this runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import greenlet
import torch
from torch import nn

from ..errors import WeightsmithError
from .stats import HessianStats


@dataclass(eq=False)
class Group:
    index: int
    names: list[str] = field(default_factory=list)  # relative layer names, in call order
    done: bool = False

    @property
    def leader(self) -> str:
        return self.names[0]


def discover_groups(block: nn.Module, layers: dict[str, nn.Module], args: tuple, kwargs: dict) -> tuple[list[Group], list[str]]:
    """Run ``block`` once, record which layers read which input tensor, and in which order."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a, rel=rel: calls.append((rel, a[0]))) for rel, m in layers.items()]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[Group] = []
    inputs: list[tuple[torch.Tensor, Group]] = []
    seen: set[str] = set()
    for rel, x in calls:
        if rel in seen:
            continue
        seen.add(rel)
        for t, g in inputs:
            if t is x:
                g.names.append(rel)
                break
        else:
            g = Group(len(groups), [rel])
            groups.append(g)
            inputs.append((x, g))
    return groups, [rel for rel in layers if rel not in seen]


class _Stop(Exception):
    """Ends a replay pass once the target group's input has been seen."""


class FloatPath:
    """The float (unquantized-model) path through one block: a float copy of the block, its linear
    layers (same relative names as the quantized block's) and the float-path inputs of the first
    ``len(chunks)`` calibration chunks (all of them, or a prefix: see the module docstring)."""

    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], chunks: list[tuple[tuple, dict]]):
        self.block, self.layers, self.chunks = block, layers, chunks
        self.outputs: list[torch.Tensor | None] = [None] * len(chunks)

    def forward(self, c: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.block(*self.chunks[c][0], **self.chunks[c][1])
        return out[0] if isinstance(out, tuple) else out


class _FloatStepper:
    """One chunk's float forward in its own greenlet, stepped from group leader to group leader."""

    def __init__(self, fp: FloatPath, c: int):
        self.fp, self.c = fp, c
        self.let = greenlet.greenlet(self._run)
        self.caller: greenlet.greenlet | None = None

    def _run(self):
        return ("done", self.fp.forward(self.c))

    def _step(self):
        self.caller = greenlet.getcurrent()
        self.let.parent = self.caller  # a finished forward returns to whoever stepped it
        return self.let.switch()

    def input_of(self, leader: str) -> torch.Tensor:
        """Advance to ``leader``'s forward pre-hook and return its float-path input."""
        while not self.let.dead:
            kind, *payload = self._step()
            if kind == "x" and payload[0] == leader:
                return payload[1]
            if kind == "done":
                self.fp.outputs[self.c] = payload[0]
        raise WeightsmithError(f"the float path of chunk {self.c} never reached layer {leader}")

    def finish(self) -> torch.Tensor:
        while not self.let.dead:
            kind, *payload = self._step()
            if kind == "done":
                self.fp.outputs[self.c] = payload[0]
        return self.fp.outputs[self.c]

    def close(self) -> None:
        if self.let and not self.let.dead:
            self.let.parent = greenlet.getcurrent()
            self.let.throw(greenlet.GreenletExit)


class SequentialRunner:
    """Runs calibration chunks through one block, rewriting layer groups as their statistics complete.

    ``on_group(group, H, stats)`` is called (in the calling thread) with the finished statistics of
    each group — ``H`` and the group's :class:`~weightsmith.quant.registry.LayerStats` (with ``dXX``
    when ``float_path`` is given; its float outputs are then in ``float_path.outputs`` after
    :meth:`run`) — and must rewrite the group's weights in place. With ``sequential=False`` all statistics come from the unmodified block and a
    second pass computes the outputs.
    """

    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], groups: list[Group],
                 on_group: Callable[..., None], sequential: bool = True, low_memory: bool = False,
                 float_path: FloatPath | None = None, reduce: Callable | None = None, full_stats: bool = True,
                 rewrites: bool = True):
        self.block, self.layers, self.groups = block, layers, groups
        self.full_stats = full_stats  # False: per-channel norms only (no XᵀX)
        self.rewrites = rewrites  # False (a measuring pass): on_group leaves the weights alone, so one pass gives the outputs
        self.reduce = reduce  # (H_sum, n) -> summed over data-parallel ranks (engine/distributed.py)
        self.on_group, self.sequential, self.low_memory = on_group, sequential, low_memory
        self.float_path = float_path
        self._steppers: dict[int, _FloatStepper] = {}
        self._chunk_of_let: dict[greenlet.greenlet, int] = {}
        self._cur_chunk = -1
        self._park = sequential and not low_memory
        self._target: Group | None = None
        self._group_of = {rel: g for g in groups for rel in g.names}
        self._rel_of = {id(m): rel for rel, m in layers.items()}
        self._stats: dict[int, HessianStats] = {}
        self._driver: greenlet.greenlet | None = None

    # -- hook (runs inside a chunk's greenlet) ------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple):
        rel = self._rel_of[id(module)]
        g = self._group_of.get(rel)
        if g is None or g.done:
            return None
        if rel != g.leader:
            if not self._park:
                return None  # the leader's statistics stand for the whole group
            raise WeightsmithError(f"layer {rel} ran before {g.leader}, which reads the same input: the block's call order differs between inputs")
        if self._target is not None and g is not self._target:
            return None  # replay: a later group, still in float; its turn comes
        x = args[0]
        st = self._stats.get(g.index)
        if st is None:
            st = self._stats[g.index] = HessianStats(x.shape[-1], x.device, self.float_path is not None, self.full_stats)
        c = self._chunk_of_let.get(greenlet.getcurrent(), self._cur_chunk)
        if c in self._steppers:
            st.add(x, self._steppers[c].input_of(rel))
        else:
            st.add(x)
        if self._target is not None:
            raise _Stop
        if self._park:
            self._driver.switch(("wait", g))  # park until the group is rewritten
        return None

    def _forward(self, args: tuple, kwargs: dict):
        with torch.no_grad():
            out = self.block(*args, **kwargs)
        return ("done", out[0] if isinstance(out, tuple) else out)

    def _float_hook(self, module: nn.Module, args: tuple):
        st = self._stepping.get(greenlet.getcurrent())
        if st is not None:
            st.caller.switch(("x", self._frel_of[id(module)], args[0]))
        return None

    def _finish(self, g: Group) -> None:
        st = self._stats.pop(g.index, None)
        if st is None:
            h, stats = None, None
        else:
            stats = st.layer_stats(f"layer {g.leader}", self.reduce)
            h = stats.H
        self.on_group(g, h, stats)
        g.done = True

    def _new_stepper(self, c: int) -> None:
        self._drop_stepper(c)
        st = self._steppers[c] = _FloatStepper(self.float_path, c)
        self._stepping[st.let] = st

    def _drop_stepper(self, c: int, finish: bool = False) -> None:
        """Forget chunk ``c``'s float twin (if any): run it to its end first (``finish``: its
        output lands in ``float_path.outputs``) or abandon it."""
        st = self._steppers.pop(c, None)
        if st is None:
            return
        if finish:
            st.finish()
        else:
            st.close()
        del self._stepping[st.let]

    # -- driver ----------------------------------------------------------------------------------------
    def run(self, chunks: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
        # grad mode is thread-local and every greenlet shares the thread: the forwards' no_grad blocks
        # enter and exit interleaved, so the mode is fixed for the whole run and restored after it
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return self._run(chunks)
        finally:
            torch.set_grad_enabled(grad)

    def _run(self, chunks: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
        hooks = [m.register_forward_pre_hook(self._hook) for m in self.layers.values()]
        fp = self.float_path
        self._stepping: dict[greenlet.greenlet, _FloatStepper] = {}
        if fp is not None:
            leaders = {g.leader for g in self.groups}
            missing = leaders - set(fp.layers)
            if missing:
                raise WeightsmithError(f"the float copy of the block lacks layer {sorted(missing)[0]}")
            self._frel_of = {id(fp.layers[r]): r for r in leaders}
            hooks += [fp.layers[r].register_forward_pre_hook(self._float_hook) for r in leaders]
        try:
            if self._park:
                return self._run_chunks(chunks)
            if self.sequential:  # low-memory replay: one partial pass per group
                for g in self.groups:
                    self._target = g
                    self._run_plain(chunks, float_steps=True)
                    self._finish(g)
                self._target = None
                outs = self._run_plain(chunks)
                if fp is not None:
                    fp.outputs = [fp.forward(c) for c in range(len(fp.chunks))]
                return outs
            outs = self._run_plain(chunks, float_steps=True, float_outputs=True)  # statistics from the unchanged block
            for g in self.groups:
                self._finish(g)
            return self._run_plain(chunks) if self.rewrites else outs
        finally:
            for h in hooks:
                h.remove()
            for st in self._steppers.values():
                st.close()
            self._steppers.clear()

    def _run_plain(self, chunks: list[tuple[tuple, dict]], float_steps: bool = False, float_outputs: bool = False) -> list[torch.Tensor | None]:
        outs = []
        for c, (args, kwargs) in enumerate(chunks):
            self._cur_chunk = c
            floats = float_steps and self.float_path is not None and c < len(self.float_path.chunks)
            if floats:
                self._new_stepper(c)
            try:
                outs.append(self._forward(args, kwargs)[1])
            except _Stop:
                outs.append(None)
            if floats:
                self._drop_stepper(c, finish=float_outputs)
        return outs

    def _run_chunks(self, chunks: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
        self._driver = greenlet.getcurrent()
        lets = [greenlet.greenlet(self._forward) for _ in chunks]
        self._chunk_of_let = {gl: c for c, gl in enumerate(lets)}
        if self.float_path is not None:
            for c in range(min(len(chunks), len(self.float_path.chunks))):
                self._new_stepper(c)
        outputs: list = [None] * len(chunks)
        waiting: dict[int, Group] = {}
        runnable = list(range(len(chunks)))
        try:
            while True:
                for c in runnable:
                    kind, payload = lets[c].switch(*chunks[c]) if not lets[c] else lets[c].switch()
                    if kind == "done":
                        outputs[c] = payload
                        self._drop_stepper(c, finish=True)  # the float twin runs to its end: its output, and its memory freed
                    else:
                        waiting[c] = payload
                if not waiting:
                    return outputs
                g = min(waiting.values(), key=lambda x: x.index)
                self._finish(g)
                runnable = sorted(c for c, x in waiting.items() if x is g)
                for c in runnable:
                    del waiting[c]
        finally:
            for gl in lets:  # unwind parked chunks (GreenletExit) when the run failed
                if gl:
                    gl.throw(greenlet.GreenletExit)
