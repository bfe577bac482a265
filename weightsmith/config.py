"""Typed, strict, versioned configuration. The CLI, a YAML recipe and the Python API all build a
:class:`QuantizeConfig`; validation errors become one-line :class:`WeightsmithError` messages."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import WeightsmithError

CONFIG_VERSION = 1
# The recipe `weightsmith quantize` runs when no method is given, chosen by bench/results/methods.md
# (SmolLM2-135M by the benchmark protocol): ResComp with its float path on 64 of the 128 calibration
# samples — perplexity W4 g64 34.1 and W3 g64 46.6 against GPTQ's 36.4 and 52.8, at 1.5x GPTQ's time.
DEFAULT_RECIPE = "rescomp:float_samples=64"


def default_recipe_text() -> str:
    return DEFAULT_RECIPE


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


def _value(v: str) -> Any:
    """A step option's value as written on a command line: a YAML scalar (0.05, true, null), with
    ``N:M`` patterns kept as strings (YAML 1.1 would read ``2:4`` as the number 124)."""
    if re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", v):
        return v.replace(" ", "")
    try:
        out = yaml.safe_load(v)
    except yaml.YAMLError:
        return v
    return v if isinstance(out, dict) else out


def _split_steps(text: str) -> list[str]:
    """Split a recipe at the commas that are not inside brackets (``bitalloc:bits=[3,4],gptq``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


_OPTION_SPLIT = re.compile(r":(?=\s*[A-Za-z_][A-Za-z0-9_.]*\s*=)")


def parse_step_text(text: str) -> dict:
    """``"gptq:damp=0.05:act_order=false"`` → ``{"name": "gptq", "damp": 0.05, "act_order": False}``."""
    name, *opts = [p.strip() for p in _OPTION_SPLIT.split(text)]
    if ":" in name:
        name, bad = name.split(":", 1)
        raise WeightsmithError(f"invalid recipe: step option {bad!r} in {text.strip()!r} is not KEY=VALUE")
    if not name:
        raise WeightsmithError(f"invalid recipe: empty step in {text!r}")
    step: dict = {"name": name}
    for kv in opts:
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise WeightsmithError(f"invalid recipe: step option {kv!r} in {text!r} is not KEY=VALUE")
        step[k.strip()] = _value(v.strip())
    return step


def parse_steps(method: Any) -> list:
    """A recipe's steps, in order, each a mapping with a ``name`` (or a typed step config).

    The one step grammar of the CLI, YAML, Python and the benchmarks: ``"awq,gptq:damp=0.05,lorc:rank=16"``
    (comma = steps in order, ``:KEY=VALUE`` = a step option), ``{"name": "gptq", ...}``, a typed config,
    or a list of any of these (``[awq, {name: gptq, act_order: true}, "lorc:rank=16"]``).
    """
    if method is None:
        return []
    if isinstance(method, BaseModel):
        return [method]
    if isinstance(method, str):
        return [parse_step_text(t) for t in _split_steps(method)]
    if isinstance(method, dict):
        if "name" not in method:
            raise WeightsmithError("invalid recipe: a step must be a name or a mapping with a 'name'")
        return [dict(method)]
    if isinstance(method, (list, tuple)):
        out: list = []
        for m in method:
            if isinstance(m, (list, tuple)):
                raise WeightsmithError("invalid recipe: a step cannot be a list")
            out.extend(parse_steps(m))
        return out
    raise WeightsmithError(f"invalid recipe: expected a name, a mapping or a list of steps, got {type(method).__name__}")


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return "true" if v is True else "false" if v is False else "null" if v is None else str(v)


def step_text(step: Any) -> str:
    """One step in the grammar of :func:`parse_steps`, with the options that differ from its defaults."""
    from .quant import registry

    d = step.model_dump() if isinstance(step, BaseModel) else dict(step)
    name = d.pop("name")
    cls = registry.get(name).config_cls
    defaults = resolve_step({"name": name}).model_dump()
    return ":".join([name, *[f"{k}={_fmt(v)}" for k, v in d.items() if k in cls.model_fields and defaults.get(k) != v]])


def registry_get(name: str):
    from .quant import registry

    return registry.get(name)


def _step_name(step: Any) -> str:
    return step.name if isinstance(step, BaseModel) else str(step["name"])


def _step_kind(step: Any) -> str:
    from .quant import registry

    return registry.get(_step_name(step)).kind


def resolve_step(step: Any, where: str = "method") -> BaseModel:
    """The typed config of one step (through the registry)."""
    from .quant import registry

    name = _step_name(step)
    spec = registry.get(name)
    if isinstance(step, BaseModel):
        if not isinstance(step, spec.config_cls):
            raise WeightsmithError(f"invalid configuration: step {name} has config type {type(step).__name__}")
        return step
    try:
        return spec.config_cls(**step)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise WeightsmithError(f"invalid configuration: {where}.{loc}: {err['msg']} (step {name})") from None


WHY_EARLIER = {
    "planner": "it measures the model and plans the per-layer settings every other step then uses",
    "transform": "it rewrites the weights that later steps prune or round",
    "pruner": "it chooses the weights to drop before they are rounded (the quantizer keeps its mask)",
    "quantizer": "it puts the weights on the grid that later steps correct or tune",
    "correction": "it corrects a layer's result before block steps see the finished layers",
    "block": "",
}
REQUIRES_TEXT = {"grid": "a quantizer", "sparsity": "a pruner"}


def validate_recipe(steps: list) -> None:
    """Refuse an invalid order of typed steps with the reason: kinds in the order of
    ``registry.KINDS``, no step twice, one planner and one quantizer at most, each step's required encodings
    produced by an earlier step, and a transform followed by a step that uses it."""
    from .quant import registry

    if not steps:
        raise WeightsmithError("invalid recipe: no steps")
    prev = None
    produced: set[str] = set()
    seen: dict[str, str] = {}
    quantizer = grid_by = planner = factored_by = None
    for st in steps:
        spec = registry.get(st.name)
        if spec.name in seen:
            raise WeightsmithError(f"invalid recipe: {st.name} given twice")
        seen[spec.name] = st.name
        if spec.kind == "planner":
            if planner is not None:
                raise WeightsmithError(f"invalid recipe: two planners ({planner} and {st.name}); a run applies one plan, give one of them")
            planner = st.name
        if spec.kind == "quantizer":
            if quantizer is not None:
                raise WeightsmithError(f"invalid recipe: two quantizers ({quantizer} and {st.name}); give exactly one (combine compatible ones with '+')")
            quantizer = st.name
        if prev is not None and registry.ORDER[spec.kind] < registry.ORDER[prev[1]]:
            raise WeightsmithError(f"invalid recipe: {st.name} (a {spec.kind}) must come before {prev[0]} (a {prev[1]}): {WHY_EARLIER[spec.kind]}")
        if "factored" in produced and spec.kind != "block":
            raise WeightsmithError(f"invalid recipe: {st.name} would work on the dense product A·S·B that {factored_by} stores factored "
                                   "(its N:M-sparse core between block-diagonal factors); nothing but a block step may follow it")
        if spec.requires and not set(spec.requires) & produced:
            what = " or ".join(REQUIRES_TEXT.get(r, r) for r in spec.requires)
            raise WeightsmithError(f"invalid recipe: {st.name} (a {spec.kind}) works on the result of {what}: put one before it")
        out = spec.outputs(st)
        if "factored" in out:
            if "sparsity" in produced:
                raise WeightsmithError(f"invalid recipe: {st.name} stores each layer as a dense product A·S·B, which would not keep "
                                       "the zeros of the pruner before it; give it alone (its core is pruned to its own pattern)")
            factored_by = st.name
        if "grid" in out and "grid" in produced:
            raise WeightsmithError(f"invalid recipe: {st.name} puts the weights on a grid, but {grid_by} already did; keep one of them")
        if "grid" in out:
            grid_by = step_text(st) if spec.kind != "quantizer" else st.name
        produced |= out
        prev = (st.name, spec.kind)
    kinds = [registry.get(s.name).kind for s in steps]
    if "transform" in kinds and not {"pruner", "quantizer"} & set(kinds):
        t = steps[kinds.index("transform")].name
        raise WeightsmithError(f"invalid recipe: {t} rescales the weights for a quantizer or pruner after it; add one (e.g. {t},rtn)")


class Rule(Strict):
    """A per-layer rule: for the layers whose full name matches ``match`` (a regex, ``re.search``),
    override grid fields, step options, or keep them in float (``skip``). Later rules override
    earlier ones; layers that read one input (q/k/v, gate/up) must resolve to the same settings."""

    match: str = Field(description="regex on the full layer name, e.g. 'mlp\\.down_proj' or 'layers\\.(0|1)\\.'")
    skip: bool = Field(False, description="keep the matching layers in float")
    grid: dict[str, Any] = Field(default_factory=dict, description="grid fields to override (bits, group_size, sym, clip_search, ...)")
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict, description="step name -> options to override")

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v


