"""From a :class:`MergeConfig` and the opened checkpoints to one :class:`TensorPlan` per output
tensor: which models are its inputs, which is the base, every parameter resolved — all checked
before a single tensor is read (keys, shapes, parameter types and ranges, input counts).

Layers are found from the tensor names alone: the first ``.<number>.`` component of a name
(``model.layers.7.mlp.up_proj.weight``) is its layer when its prefix is the one most names share;
``N`` is the number of such layers. A tensor outside the layers belongs to the first slice when its
name says it is an embedding (``embed``, ``wte``, ``wpe``), else to the last one (final norm, LM
head), as mergekit's pre- and post-weights do; it reads gradients at ``t = 0``.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource
from . import registry
from .config import DTYPES, MergeConfig, resolve_param

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*?)\.(\d+)\.")
_PRE = re.compile(r"embed|(^|\.)wte\.|(^|\.)wpe\.")


@dataclass
class PlanInput:
    model: int  # index into Plan.models
    params: dict
    is_base: bool


@dataclass
class TensorPlan:
    key: str
    shape: tuple[int, ...]
    inputs: list[PlanInput]
    params: dict
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    copy: bool = False  # a non-float tensor: copied from the donor unchanged

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.out_dtype.itemsize


@dataclass
class Plan:
    method: registry.Method
    models: list[str]  # as the config names them
    paths: list[Path]
    donor: int  # the model whose config and tokenizer the output gets (the base, else the first)
    tensors: list[TensorPlan]
    n_layers: int
    layer_prefix: str | None
    context: Any = None  # the method's ``prepare`` result, handed to every job


def layer_structure(keys: list[str]) -> tuple[str | None, int]:
    """``(prefix, number of layers)`` of the repeated blocks, from the tensor names."""
    found = [(m.group(1), int(m.group(2))) for k in keys if (m := _LAYER.match(k))]
    if not found:
        return None, 0
    prefix = Counter(p for p, _ in found).most_common(1)[0][0]
    return prefix, 1 + max(i for p, i in found if p == prefix)


def layer_of(key: str, prefix: str | None) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(2)) if m and m.group(1) == prefix else None


def build_plan(cfg: MergeConfig, sources: dict[str, CheckpointSource], paths: dict[str, Path]) -> Plan:
    method = registry.get(cfg.merge_method)
    names = cfg.model_names()
    index = {n: i for i, n in enumerate(names)}
    donor_name = cfg.base_model or names[0]
    donor = sources[donor_name]
    keys = sorted(donor.keys(), key=lambda k: _order(k))
    prefix, n_layers = layer_structure(keys)
    _check_layer_count(donor, n_layers)

    # the slices: (sources [(name, params)], base name, slice params, first layer, last layer + 1)
    if cfg.models is not None:
        srcs = [(m.model, m.parameters) for m in cfg.models]
        dup = [n for n, c in Counter(n for n, _ in srcs).items() if c > 1]
        if dup:
            raise WeightsmithError(f"merge config: model {dup[0]!r} is listed twice in models:")
        if cfg.base_model and cfg.base_model not in [n for n, _ in srcs]:
            srcs.append((cfg.base_model, None))  # as mergekit: the base is an input
        slices = [(srcs, cfg.base_model, None, 0, n_layers)]
    else:
        slices = []
        pos = 0
        for j, s in enumerate(cfg.slices):
            ranges = {tuple(src.layer_range) for src in s.sources}
            if len(ranges) != 1 or next(iter(ranges))[0] != pos or not next(iter(ranges))[1] > pos:
                raise WeightsmithError(
                    f"merge config: slices[{j}] takes layer ranges {sorted(ranges)}; weightsmith merges slices that take the same "
                    f"layer_range from every source and cover the layers 0..{n_layers - 1} in order (here the next range must start "
                    f"at {pos}); slices that move, repeat or drop layers (passthrough) are not supported")
            srcs = [(src.model, src.parameters) for src in s.sources]
            dup = [n for n, c in Counter(n for n, _ in srcs).items() if c > 1]
            if dup:
                raise WeightsmithError(f"merge config: model {dup[0]!r} is listed twice in slices[{j}]")
            a, b = next(iter(ranges))
            slices.append((srcs, s.base_model or cfg.base_model, s.parameters, a, b))
            pos = b
        if pos != n_layers:
            raise WeightsmithError(f"merge config: the slices cover layers 0..{pos - 1} but the model has {n_layers} "
                                   f"({prefix}0 .. {prefix}{n_layers - 1}); dropping layers is not supported")

    for j, (srcs, base, _, _, _) in enumerate(slices):
        where = "models:" if cfg.models is not None else f"slices[{j}]"
        if method.base == "required" and base is None:
            raise WeightsmithError(f"merge config: {method.name} needs a base_model")
        if method.base == "required" and base not in [n for n, _ in srcs]:
            raise WeightsmithError(f"merge config: {method.name} needs the base model {base!r} among the sources of {where}")
        n = len(srcs)
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            want = (f"exactly {method.min_inputs}" if method.max_inputs == method.min_inputs else
                    f"at least {method.min_inputs}" if method.max_inputs is None else f"{method.min_inputs} to {method.max_inputs}")
            raise WeightsmithError(f"merge config: {method.name} takes {want} models (the base included), {where} has {n}")

    used = [n for n in names if _is_input(n, slices)]
    unused = [n for n in names if n not in used]
    if unused:
        raise WeightsmithError(f"merge config: model {unused[0]!r} is named but is an input of no slice")
    _check_keys_and_shapes(keys, {n: sources[n] for n in used}, donor_name)

    out_dtype = DTYPES[cfg.out_dtype or cfg.dtype] if (cfg.out_dtype or cfg.dtype) else None
    plans = []
    for key in keys:
        layer = layer_of(key, prefix)
        if layer is not None:
            j = next(j for j, s in enumerate(slices) if s[3] <= layer < s[4])
            a, b = slices[j][3], slices[j][4]
            t = (layer - a) / (b - a - 1) if b - a > 1 else 1.0
        else:
            j = 0 if _PRE.search(key) else len(slices) - 1
            t = 0.0
        srcs, base, slice_params, _, _ = slices[j]
        shape = donor.shape(key)
        dtypes = [sources[n].dtype(key) for n, _ in srcs]
        if not all(d.is_floating_point for d in dtypes):
            plans.append(TensorPlan(key, shape, [PlanInput(index[donor_name], {}, True)], {}, donor.dtype(key), donor.dtype(key), copy=True))
            continue
        shared = {p.name: resolve_param(p, [slice_params, cfg.parameters], key, t, f"{method.name}")
                  for p in method.params if p.scope == "shared"}
        inputs = []
        for n, own in srcs:
            is_base = n == base
            params = {p.name: resolve_param(p, [own, slice_params, cfg.parameters], key, t, f"model {n!r}")
                      for p in method.params if p.scope == "input" or (p.scope == "non_base" and not is_base)}
            inputs.append(PlanInput(index[n], params, is_base))
        if method.check is not None:
            method.check(key, shared, [i.params for i in inputs])
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        compute = torch.float64 if promoted == torch.float64 else torch.float32
        plans.append(TensorPlan(key, shape, inputs, shared, out_dtype or promoted, compute))
    return Plan(method, names, [paths[n] for n in names], index[donor_name], plans, n_layers, prefix)


def _is_input(name: str, slices) -> bool:
    return any(name == n for srcs, *_ in slices for n, _ in srcs)


def _order(key: str):
    """Output order: tensors outside the layers that come first (embeddings), the layers in order, the rest."""
    m = _LAYER.match(key)
    if m:
        return (1, m.group(1), int(m.group(2)), key)
    return (0 if _PRE.search(key) else 2, "", 0, key)


def _check_layer_count(src: CheckpointSource, n_layers: int) -> None:
    cfg = src.config_dict.get("text_config") if isinstance(src.config_dict.get("text_config"), dict) else src.config_dict
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if isinstance(n, int) and n_layers and n != n_layers:
        log.warning("the tensor names show %d layers but config.json says %d; gradients follow the tensor names", n_layers, n)


def _check_keys_and_shapes(keys: list[str], sources: dict[str, CheckpointSource], donor: str) -> None:
    """Every input has exactly the donor's tensors, each of the donor's shape."""
    want = set(keys)
    for name, src in sources.items():
        if name == donor:
            continue
        have = set(src.keys())
        missing, extra = sorted(want - have), sorted(have - want)
        if missing:
            raise WeightsmithError(f"model {name!r} lacks the tensor {missing[0]} of {donor!r}" +
                                   (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": the models must share one architecture")
        if extra:
            raise WeightsmithError(f"model {name!r} has the tensor {extra[0]} that {donor!r} lacks" +
                                   (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") +
                                   "; the models must have the same tensors (a tied or untied LM head, say)")
        for k in keys:
            if src.shape(k) != sources[donor].shape(k):
                raise WeightsmithError(f"tensor {k} has shape {tuple(src.shape(k))} in {name!r} but {tuple(sources[donor].shape(k))} in "
                                       f"{donor!r}; models with other vocabularies or sizes cannot be merged tensor by tensor")
