"""Typed, strict, versioned configuration. The CLI, a YAML recipe and the Python API all build a
:class:`QuantizeConfig`; validation errors become one-line :class:`WeightsmithError` messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import WeightsmithError

CONFIG_VERSION = 1


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


class QuantizeConfig(Strict):
    version: int = CONFIG_VERSION
    method: Any = Field(default_factory=lambda: {"name": "gptq"})
    grid: GridConfig = Field(default_factory=GridConfig)
    calib: CalibConfig = Field(default_factory=CalibConfig)
    ignore: list[str] = Field(default_factory=list, description="regexes of layer names kept in float")
    device: str = "cpu"
    chunk_size: int = Field(16, ge=1, description="calibration samples per forward chunk")
    sequential: bool = Field(True, description="true-sequential: later layers see the quantized earlier ones")
    low_memory: bool = Field(False, description="replay the block once per layer group instead of parking all chunks mid-forward")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        from .quant import registry

        if isinstance(v, str):
            v = {"name": v}
        if isinstance(v, BaseModel):
            return v
        if not isinstance(v, dict) or "name" not in v:
            raise ValueError("method must be a name or a mapping with a 'name'")
        algo = registry.get(v["name"])
        return algo.config_cls(**v)

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

    def to_dict(self) -> dict:
        d = self.model_dump()
        d["method"] = self.method.model_dump()
        return d


def build_config(data: dict | None = None, **overrides: Any) -> QuantizeConfig:
    """Merge nested ``overrides`` (``{"grid": {"bits": 3}}``; None values ignored) over ``data``."""
    merged: dict = dict(data or {})
    for key, val in overrides.items():
        if val is None:
            continue
        if isinstance(val, dict):
            base = merged.get(key) or {}
            if isinstance(base, str):
                base = {"name": base}
            sub = dict(base)
            sub.update({k: x for k, x in val.items() if x is not None})
            if key == "method" and "name" in val and isinstance(base, dict) and base.get("name") not in (None, val["name"]):
                sub = {k: x for k, x in val.items() if x is not None}  # a different method: drop the old one's options
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
