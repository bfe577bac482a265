"""One layer group through the layer steps of a recipe (transforms, pruners, the quantizer, corrections).

The stacked weights ``W`` (out, in) of the layers that read one input, their statistics and the
group's grid (per-layer rules applied) form a :class:`LayerState`; every layer step edits it in
place, in recipe order: ``fn(state, cfg, ctx)``. A step that needs to compare variants of the rest
of the recipe (AWQ's verify) runs them itself through ``ctx.rest(variant)`` and returns
:data:`FINISHED`: its chosen variant is then the result.

- a transform may rescale the input channels: the following steps see ``W·diag(s)`` and
  ``H' = diag(1/s) H diag(1/s)`` (:meth:`LayerState.rescale`), and the engine folds ``1/s`` into the
  op producing the input;
- a pruner zeroes weights and adds a :class:`~weightsmith.encodings.Sparsity`; every later step
  keeps the mask (``state.mask``);
- the quantizer adds a :class:`~weightsmith.encodings.Grid` (one per layer);
- a correction adds to the result (LoRC: a :class:`~weightsmith.encodings.LowRank` per layer).

All errors the report shows are in the original input space: the effective weight is
``W·diag(1/s)``, compared with the original ``W`` under the original ``H``; the RTN baseline is plain
RTN of the original ``W`` on the group's grid, computed only when there is an ``H`` and a grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import GridConfig
from ..encodings import Encoding, Grid, Sparsity
from ..errors import NumericalError
from . import registry
from .registry import LayerStats, QuantResult

FINISHED = "finished"


def scaled_stats(stats: LayerStats | None, s: torch.Tensor) -> LayerStats | None:
    """Statistics of the input ``x / s``."""
    if stats is None:
        return None
    inv = 1.0 / s
    outer = inv[:, None] * inv[None, :]
    return replace(stats, H=None if stats.H is None else stats.H * outer, dXX=None if stats.dXX is None else stats.dXX * outer,
                   norms=None if stats.norms is None else stats.norms * inv)


@dataclass
class LayerState:
    """A layer group as the layer steps see it (rows of its layers stacked, ``sizes`` rows each)."""

    W0: torch.Tensor  # (out, in) the original weights
    W: torch.Tensor  # (out, in) the weights now, in the current input space — what the model will hold
    stats: LayerStats | None  # statistics of the current input space (None: data-free)
    grid: GridConfig
    sizes: list[int]
    encodings: list[Encoding] = field(default_factory=list)
    input_scale: torch.Tensor | None = None  # s: the input is x / s (folded into its producer)
    reference: torch.Tensor | None = None  # the weights the first encoding step started from
    info: dict = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor | None:
        m = [e.mask for e in self.encodings if isinstance(e, Sparsity)]
        return m[-1] if m else None

    @property
    def H(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats.H

    def find(self, kind: type):
        return next((e for e in reversed(self.encodings) if isinstance(e, kind)), None)

    def rescale(self, s: torch.Tensor) -> None:
        s = s.to(self.W.device, torch.float32)
        self.W = self.W * s
        self.stats = scaled_stats(self.stats, s)
        self.input_scale = s if self.input_scale is None else self.input_scale * s

    def add(self, enc: Encoding, weight: torch.Tensor, info: dict | None = None) -> None:
        """A step's result: the new weights and the encoding that describes them."""
        if self.reference is None:
            self.reference = self.W
        self.W = weight
        self.encodings.append(enc)
        self.info.update(info or {})

    def set_grid(self, res: QuantResult) -> None:
        mask = self.mask
        w = res.weight if mask is None else res.weight * mask
        self.add(Grid(self.grid.bits, self.grid.group_size, self.grid.sym, res.scale, res.zero, res.g_idx, res.latent), w, res.info)

    def copy(self) -> "LayerState":
        return replace(self, encodings=list(self.encodings), info=dict(self.info))

    @property
    def effective(self) -> torch.Tensor:
        """The weights in the original input space."""
        return self.W if self.input_scale is None else self.W / self.input_scale


