"""The merge configuration: mergekit's YAML, read into typed (pydantic) objects.

What is read, with mergekit's meaning:

- ``merge_method`` (a name of ``merge/registry.py``), ``base_model``, ``dtype`` (the dtype stored,
  see below), ``out_dtype`` (overrides it), ``tokenizer_source`` (``base`` or a model whose
  vocabulary equals the base's: its tokenizer files are copied);
- ``models: [{model, parameters}]`` — the base is added as an input when it is not listed — or
  ``slices: [{sources: [{model, layer_range, parameters}], base_model, parameters}]`` when every
  slice takes the same ``layer_range`` from each of its sources and the slices cover the layers
  ``0 … N−1`` in order (a per-slice choice of models and parameters; no layer is moved);
- ``parameters`` at the top level, per slice and per model, each either a value, a *gradient* (a
  list of numbers interpolated over the layers of the slice: layer ``i`` of ``n`` reads it at
  ``t = i/(n−1)``; tensors outside the layers read it at ``t = 0``) or a list of ``{filter, value}``
  whose first entry with ``filter`` absent, ``*`` or a substring of the tensor name applies.
  A per-model parameter is looked up on the model, then the slice, then the top level; a shared
  one on the slice, then the top level; then the method's default.

What is not, refused by name before any work: ``modules``, ``tokenizer`` (vocabulary merging),
``chat_template``, ``tokenizer_source: union``, slices that move, repeat or drop layers
(passthrough "frankenmerges"), ``residual_weight``, LoRA references (``model+lora``), remote
models (nothing is downloaded: a model is a local directory or ``.gguf`` file, relative paths
from the current directory or the YAML's), unknown keys, methods and parameters.

Arithmetic is float32 (float64 for float64 inputs) whatever ``dtype`` says, so ``dtype: bfloat16``
stores bf16 tensors computed in float32 (mergekit computes GTA methods in the loaded dtype); the
stored dtype is ``out_dtype``, else ``dtype``, else the inputs' (promoted) dtype.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import WeightsmithError
from . import registry
from .registry import Param

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, Conditional, list[Union[Scalar, Conditional]]]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32", "fp64": "float64"}

REFUSED_KEYS = {
    "modules": "multi-module merges (modules:) are not supported; use models: or slices:",
    "tokenizer": "tokenizer: (building a merged vocabulary and permuting embedding rows) is not supported; "
                 "use tokenizer_source: base or a model with the base's vocabulary",
    "chat_template": "chat_template: is not supported; the tokenizer files (and their template) are copied from the base "
                     "or tokenizer_source",
}
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")


def _check_keys(data: Any, allowed: tuple[str, ...], where: str, refused: dict[str, str] | None = None) -> None:
    if not isinstance(data, dict):
        return
    for k in data:
        if refused and k in refused:
            raise WeightsmithError(f"merge config: {refused[k]}")
        if k not in allowed:
            raise WeightsmithError(f"merge config: unknown key {k!r} in {where} (weightsmith reads: {', '.join(allowed)})")


def _model_name(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise WeightsmithError(f"merge config: {where} must be a local path (a string), got {v!r}; model references "
                               "with revisions, LoRAs or overrides are not supported")
    if "+" in v and not os.path.exists(v):
        raise WeightsmithError(f"merge config: {where} {v!r} looks like a LoRA reference (model+lora), which is not supported")
    return v


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[dict[str, Setting]] = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data):
        _check_keys(data, ("model", "parameters"), "a models: entry")
        if isinstance(data, dict) and "model" in data:
            _model_name(data["model"], "models[].model")
        return data


class InputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Setting]] = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data):
        _check_keys(data, ("model", "layer_range", "parameters"), "a slice source")
        if isinstance(data, dict) and "model" in data:
            _model_name(data["model"], "slices[].sources[].model")
        return data


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Setting]] = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data):
        _check_keys(data, ("sources", "base_model", "parameters"), "a slice",
                    {"residual_weight": "residual_weight in a slice is not supported"})
        return data


class MergeConfig(BaseModel):
    """A merge, as mergekit's YAML describes it (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Setting]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    root: Optional[str] = None  # the YAML's directory: relative model paths are also looked up there (not a YAML key)

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data):
        if not isinstance(data, dict):
            raise WeightsmithError(f"merge config must be a mapping (merge_method:, models:, ...), got a {type(data).__name__}")
        _check_keys(data, (*TOP_KEYS, "root"), "the merge config", REFUSED_KEYS)
        for k in ("base_model", "tokenizer_source"):
            if data.get(k) is not None:
                _model_name(data[k], k)
        return data

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is None:
            return v
        name = _DTYPE_ALIASES.get(str(v).removeprefix("torch."), str(v).removeprefix("torch."))
        if name not in DTYPES:
            raise ValueError(f"{v!r} is not one of {', '.join(DTYPES)}")
        return name

    @model_validator(mode="after")
    def _semantics(self):
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise WeightsmithError("merge config: give exactly one of models: or slices: (a non-empty list)")
        if self.tokenizer_source == "union":
            raise WeightsmithError("merge config: tokenizer_source: union (a merged vocabulary) is not supported; "
                                   "use base or a model with the base's vocabulary")
        method = registry.get(self.merge_method)
        scopes = [("parameters", self.parameters, False)]
        for i, m in enumerate(self.models or []):
            scopes.append((f"models[{i}] ({m.model}).parameters", m.parameters, True))
        for j, s in enumerate(self.slices or []):
            scopes.append((f"slices[{j}].parameters", s.parameters, False))
            for i, src in enumerate(s.sources):
                scopes.append((f"slices[{j}].sources[{i}] ({src.model}).parameters", src.parameters, True))
        for where, params, per_model in scopes:
            for name, setting in (params or {}).items():
                p = method.param(name)
                if p is None:
                    takes = ", ".join(q.name for q in method.params) or "no parameters"
                    raise WeightsmithError(f"merge config: {where}: {name!r} is not a parameter of {method.name} (it takes: {takes})")
                if per_model and p.scope == "shared":
                    raise WeightsmithError(f"merge config: {where}: {name} is one value for all models in {method.name}; "
                                           "set it under the top-level (or the slice's) parameters")
                _check_setting(setting, p, f"{where}.{name}")
        return self

    # ---- models ---------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Every model whose weights the merge reads, each once, in order of first mention (base first);
        ``tokenizer_source`` only gives tokenizer files and is not among them."""
        names = [self.base_model] if self.base_model else []
        for m in self.models or []:
            names.append(m.model)
        for s in self.slices or []:
            names += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        out = []
        for n in names:
            if n not in out:
                out.append(n)
        return out

    def resolve(self, name: str) -> Path:
        """A model's local path: as given if absolute, else from the current directory, else from the YAML's."""
        p = Path(name).expanduser()
        cands = [p] if p.is_absolute() else [p] + ([Path(self.root) / p] if self.root else [])
        for c in cands:
            if c.exists():
                return c
        raise WeightsmithError(f"model {name!r} not found locally (looked in {', '.join(str(c) for c in cands)}); weightsmith "
                               "downloads nothing: give the path of a Hugging Face directory or a .gguf file")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True, exclude={"root"})


def _check_setting(setting: Any, p: Param, where: str) -> None:
    """Type-check every value a setting can produce (for any tensor, at any layer)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise WeightsmithError(f"merge config: {where} is an empty list")
        conds = [isinstance(e, Conditional) for e in setting]
        if any(conds) and not all(conds):
            raise WeightsmithError(f"merge config: {where} mixes values and {{filter, value}} entries")
        for e in setting:
            if isinstance(e, Conditional):
                _check_setting(e.value, p, where)
            else:
                p.convert(e, f"merge config: {where}")
        return
    p.convert(setting, f"merge config: {where}")


