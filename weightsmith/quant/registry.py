"""One registry of recipe steps, keyed by name; the engine only ever talks to this interface.

A step is one algorithm module with a typed config class (a pydantic model whose ``name`` field is
a ``Literal`` with the registry key) and one function, registered with :func:`register`. Each step
has a **kind**, which fixes where it may stand in a recipe and how the engine calls it:

=============  ====================================================================================
kind           what it does, and how it is called
=============  ====================================================================================
planner        before everything: measures per-layer sensitivity in a first pass and turns the
               measurements into per-layer rules for the second (``measure``/``plan``, see
               :class:`Planner`): bitalloc (grids), owl (a pruner's per-block sparsity)
transform      rewrites a layer group's weights and statistics for the steps after it (AWQ's
               per-channel scale, folded into the op producing the input);
               ``fn(state, cfg, ctx) -> None``
pruner         zeroes weights and records a sparsity mask; ``fn(state, cfg, ctx) -> None``
quantizer      puts the weights on a grid (one per layer); ``fn(state, cfg, ctx) -> None``
correction     adds to a quantized or pruned result (LoRC's low-rank factors); ``fn(state, cfg, ctx)``
block          works on a whole block after its layers, with autograd, on the block's
               quantized-path inputs and (when it asks) float targets;
               ``fn(block_ctx, cfg) -> dict`` (see ``engine/passes.py``)
=============  ====================================================================================

Layer steps receive a :class:`~weightsmith.quant.pipeline.LayerState` (the stacked weights of the
layers that read one input, their statistics, the group's grid and the encodings so far) and edit
it in place. Each step declares what it **needs** (:data:`NEEDS`), as a function of its config:
the engine computes the union and nothing more — a recipe whose steps need nothing runs without
calibration data at all.

Third-party steps register through the entry-point group ``weightsmith.steps``: each entry point
names a module (imported, it calls :func:`register`) or a callable (called once with no arguments).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import WeightsmithError

log = logging.getLogger(__name__)

KINDS = ("planner", "transform", "pruner", "quantizer", "correction", "block")
ORDER = {k: i for i, k in enumerate(KINDS)}  # a recipe lists its steps in non-decreasing order of kind
NEEDS = {
    "H": "the input statistic H = XᵀX/N of every layer group (one calibration forward)",
    "input_norms": "per-input-channel norms ‖X_j‖₂ (one calibration forward, no XᵀX)",
    "dXX": "(X̃ − X)ᵀX/N between the float and the quantized path (a second, float forward)",
    "float_block": "a float copy of each block, run on the quantized-path inputs (block steps)",
    "float_targets": "the float model's block outputs on its own float-path inputs (block steps)",
    "grad": "autograd on the block's forward (block steps)",
    "out_fisher": "per output channel of every layer, the mean squared gradient of the float model's loss (one forward and backward)",
    "block_fisher": "per layer, the block-diagonal empirical Fisher of per-window loss gradients (whole-model forward+backward passes, engine/fisher.py)",
    "weight_fisher": "per weight, the mean loss gradient and diagonal Fisher on the general and on a domain calibration set (two whole-model forward+backward passes)",
}
PLUGIN_GROUP = "weightsmith.steps"


@dataclass
class LayerStats:
    """Input statistics of one layer group, with ``X`` (N, in) the group's inputs on the quantized
    path (the block's earlier layers, and all earlier blocks, already quantized) and ``X̃`` (N, in)
    the same layer's inputs on the float path (the unquantized model on the same tokens).

    - ``H = XᵀX / N`` (in, in) float32 — the Hessian of ‖(W − Q) X‖² up to a factor 2; None when
      no step needs it;
    - ``n``: the number of token rows N;
    - ``dXX = (X̃ − X)ᵀ X / N`` (in, in) float32, so ``dXX[i, j] = mean_t ΔX[t, i]·X[t, j]`` — the
      GPTAQ paper's ``ΔX Xᵀ`` in its (features × tokens) layout. ``H + dXX = X̃ᵀX / N``. The mean
      runs over the rows that carry the float path. None unless a step needs ``dXX``;
    - ``norms``: ``‖X_j‖₂ / sqrt(N)`` per input channel (= ``sqrt(diag H)``), always filled;
    - ``out_fisher``: per output row of the stacked group, the mean squared gradient of the float
      model's loss at that output (``engine/fisher.py``); None unless a planner needs ``out_fisher``;
    - ``grads``: gradient statistics of the whole-model pass, per layer of the group (``block_fisher``:
      one (nblocks, B, B) tensor per layer); None unless a step needs them.
    """

    H: Optional[torch.Tensor]
    n: int = 0
    dXX: Optional[torch.Tensor] = None
    norms: Optional[torch.Tensor] = None
    out_fisher: Optional[torch.Tensor] = None  # (rows of the stacked group,) float32: engine/fisher.py; planners only
    grads: Optional[dict] = None  # {"block_fisher" | "grad_general" | ...: [per layer of the group]}: engine/fisher.py


@dataclass
class QuantResult:
    """What the grid solvers (RTN, the GPTQ family) return for one stacked weight matrix."""

    weight: torch.Tensor  # (out, in) float32, dequantized: every value lies on the grid
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) float32 holding integers in [0, 2**bits - 1]
    g_idx: torch.Tensor  # (in,) int32: the group of each input column
    info: dict = field(default_factory=dict)  # e.g. {"damp": 0.01}
    latent: Optional[torch.Tensor] = None  # (out, in) the values that were rounded (GPTQ: compensated weights)


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    config_cls: type
    fn: Callable
    doc: str
    needs: Callable[[Any], frozenset]  # cfg -> the statistics it needs (keys of NEEDS)
    produces: tuple[str, ...] = ()  # encoding kinds it always adds ("grid", "sparsity", "lowrank") or "input_scale"
    requires: tuple[str, ...] = ()  # it needs one of these encodings from an earlier step
    clip_search: bool = False  # a quantizer's default for grid.clip_search
    float_samples: Callable[[Any], Optional[int]] = lambda cfg: None  # samples that carry the float path (None: all)
    summary: Optional[Callable[[list[dict]], dict]] = None  # report rows -> entries of the report's summary
    cell: Optional[Callable[[dict], str]] = None  # report row -> this step's cell of the per-layer table
    planner: Optional["Planner"] = None
    produces_fn: Optional[Callable[[Any], tuple]] = None  # cfg -> what it adds, when that depends on its options
    # (lm, cfg, step_cfg, ids, layer_names, directory, progress, rules) -> {key: store with get(layer)}: the step computes
    # its own whole-model gradient statistics (e.g. over several rounds) instead of the engine's default for its need
    gradients: Optional[Callable] = None

    def outputs(self, cfg) -> frozenset:
        """What the step configured as ``cfg`` adds (``produces``, or its function of the config)."""
        return frozenset(self.produces_fn(cfg) if self.produces_fn is not None else self.produces)


@dataclass(frozen=True)
class Planner:
    """A planner step's two halves. ``measure(W, stats, grid, cfg, sizes, qcfg)`` runs in the first pass for
    every layer group and returns JSON-able measurements; ``plan(groups, cfg, qcfg)`` turns the
    measurements of all groups (``[{"layers": [...], "block": i, "numel": n, "measure": ...}]``) into
    per-layer rules (``[{"match": regex, "grid": {...}}]`` or ``"steps": {step: {option: value}}``) and
    a JSON-able summary.

    Optional: ``finish_block(entries, cfg)``, called after each block of the first pass with that
    block's entries, may replace measurements that only make sense against the whole block (OWL's
    outlier count against the block's mean score) by JSON-able ones — ``measure`` may then return
    tensors, held until the block is done; ``check(cfg, qcfg)`` refuses, when the configuration is
    built, a recipe the planner cannot plan for (before any work)."""

    measure: Callable
    plan: Callable
    needs: frozenset | Callable = frozenset({"H"})  # or cfg -> frozenset
    finish_block: Optional[Callable] = None
    check: Optional[Callable] = None

    def needs_of(self, cfg) -> frozenset:
        return frozenset(self.needs(cfg) if callable(self.needs) else self.needs)


_REGISTRY: dict[str, Step] = {}
_FAMILIES: list[tuple[frozenset, Callable[[list[str]], str]]] = []
_loaded = False


def _const(s):
    fs = frozenset(s)
    for n in fs:
        if n not in NEEDS:
            raise ValueError(f"unknown need {n!r}; known: {', '.join(NEEDS)}")
    return lambda cfg: fs


def register(name: str, config_cls: type, *, kind: str, needs=(), produces=(), requires: tuple = (),
             clip_search: bool = False, float_samples: Callable | None = None, summary: Callable | None = None,
             cell: Callable | None = None, planner: Planner | None = None, gradients: Callable | None = None):
    """Decorator registering ``fn`` as step ``name``. ``needs`` is a set of :data:`NEEDS` keys or a
    function ``cfg -> set`` (when they depend on the step's options); so may ``produces`` be (a function
    ``cfg -> tuple``; ``Step.produces`` then holds what the default configuration adds, ``Step.outputs(cfg)``
    what this one does)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    need_fn = needs if callable(needs) else _const(needs)
    produces_fn = produces if callable(produces) else None
    if produces_fn is not None:
        produces = tuple(produces_fn(config_cls())) if _defaults_ok(config_cls) else ()

    def deco(fn):
        _REGISTRY[name] = Step(name, kind, config_cls, fn, (fn.__doc__ or "").strip().split("\n")[0], need_fn, tuple(produces),
                               tuple(requires), clip_search, float_samples or (lambda cfg: None), summary, cell, planner, produces_fn,
                               gradients)
        return fn

    return deco


def _defaults_ok(config_cls) -> bool:
    try:
        config_cls()
        return True
    except Exception:  # noqa: BLE001 - a config without defaults: no static part of produces
        return False


def register_family(members: set[str], canonical: Callable[[list[str]], str]) -> None:
    """``canonical(parts)`` maps the parts of a ``+``-joined name, all in ``members``, to a registry
    key, or raises :class:`WeightsmithError` saying why the combination is invalid."""
    _FAMILIES.append((frozenset(members), canonical))


def canonical_name(name: str) -> str:
    """The registry key for ``name`` (itself, or a ``+`` combination resolved by its family)."""
    _load_builtin()
    if name in _REGISTRY or not isinstance(name, str) or "+" not in name:
        return name
    parts = [p.strip() for p in name.split("+")]
    for members, canonical in _FAMILIES:
        if all(p in members for p in parts):
            return canonical(parts)
    unknown = [p for p in parts if p not in _REGISTRY]
    if unknown:
        raise WeightsmithError(f"unknown step {unknown[0]!r} in {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    raise WeightsmithError(f"step {name!r} combines parts that do not compose into one algorithm")


def get(name: str) -> Step:
    key = canonical_name(name)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise WeightsmithError(f"unknown step {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def steps() -> list[Step]:
    _load_builtin()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import awq, bitalloc, foem, gptaq, gptq, hlq, lorc, rescomp, rtn, tune_scales  # noqa: F401 - modules register on import
    from ..prune import armor, dpruner, icbs, magnitude, obert, owl, sparsegpt, wanda  # noqa: F401 - modules register on import
    _load_plugins()


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the built-in steps
            log.warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if callable(obj) and not isinstance(obj, type):
            obj()
