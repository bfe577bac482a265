"""Typed, strict, versioned configuration. The CLI, a YAML recipe and the Python API all build a
:class:`QuantizeConfig`; validation errors become one-line :class:`WeightsmithError` messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import WeightsmithError

CONFIG_VERSION = 1
# The recipe `weightsmith quantize` runs when no method is given, chosen by bench/results/methods.md
# (SmolLM2-135M by the benchmark protocol): ResComp with its float path on 64 of the 128 calibration
# samples — perplexity W4 g64 34.1 and W3 g64 46.6 against GPTQ's 36.4 and 52.8, at 1.5x GPTQ's time.
DEFAULT_RECIPE = {"name": "rescomp", "float_samples": 64}


def default_recipe_text() -> str:
    """``DEFAULT_RECIPE`` as the CLI spells it, e.g. ``rescomp --float-samples 64``."""
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULT_RECIPE.items() if k != "name")
    return f"{DEFAULT_RECIPE['name']} {opts}".strip()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GridConfig(Strict):
    """The integer grid every weight lands on: ``w ≈ (q - zero) * scale`` with ``q`` in [0, 2^bits-1]."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(64, description="input columns sharing one scale; -1 = one scale per output row")
    sym: bool = Field(True, description="symmetric grid (zero fixed at 2^(bits-1)); False = asymmetric")
    clip_search: Optional[bool] = Field(None, description="search a shrink factor of the range per group minimising the Lp error; None = the method's default (GPTQ on, RTN off)")
    clip_grid: int = Field(100, ge=2)
    clip_maxshrink: float = Field(0.8, gt=0.0, lt=1.0)
    clip_norm: float = Field(2.4, gt=0.0)

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 2:
            raise ValueError("group_size must be -1 (per output row) or at least 2")
        return v


class CalibConfig(Strict):
    """Calibration data: a text file, a .jsonl with a ``text`` field, or a directory of them.
    ``path=None`` samples calibration text from the model itself (seeded)."""

    path: Optional[str] = None
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0


def parse_steps(method: Any) -> list:
    """A recipe's steps, in order, each a mapping with a ``name`` (or a typed step config).

    Accepts ``"gptq"``, ``"awq,gptq+foem,lorc"`` (comma = steps in order), ``{"name": "gptq", ...}``,
    a typed config, or a list of any of these (``[awq, {name: gptq, act_order: true}, {name: lorc, rank: 16}]``).
    """
    if method is None:
        return []
    if isinstance(method, BaseModel):
        return [method]
    if isinstance(method, str):
        names = [n.strip() for n in method.split(",")]
        if not all(names):
            raise WeightsmithError(f"invalid configuration: method: empty step in {method!r}")
        return [{"name": n} for n in names]
    if isinstance(method, dict):
        if "name" not in method:
            raise WeightsmithError("invalid configuration: method: a step must be a name or a mapping with a 'name'")
        return [dict(method)]
    if isinstance(method, (list, tuple)):
        out: list = []
        for m in method:
            if isinstance(m, (list, tuple)):
                raise WeightsmithError("invalid configuration: method: a step cannot be a list")
            out.extend(parse_steps(m))
        return out
    raise WeightsmithError(f"invalid configuration: method: expected a name, a mapping or a list of steps, got {type(method).__name__}")


def _step_name(step: Any) -> str:
    return step.name if isinstance(step, BaseModel) else str(step["name"])


def _step_kind(step: Any) -> str:
    from .quant import registry

    return registry.get(_step_name(step)).kind


def resolve_step(step: Any, kind: str | None = None) -> BaseModel:
    """The typed config of one step (through the registry); ``kind`` checks the step's kind."""
    from .quant import registry

    name = _step_name(step)
    algo = registry.get(name)
    if kind is not None and algo.kind != kind:
        raise WeightsmithError(f"invalid configuration: {name} is a {algo.kind}, not a {kind}")
    if isinstance(step, BaseModel):
        if not isinstance(step, algo.config_cls):
            raise WeightsmithError(f"invalid configuration: step {name} has config type {type(step).__name__}")
        return step
    try:
        return algo.config_cls(**step)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise WeightsmithError(f"invalid configuration: method.{loc}: {err['msg']} (step {name})") from None


def split_steps(steps: list) -> tuple[Any, list, list]:
    """``(quantizer, transforms, corrections)`` from an ordered step list; enforces the recipe's rules:
    transforms, then exactly one quantizer (round-to-nearest when none is given), then corrections;
    no step twice."""
    quantizer = None
    transforms: list = []
    corrections: list = []
    seen: set[str] = set()
    for st in steps:
        name, kind = _step_name(st), _step_kind(st)
        if kind == "quantizer":
            if quantizer is not None:
                raise WeightsmithError(f"invalid recipe: two quantizers ({_step_name(quantizer)} and {name}); give exactly one (combine compatible ones with '+')")
            if corrections:
                raise WeightsmithError(f"invalid recipe: {_step_name(corrections[0])} corrects the quantizer's result and must come after {name}")
            quantizer = st
            continue
        if name in seen:
            raise WeightsmithError(f"invalid recipe: {name} given twice")
        seen.add(name)
        if kind == "transform":
            if quantizer is not None or corrections:
                raise WeightsmithError(f"invalid recipe: {name} transforms the weights before quantization and must come before the quantizer")
            transforms.append(st)
        else:
            corrections.append(st)
    if quantizer is None:
        if not transforms and not corrections:
            raise WeightsmithError("invalid recipe: no steps")
        quantizer = {"name": "rtn"}
    return quantizer, transforms, corrections


