"""One registry of layer algorithms, keyed by name; the engine only ever talks to this interface.

An algorithm module defines a typed config class (a pydantic model whose ``name`` field is a
``Literal`` with the registry key) and a function
``quantize(W, H, grid, cfg, base=None, stats=None) -> QuantResult`` and registers both with
:func:`register`. The engine hands every algorithm the same inputs: the layer weight as an
``(out, in)`` float32 matrix, the input statistics ``H = XᵀX / N`` (float32, shared by layers that
read the same input), ``base``, the round-to-nearest result on the same grid (its static group
scales, computed once — with clip search that is the costly part — and also the report's RTN
baseline), and ``stats``, a :class:`LayerStats` (``H`` again, the token count, and — only for an
algorithm registered with ``needs_float_path=True`` — ``dXX``); it writes back what the algorithm
returns.

Combined methods: a name made of ``+``-joined parts (``gptaq+foem``) is looked up as written, and
otherwise resolved by the *family* whose members cover all of its parts (:func:`register_family`):
the family returns the canonical registry key (``foem+gptaq`` → ``gptaq+foem``) or raises a
:class:`WeightsmithError` saying why the combination is invalid. The GPTQ family (gptq.py) is one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import WeightsmithError


@dataclass
class QuantResult:
    """What an algorithm returns for one weight matrix (rows of several layers may be stacked)."""

    weight: torch.Tensor  # (out, in) float32, dequantized: every value lies on the grid
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) float32 holding integers in [0, 2**bits - 1]
    g_idx: torch.Tensor  # (in,) int32: the group of each input column
    info: dict = field(default_factory=dict)  # e.g. {"damp": 0.01}
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None  # (A (out, r), B (r, in)): weight = Q + A·B (LoRC)
    input_scale: torch.Tensor | None = None  # (in,) AWQ scale s: Q approximates W·diag(s); s folded into the producer


@dataclass
class LayerStats:
    """Input statistics of one layer group, with ``X`` (N, in) the group's inputs on the quantized
    path (the block's earlier layers, and all earlier blocks, already quantized) and ``X̃`` (N, in)
    the same layer's inputs on the float path (the unquantized model on the same tokens).

    - ``H = XᵀX / N`` (in, in) float32 — the Hessian of ‖(W − Q) X‖² up to a factor 2;
    - ``n``: the number of token rows N;
    - ``dXX = (X̃ − X)ᵀ X / N`` (in, in) float32, so ``dXX[i, j] = mean_t ΔX[t, i]·X[t, j]`` — the
      GPTAQ paper's ``ΔX Xᵀ`` in its (features × tokens) layout. ``H + dXX = X̃ᵀX / N``. The mean
      runs over the rows that carry the float path (all, or the method's ``float_samples``). None
      unless the algorithm was registered with ``needs_float_path``.
    """

    H: torch.Tensor
    n: int = 0
    dXX: Optional[torch.Tensor] = None
    absmean: Optional[torch.Tensor] = None  # mean |x| per input channel (AWQ); None: AWQ uses sqrt(diag H)


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_cls: type
    quantize: Callable  # (W, H, grid, cfg, base=None, stats=None) -> QuantResult
    needs_hessian: bool
    doc: str
    clip_search: bool  # the method's default for grid.clip_search
    needs_float_path: bool = False  # the engine must carry the float path and fill LayerStats.dXX
    kind: str = "quantizer"  # "quantizer" | "transform" (before it, e.g. awq) | "correction" (after it, e.g. lorc)


_REGISTRY: dict[str, Algorithm] = {}
_FAMILIES: list[tuple[frozenset, Callable[[list[str]], str]]] = []
KINDS = ("quantizer", "transform", "correction")


def register(name: str, config_cls: type, *, needs_hessian: bool, needs_float_path: bool = False, clip_search: bool = False,
             kind: str = "quantizer"):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def deco(fn):
        _REGISTRY[name] = Algorithm(name, config_cls, fn, needs_hessian, (fn.__doc__ or "").strip(), clip_search, needs_float_path, kind)
        return fn

    return deco


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
        raise WeightsmithError(f"unknown method {unknown[0]!r} in {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    raise WeightsmithError(f"method {name!r} combines parts that do not compose into one algorithm")


def get(name: str) -> Algorithm:
    key = canonical_name(name)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise WeightsmithError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from . import awq, foem, gptaq, gptq, lorc, rescomp, rtn  # noqa: F401  (modules register themselves on import)