@dataclass(frozen=True)
class LayerSettings:
    """What one layer gets after the rules: its grid and its steps' configs, or ``skip``."""

    grid: "GridConfig"
    steps: tuple
    skip: bool = False

    def key(self) -> str:
        return json.dumps({"grid": self.grid.model_dump(), "steps": [s.model_dump() for s in self.steps], "skip": self.skip}, sort_keys=True)

    def describe(self) -> str:
        g = self.grid
        return "skip" if self.skip else f"W{g.bits} g{g.group_size} {'sym' if g.sym else 'asym'}, {','.join(step_text(s) for s in self.steps)}"


class QuantizeConfig(Strict):
    version: int = CONFIG_VERSION
    steps: list[Any] = Field(default_factory=lambda: parse_steps(DEFAULT_RECIPE), description=f"the recipe: steps in order (default: {DEFAULT_RECIPE})")
    grid: GridConfig = Field(default_factory=GridConfig)
    calib: CalibConfig = Field(default_factory=CalibConfig)
    rules: list[Rule] = Field(default_factory=list, description="per-layer overrides, by regex on the layer name")
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
        data = dict(data)
        legacy = [k for k in ("transforms", "method", "corrections") if k in data]
        if legacy and "steps" in data:
            raise WeightsmithError(f"invalid configuration: give the recipe as steps: or as method:, not both ({', '.join(legacy)})")
        if "steps" in data:
            raw = parse_steps(data["steps"])
        elif legacy:  # method: (one or more steps), with the older transforms:/corrections: around it
            raw = [*parse_steps(data.pop("transforms", None)), *parse_steps(data.pop("method", None)), *parse_steps(data.pop("corrections", None))]
        else:
            raw = parse_steps(DEFAULT_RECIPE)
        typed = [resolve_step(s, f"steps[{i}]") for i, s in enumerate(raw)]
        validate_recipe(typed)
        data["steps"] = typed
        return data

    @model_validator(mode="after")
    def _resolve_defaults(self) -> "QuantizeConfig":
        if self.grid.clip_search is None:
            from .quant import registry

            q = self.quantizer
            self.grid = self.grid.model_copy(update={"clip_search": registry.get(q.name).clip_search if q is not None else False})
        for st in self.steps:  # a planner refuses, before any work, a recipe it cannot plan for
            spec = registry_get(st.name)
            if spec.planner is not None and spec.planner.check is not None:
                spec.planner.check(st, self)
        for i, r in enumerate(self.rules):  # every rule must apply cleanly to the recipe
            names = {s.name for s in self.steps}
            for st in r.steps:
                if st not in names:
                    raise WeightsmithError(f"invalid configuration: rules[{i}] ({r.match!r}) sets options of {st}, which is not a step of the recipe ({self.recipe})")
            try:  # and leave a valid recipe (e.g. not a second grid: sparsegpt.quantize=true beside a quantizer)
                validate_recipe(list(self._apply_rules([r], f"rules[{i}] ({r.match!r})").steps))
            except WeightsmithError as e:
                raise WeightsmithError(f"invalid configuration: rules[{i}] ({r.match!r}): {e}") from None
        return self

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"config version {v} is not supported (this weightsmith reads {CONFIG_VERSION})")
        return v

    # ---- views of the recipe ----------------------------------------------------------------------
    def _of_kind(self, kind: str) -> list:
        from .quant import registry

        return [s for s in self.steps if registry.get(s.name).kind == kind]

    @property
    def quantizer(self):
        q = self._of_kind("quantizer")
        return q[0] if q else None

    @property
    def has_grid(self) -> bool:
        """Whether a step of the recipe, under any rule, puts the weights on a grid (the quantizer, or a pruner's joint mode)."""
        from .quant import registry

        variants = [tuple(self.steps)] + [self._apply_rules([r]).steps for r in self.rules]
        return any("grid" in registry.get(s.name).outputs(s) for steps in variants for s in steps)

    @property
    def method(self):
        """The recipe's quantizer config (None for a recipe without one)."""
        return self.quantizer

    @property
    def transforms(self) -> list:
        return self._of_kind("transform")

    @property
    def corrections(self) -> list:
        return self._of_kind("correction")

    @property
    def recipe(self) -> str:
        """The recipe's step names, e.g. ``awq,gptq,lorc``."""
        return ",".join(s.name for s in self.steps)

    def needs(self) -> frozenset:
        """The union of what the recipe's steps need, under every rule."""
        from .quant import registry

        out: set[str] = set()
        variants = [tuple(self.steps)] + [self._apply_rules([r]).steps for r in self.rules]
        for steps in variants:
            for s in steps:
                spec = registry.get(s.name)
                out |= spec.needs(s)
                if spec.planner is not None:
                    out |= spec.planner.needs_of(s)
        return frozenset(out)

    def float_samples(self) -> int | None:
        """Calibration samples that carry the float path: the smallest any float-path step asks for (None: all)."""
        from .quant import registry

        ks = [registry.get(s.name).float_samples(s) for s in self.steps]
        ks = [k for k in ks if k is not None]
        return min(ks) if ks else None

    def _apply_rules(self, rules: list, where: str = "rules") -> LayerSettings:
        grid = self.grid.model_dump()
        steps = {s.name: s.model_dump() for s in self.steps}
        skip = False
        for r in rules:
            skip = skip or r.skip
            grid.update(r.grid)
            for name, opts in r.steps.items():
                steps[name].update(opts)
        try:
            g = GridConfig(**grid)
        except ValidationError as e:
            err = e.errors()[0]
            raise WeightsmithError(f"invalid configuration: {where}: grid.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return LayerSettings(g, tuple(resolve_step(steps[s.name], where) for s in self.steps), skip)

    def layer_settings(self, name: str, extra_rules: list | None = None) -> LayerSettings:
        """The settings of the layer ``name``: the recipe with every matching rule applied in order."""
        rules = [r for r in [*self.rules, *(extra_rules or [])] if re.search(r.match, name)]
        return self._apply_rules(rules, f"rules for {name}") if rules else LayerSettings(self.grid, tuple(self.steps))

    def to_dict(self) -> dict:
        d = self.model_dump()
        d["steps"] = [s.model_dump() for s in self.steps]
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
            raise WeightsmithError("invalid configuration: quantizer options given to a recipe without a quantizer")
        steps[qi].update(opts)
        return steps
    if qi is None or _step_kind(opts) != "quantizer":
        raise WeightsmithError(f"invalid configuration: options for {name}, which is not a step of the recipe")
    steps[qi] = opts  # a different quantizer: drop the old one's options
    return steps


def recipe_of(data: dict) -> list:
    """The steps of a config mapping (its ``steps:``, or ``transforms:``/``method:``/``corrections:``; default recipe)."""
    if "steps" in data:
        return parse_steps(data["steps"])
    if any(k in data for k in ("transforms", "method", "corrections")):
        return [*parse_steps(data.get("transforms")), *parse_steps(data.get("method")), *parse_steps(data.get("corrections"))]
    return parse_steps(DEFAULT_RECIPE)


def apply_sets(data: dict, steps: list[dict], sets: list[str]) -> tuple[dict, list[dict]]:
    """``--set STEP.OPTION=VALUE`` (a step of the recipe by name, or ``quantizer``/``pruner`` for the recipe's
    step of that kind) and ``--set SECTION.FIELD=VALUE`` / ``--set FIELD=VALUE`` for the rest of the config
    (``grid.bits=3``, ``calib.nsamples=64``, ``chunk_size=8``)."""
    data = dict(data)
    for s in sets:
        key, eq, val = s.partition("=")
        key = key.strip()
        if not eq or not key:
            raise WeightsmithError(f"--set {s!r}: expected STEP.OPTION=VALUE or SECTION.FIELD=VALUE")
        v = _value(val.strip())
        head, dot, field = key.partition(".")
        if not dot:
            if head not in QuantizeConfig.model_fields or head == "steps":
                raise WeightsmithError(f"--set {s!r}: {head} is not a configuration field ({', '.join(f for f in QuantizeConfig.model_fields if f != 'steps')})")
            data[head] = v
            continue
        if head in ("grid", "calib"):
            data[head] = {**(data.get(head) or {}), field: v}
            continue
        targets = [st for st in steps if st["name"] == head or (head in ("quantizer", "pruner") and _step_kind(st) == head)]
        if not targets:
            raise WeightsmithError(f"--set {s!r}: the recipe ({','.join(st['name'] for st in steps)}) has no step {head}")
        targets[0][field] = v
    return data, steps


def build_config(data: dict | None = None, **overrides: Any) -> QuantizeConfig:
    """Merge nested ``overrides`` (``{"grid": {"bits": 3}}``; None values ignored) over ``data``.

    ``method`` (or ``steps``) may be a recipe (``"awq,gptq,lorc:rank=16"`` or a list of steps), which replaces
    the recipe of ``data``, or a mapping of options for one of its steps (see :func:`_merge_method`).
    """
    merged: dict = dict(data or {})
    for key, val in overrides.items():
        if val is None:
            continue
        if key in ("method", "steps"):
            steps = _merge_method(recipe_of(merged), val) if isinstance(val, dict) else parse_steps(val)
            for k in ("transforms", "method", "corrections"):
                merged.pop(k, None)
            merged["steps"] = steps
        elif isinstance(val, dict):
            sub = dict(merged.get(key) or {})
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
