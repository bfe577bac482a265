"""Checks of what a user passes in, made once before any long work, each a one-line
:class:`WeightsmithError`: the device, layer-name regexes, the window length against the model's
positions, the magnitude of the weights — and JSON that is always valid (no bare ``NaN``)."""
from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Iterable

import torch

from .errors import NumericalError, WeightsmithError

log = logging.getLogger(__name__)

# No trained transformer has a weight this large; one that does is broken (a bit flip, an overflowed
# conversion) and would quantize into garbage (every other weight of its group rounded to zero).
WEIGHT_LIMIT = 1e6
LARGE_WEIGHTS_FLAG = "--allow-large-weights"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise WeightsmithError(f"invalid device {str(device)!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsmithError(f"device {str(device)!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeightsmithError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise WeightsmithError(f"device {str(device)!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise WeightsmithError(f"device {str(device)!r} is not supported; use cpu or cuda[:N]")
    return dev


def compile_regex(pattern: str, flag: str) -> re.Pattern:
    """``pattern`` compiled, or a one-line error naming the option it came from."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise WeightsmithError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def check_regexes(patterns: Iterable[str] | None, flag: str = "--ignore") -> None:
    for p in patterns or ():
        compile_regex(p, flag)


def position_limit(model: torch.nn.Module) -> tuple[int | None, bool]:
    """``(max positions, absolute)``: the model's position limit from its config, and whether it has
    a learned table of absolute positions (GPT-2, OPT, BERT: a longer window cannot run at all)
    rather than rotary/relative positions (Llama, Qwen2, ...: it runs, out of the trained range)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(text, attr, None)
        if isinstance(v, int) and v > 0:
            limit = v
            break
    absolute = False
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(m, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe"):
            absolute = True
            if limit is None:
                limit = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
    return limit, absolute


def check_seqlen(model: torch.nn.Module, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse a window longer than an absolute-position model's table; warn for rotary positions."""
    limit, absolute = position_limit(model)
    if limit is None or seqlen <= limit:
        return
    if absolute:
        raise WeightsmithError(f"{flag} {seqlen} is longer than the model's {limit} positions (it has a table of "
                               f"absolute positions); use {flag} {limit} or less")
    log.warning("%s %d is longer than the model's max_position_embeddings %d: positions past it were never trained",
                flag, seqlen, limit)


def check_weight(key: str, t: torch.Tensor, limit: float | None = WEIGHT_LIMIT) -> None:
    """Stop on a checkpoint tensor with NaN/Inf, or (``limit`` not None) with a magnitude above it."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if not torch.isfinite(t).all():
        raise NumericalError(f"the checkpoint has NaN/Inf values in {key}: the float model is broken")
    if limit is not None:
        m = float(t.abs().max())
        if m > limit:
            raise NumericalError(f"the checkpoint has a weight of magnitude {m:.3g} in {key} (above {limit:g}): the float model "
                                 f"looks broken; pass {LARGE_WEIGHTS_FLAG} to quantize it anyway")


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/±Inf float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` that always writes valid JSON: non-finite numbers become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
