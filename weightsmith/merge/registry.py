"""Merge methods: one module per method (``merge/methods/``), one :func:`register` call each.

A method is a per-tensor function ``fn(job) -> tensor``: the driver (``merge/driver.py``) reads the
inputs of one output tensor lazily (``job.inputs[i].load()``), calls the method and writes the
result; it names no method. What a method declares here is all the configuration needs to check
a merge before any work: its parameters (with their type, default and scope), whether it needs a
base model, how many inputs it takes, whether it draws random numbers (then it gets a seeded
generator per tensor and input, independent of the order of work, so a resumed run is identical).

A method may also declare ``prepare(cfg, plan, sources, seed, progress) -> (context, report)``: a
whole-model pass the driver runs once, after the plan is checked and before any tensor is written
(aTLAS fits its coefficients there). ``context`` reaches every job as ``job.context``; ``report``
goes into the merge's ``report.json`` (under ``fit``) and, with ``context``'s digest, into the
resume key.

Parameter scopes follow mergekit's: ``shared`` (one value per tensor, from the slice's or the
top-level ``parameters``), ``input`` (per input model, the base included: linear's ``weight``) and
``non_base`` (per input model other than the base: task arithmetic's ``weight``, ``density``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from ..errors import WeightsmithError

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool, int or str: the type a setting is converted to
    scope: Literal["shared", "input", "non_base"] = "shared"
    default: Any = REQUIRED
    help: str = ""
    choices: tuple | None = None  # allowed values (after conversion), when the set is closed
    parse: Callable[[Any], Any] | None = None  # a converter of its own (raises ValueError) instead of ``kind``

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def convert(self, value: Any, where: str) -> Any:
        """``value`` as this parameter's type; a one-line error naming ``where`` otherwise."""
        try:
            if self.parse is not None:
                out = self.parse(value)
            elif self.kind is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, str) and value.lower() in ("true", "false"):
                    out = value.lower() == "true"
                else:
                    raise ValueError
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            else:
                out = value if isinstance(value, str) or isinstance(value, bool) else str(value)
        except (TypeError, ValueError):
            what = self.help if self.parse is not None else f"a {self.kind.__name__}"
            raise WeightsmithError(f"{where}: parameter {self.name} must be {what}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise WeightsmithError(f"{where}: parameter {self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return out


@dataclass
class Input:
    """One model's tensor for the output tensor being merged: read only when ``load()`` is called
    (a fresh float tensor in the job's compute dtype each time: methods may modify it)."""

    model: str  # the model's path as the configuration names it
    index: int  # its position among the distinct models of the merge
    params: dict[str, Any]
    is_base: bool
    _load: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        return self._load()


@dataclass
class TensorJob:
    key: str
    shape: tuple[int, ...]
    inputs: list[Input]  # in the configuration's order; the base is one of them when the merge has one
    params: dict[str, Any]  # the shared parameters, resolved for this tensor
    dtype: torch.dtype  # compute dtype: float32, or float64 when an input is float64
    seed: int = 0
    context: Any = None  # what the method's ``prepare`` pass returned (None without one)

    @property
    def base(self) -> Input | None:
        return next((i for i in self.inputs if i.is_base), None)

    @property
    def non_base(self) -> list[Input]:
        return [i for i in self.inputs if not i.is_base]

    def generator(self, inp: Input) -> torch.Generator:
        """A generator seeded from (seed, tensor name, model): the same numbers whatever the order
        of work, in a fresh process or a resumed one."""
        h = hashlib.sha256(f"{self.seed}\0{self.key}\0{inp.model}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[TensorJob], torch.Tensor]
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional"] = "optional"  # "required": the merge needs a base_model among its inputs
    min_inputs: int = 1  # inputs, the base included
    max_inputs: int | None = None
    seeded: bool = False
    reference: str = ""
    description: str = ""
    check: Callable[[str, dict, list[dict]], None] | None = field(default=None)  # (tensor key, shared, per non-base input) → raise
    prepare: Callable[..., tuple[Any, dict]] | None = field(default=None)  # whole-model pass before the tensors (module docstring)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    from . import methods  # noqa: F401 - each module registers itself


def get(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise WeightsmithError(f"unknown merge_method {name!r}; weightsmith merges with: {', '.join(names())}")
    return _METHODS[name]


def names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)