def recipe_steps(data: dict) -> list:
    """All steps of a config mapping in order: its ``transforms``, ``method`` (one or more steps), ``corrections``."""
    return [*parse_steps(data.get("transforms")), *parse_steps(data.get("method", DEFAULT_RECIPE)), *parse_steps(data.get("corrections"))]


class QuantizeConfig(Strict):
    version: int = CONFIG_VERSION
    method: Any = Field(default_factory=lambda: dict(DEFAULT_RECIPE), description="the quantizer (recipe steps may be given here, see parse_steps); default: DEFAULT_RECIPE")
    transforms: list[Any] = Field(default_factory=list, description="steps before the quantizer (awq)")
    corrections: list[Any] = Field(default_factory=list, description="steps after the quantizer (lorc)")
    grid: GridConfig = Field(default_factory=GridConfig)
    calib: CalibConfig = Field(default_factory=CalibConfig)
    ignore: list[str] = Field(default_factory=list, description="regexes of layer names kept in float")
    device: str = "cpu"
    chunk_size: int = Field(16, ge=1, description="calibration samples per forward chunk")
    sequential: bool = Field(True, description="true-sequential: later layers see the quantized earlier ones")
    low_memory: bool = Field(False, description="replay the block once per layer group instead of parking all chunks mid-forward")

    @model_validator(mode="before")
    @classmethod
    def _steps(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        q, t, c = split_steps(recipe_steps(data))
        return {**data, "method": resolve_step(q, "quantizer"), "transforms": [resolve_step(x, "transform") for x in t],
                "corrections": [resolve_step(x, "correction") for x in c]}

    @model_validator(mode="after")
    def _resolve_defaults(self) -> "QuantizeConfig":
        if self.grid.clip_search is None:
            from .quant import registry

            self.grid = self.grid.model_copy(update={"clip_search": registry.get(self.method.name).clip_search})
        return self

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"config version {v} is not supported (this weightsmith reads {CONFIG_VERSION})")
        return v

    @property
    def steps(self) -> list:
        return [*self.transforms, self.method, *self.corrections]

    @property
    def recipe(self) -> str:
        """The recipe as a step string, e.g. ``awq,gptq,lorc``."""
        return ",".join(s.name for s in self.steps)

    def to_dict(self) -> dict:
        d = self.model_dump()
        d["method"] = self.method.model_dump()
        d["transforms"] = [t.model_dump() for t in self.transforms]
        d["corrections"] = [c.model_dump() for c in self.corrections]
        return d


def _merge_method(base: Any, val: dict) -> list:
    """Options ``val`` (a mapping, maybe with a ``name``; None values ignored) applied to the steps of ``base``:
    to the step of that name, else (a quantizer name) in place of the quantizer; without a name, to the quantizer."""
    steps = [dict(s) if isinstance(s, dict) else s.model_dump() for s in parse_steps(base)]
    opts = {k: x for k, x in val.items() if x is not None}
    name = opts.get("name")
    for st in steps:
        if name is not None and st["name"] == name:
            st.update(opts)
            return steps
    qi = next((i for i, st in enumerate(steps) if _step_kind(st) == "quantizer"), None)
    if name is None:
        if qi is None:
            steps.append({"name": "rtn", **opts})
        else:
            steps[qi].update(opts)
        return steps
    if _step_kind(opts) != "quantizer":
        raise WeightsmithError(f"invalid configuration: options for {name}, which is not a step of the recipe")
    if qi is None:
        qi = sum(1 for st in steps if _step_kind(st) == "transform")
        steps.insert(qi, opts)
    else:
        steps[qi] = opts  # a different quantizer: drop the old one's options
    return steps


def build_config(data: dict | None = None, **overrides: Any) -> QuantizeConfig:
    """Merge nested ``overrides`` (``{"grid": {"bits": 3}}``; None values ignored) over ``data``.

    ``method`` may be a recipe (``"awq,gptq,lorc"`` or a list of steps), which replaces the recipe of
    ``data``, or a mapping of options for one of its steps (see :func:`_merge_method`).
    """
    merged: dict = dict(data or {})
    for key, val in overrides.items():
        if val is None:
            continue
        if key == "method":
            if isinstance(val, dict):
                steps = _merge_method(recipe_steps(merged), val)
            else:
                steps = parse_steps(val)
            merged.pop("transforms", None)
            merged.pop("corrections", None)
            merged["method"] = steps
        elif isinstance(val, dict):
            base = merged.get(key) or {}
            sub = dict(base)
            sub.update({k: x for k, x in val.items() if x is not None})
            merged[key] = sub
        else:
            merged[key] = val
    try:
        return QuantizeConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise WeightsmithError(f"invalid configuration: {loc}: {err['msg']}") from None


def load_recipe(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise WeightsmithError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise WeightsmithError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"recipe {p} must be a mapping (method:, grid:, calib:)")
    return data