def evaluate(setting: Any, p: Param, tensor: str, t: float, where: str) -> Any:
    """A setting's value for ``tensor`` at layer fraction ``t`` (mergekit's rules), or None when no
    ``{filter, value}`` entry applies to this tensor."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return p.convert(setting, where)
    if all(isinstance(e, Conditional) for e in setting):
        for c in setting:
            if c.filter is None or c.filter == "*" or c.filter in tensor:
                return evaluate(c.value, p, tensor, t, where)
        return None
    values = [p.convert(e, where) for e in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    x = t * (len(values) - 1)
    i0 = int(x)
    i1 = min(len(values) - 1, i0 + 1)
    frac = x - i0
    return p.convert((1 - frac) * values[i0] + frac * values[i1], where)


def resolve_param(p: Param, scopes: list[dict | None], tensor: str, t: float, who: str) -> Any:
    for scope in scopes:
        if scope and p.name in scope:
            v = evaluate(scope[p.name], p, tensor, t, f"{who}: {p.name}")
            if v is not None:
                return v
    if p.required:
        raise WeightsmithError(f"merge config: missing required parameter {p.name} for {who} (tensor {tensor})")
    return p.default


def load_config(config: "MergeConfig | dict | str | Path") -> tuple[MergeConfig, str | None, Path | None]:
    """``(config, its YAML text or None, its path or None)`` from a MergeConfig, a dict, a YAML file's path or YAML text."""
    if isinstance(config, MergeConfig):
        return config, None, None
    path, text = None, None
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config and not config.lstrip().startswith("{")):
        path = Path(config)
        if not path.is_file():
            raise WeightsmithError(f"merge config {path} does not exist" if not path.exists() else f"merge config {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise WeightsmithError(f"cannot read merge config {path}: {e}") from None
        data = _yaml(text, str(path))
    elif isinstance(config, str):
        text = config
        data = _yaml(text, "the merge config")
    else:
        data = dict(config)
    if isinstance(data, dict) and path is not None and "root" not in data:
        data = {**data, "root": str(path.resolve().parent)}
    try:
        return MergeConfig.model_validate(data), text, path
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("function-after", "function-before"))))
        raise WeightsmithError(f"invalid merge config: {loc}: {err['msg']}") from None


def _yaml(text: str, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WeightsmithError(f"{what} is not valid YAML: {str(e).splitlines()[0]}") from None