class StepContext:
    """What a layer step may use besides its state: where it is, whether the group's input can absorb
    a scale, round-to-nearest results shared by the steps (with clip search the costly part), and
    the rest of the recipe."""

    def __init__(self, steps: list, *, where: str = "", foldable: bool = True, why_not: str = "", rtn_cache: dict | None = None):
        self.steps, self.where, self.foldable, self.why_not = steps, where, foldable, why_not
        self._rtn = rtn_cache if rtn_cache is not None else {}
        self.position = 0

    def rtn(self, W: torch.Tensor, grid: GridConfig) -> QuantResult:
        from .rtn import rtn_quantize

        key = (id(W), grid.model_dump_json())
        hit = self._rtn.get(key)
        if hit is None or hit[0] is not W:
            hit = self._rtn[key] = (W, rtn_quantize(W, grid))
        return hit[1]

    def rest(self, state: LayerState, start: int = 0, stop: int | None = None) -> LayerState:
        """Run the steps after the current one (``[start:stop]`` of them) on ``state`` (a copy the caller made); returns it."""
        after = self.steps[self.position + 1 :]
        part = after[start:stop]
        run_steps(state, part, StepContext(part, where=self.where, foldable=self.foldable, why_not=self.why_not, rtn_cache=self._rtn))
        return state

    def next_of_kind(self, kind: str) -> int | None:
        """The index, among the steps after the current one, of the first of ``kind``."""
        after = self.steps[self.position + 1 :]
        return next((i for i, s in enumerate(after) if registry.get(s.name).kind == kind), None)


LAYER_KINDS = ("transform", "pruner", "quantizer", "correction")


def layer_steps(steps) -> list:
    return [s for s in steps if registry.get(s.name).kind in LAYER_KINDS]


def run_steps(state: LayerState, steps: list, ctx: StepContext) -> None:
    for i, st in enumerate(steps):
        ctx.position = i
        if registry.get(st.name).fn(state, st, ctx) == FINISHED:
            return


@dataclass
class GroupResult:
    state: LayerState
    baseline: torch.Tensor | None  # plain RTN of the original W on the group's grid (None: no H or no grid)

    @property
    def weight(self) -> torch.Tensor:
        return self.state.W

    @property
    def effective(self) -> torch.Tensor:
        return self.state.effective


def run_group(ws: list[torch.Tensor], stats: LayerStats | None, settings, *, where: str = "", foldable: bool = True,
              why_not: str = "") -> GroupResult:
    """Run the layer steps of ``settings`` (a :class:`~weightsmith.config.LayerSettings`) on the layers
    ``ws`` (each (out_l, in) float32) that share ``stats``."""
    if hasattr(settings, "layer_settings"):  # a whole QuantizeConfig: its recipe without rules
        from ..config import LayerSettings

        settings = LayerSettings(settings.grid, tuple(settings.steps))
    W0 = torch.cat([w.float() for w in ws], 0)
    steps = layer_steps(settings.steps)
    state = LayerState(W0, W0, stats, settings.grid, [w.shape[0] for w in ws])
    ctx = StepContext(steps, where=where, foldable=foldable, why_not=why_not)
    run_steps(state, steps, ctx)
    if not torch.isfinite(state.W).all():
        raise NumericalError(f"{','.join(s.name for s in steps)} produced NaN/Inf for {where}")
    baseline = None
    if stats is not None and stats.H is not None and any(isinstance(e, Grid) for e in state.encodings):
        baseline = ctx.rtn(W0, settings.grid).weight
    return GroupResult(state, baseline)


def output_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(E H Eᵀ)``: the summed squared output error of the rows of ``E`` on inputs with ``H = XᵀX/N``."""
    return float(((E @ H) * E).sum())
