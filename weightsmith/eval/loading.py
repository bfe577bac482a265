"""Load a model for evaluation: a Hugging Face directory (plain, or compressed-tensors as written by
llm-compressor) or a ``.gguf`` file, in float32 and eval mode, with its own tokenizer.

A model is *causal* (it predicts the next token, so perplexity is defined) or an *encoder* (only its
final hidden states are compared).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..errors import WeightsmithError
from ..safety import check_model_dir, from_pretrained

logger = logging.getLogger(__name__)

CAUSAL = "causal"
ENCODER = "encoder"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError)


@dataclass(frozen=True)
class ModelLocation:
    """Where a checkpoint lives: a directory, plus the file name inside it for a ``.gguf``."""

    directory: Path
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def locate_model(path: Union[str, Path]) -> ModelLocation:
    """Check that ``path`` is a model directory (with config.json) or a ``.gguf`` file."""
    p = Path(path)
    if not p.exists():
        raise WeightsmithError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise WeightsmithError(f"{p} is neither a model directory nor a .gguf file")
        from ..export.readers import GGUFView

        GGUFView(p)  # the whole header and tensor table read by the reader every command uses: a bad file is one line
        return ModelLocation(p.parent, p.name)
    if not (p / "config.json").is_file():
        raise WeightsmithError(f"{p} is not a Hugging Face model directory (no config.json)")
    loc = ModelLocation(p)
    _raw_config(loc)  # config.json readable, an object
    check_model_dir(p)  # no checkpoint code, no pickles
    return loc


def _raw_config(loc: ModelLocation) -> dict:
    """config.json of a model directory as a dict ({} for a .gguf file)."""
    if loc.gguf_file:
        return {}
    path = loc.directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsmithError(f"{path} is not a readable JSON file: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{path} is not a JSON object")
    return data


def _check_known(loc: ModelLocation, raw: dict) -> None:
    """Unknown model types and missing optional packages, as one-line errors."""
    model_type = raw.get("model_type")
    if not loc.gguf_file and model_type is None:
        raise WeightsmithError(f"{loc.directory} is not a Hugging Face model directory (config.json has no model_type)")
    if not loc.gguf_file and model_type not in CONFIG_MAPPING_NAMES:
        raise WeightsmithError(
            f"unknown architecture in {loc.directory}: model_type {model_type!r} is not known to "
            f"transformers {transformers.__version__}"
        )
    quant = raw.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "compressed-tensors" and not package_available("compressed_tensors"):
        raise WeightsmithError(
            f"{loc.directory} is a compressed-tensors checkpoint; loading it needs the compressed-tensors "
            "package: pip install compressed-tensors"
        )


def package_available(name: str) -> bool:
    """Whether the Python package ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


def load_config(loc: ModelLocation) -> Any:
    """The transformers config of the checkpoint at ``loc``."""
    _check_known(loc, _raw_config(loc))
    try:
        return from_pretrained(AutoConfig, loc.directory, **loc.kwargs())
    except LOAD_ERRORS as e:
        raise WeightsmithError(f"cannot read the model config in {_where(loc)}: {_first_line(e)}") from None


def model_kind(config: Any) -> str:
    """``"causal"`` when ``config.architectures`` names a causal-LM head; without architectures, when
    the model type has a causal LM in transformers and is a decoder (``is_decoder``, or a model type
    that has no masked-LM head either); ``"encoder"`` otherwise."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return CAUSAL
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False):
        if getattr(config, "is_decoder", False):
            return CAUSAL
        if not archs and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return CAUSAL
    return ENCODER


def _encoder_class(config: Any) -> Any:
    """The class named in ``config.architectures`` when transformers has it, else ``AutoModel``."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModel


def parse_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device, checked to exist."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WeightsmithError(f"invalid device {device!r}: {_first_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightsmithError(f"device {device!r} requested but CUDA is not available")
    return dev


@contextmanager
def _loading_bars(progress: bool) -> Iterator[None]:
    """Hide transformers' own loading progress bars while loading when ``progress`` is False."""
    hide = not progress and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def load_for_eval(
    path: Union[str, Path], device: Union[str, torch.device] = "cpu", *, progress: bool = True
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, kind)`` for the checkpoint at ``path``: the model in float32, eval mode,
    on ``device``; ``kind`` is ``"causal"`` or ``"encoder"``. ``progress=False`` hides the loading bar."""
    dev = parse_device(device)
    loc = locate_model(path)
    config = load_config(loc)
    if not loc.gguf_file:
        from ..model.source import CheckpointSource

        CheckpointSource._build_index(loc.directory)  # every safetensors header checked against its file before loading
    kind = model_kind(config)
    cls = AutoModelForCausalLM if kind == CAUSAL else _encoder_class(config)
    logger.info("loading %s (%s model) in float32", path, kind)
    try:
        with _loading_bars(progress):
            if _needs_own_dequantization(loc):
                from ..export.readers import load_dequantized_model

                model = load_dequantized_model(loc.directory, cls)
            else:
                model = from_pretrained(cls, loc.directory, dtype=torch.float32, **loc.kwargs())
    except LOAD_ERRORS as e:
        raise WeightsmithError(f"cannot load the model in {_where(loc)}: {_first_line(e)}") from None
    model = model.to(dev).eval()
    return model, load_tokenizer(loc), kind


def _needs_own_dequantization(loc: ModelLocation) -> bool:
    """GPTQ-format dirs when GPTQModel is not installed (transformers needs it for them), and
    asymmetric compressed-tensors pack-quantized dirs (compressed-tensors 0.20 sizes their packed
    zero points wrongly when loading through transformers): read by weightsmith's own unpacker."""
    raw = _raw_config(loc)
    quant = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else {}
    method = quant.get("quant_method")
    if method == "gptq":
        return not package_available("gptqmodel")
    if method == "compressed-tensors" and quant.get("format") == "pack-quantized":
        groups = quant.get("config_groups") or {}
        return any(not ((g.get("weights") or {}).get("symmetric", True)) for g in groups.values())
    return False


def load_tokenizer(loc: ModelLocation) -> Any:
    """The tokenizer stored with the checkpoint."""
    try:
        tokenizer = from_pretrained(AutoTokenizer, loc.directory, **loc.kwargs())
    except LOAD_ERRORS as e:
        raise WeightsmithError(f"cannot load the tokenizer in {_where(loc)}: {_first_line(e)}") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise WeightsmithError(f"no tokenizer found in {_where(loc)}")
    return tokenizer


def encoder_body(model: Any) -> Any:
    """The module whose output's ``last_hidden_state`` holds an encoder's final hidden states."""
    body = getattr(model, "base_model", model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        body = model.get_encoder()
    return body


def _where(loc: ModelLocation) -> str:
    return str(loc.directory / loc.gguf_file) if loc.gguf_file else str(loc.directory)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
