"""Generic model adapter: an empty (meta) model built from config.json, its repeated blocks found
by structure, the Linear layers of each block, and weights materialised block by block.

No per-architecture code: the blocks are the largest ``nn.ModuleList`` whose children share one
class; their inputs are captured by running the model's own forward up to block 0.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import WeightsmithError
from ..safety import from_pretrained
from ..validate import WEIGHT_LIMIT, check_weight
from .source import CheckpointSource

log = logging.getLogger(__name__)


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_, self.kwargs_ = args, kwargs


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def get_weight(m: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) matrix (HF ``Conv1D`` stores (in, out))."""
    return m.weight.data.t() if isinstance(m, Conv1D) else m.weight.data


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    m.weight.data.copy_(w.t() if isinstance(m, Conv1D) else w)


def model_class(config) -> type:
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    try:
        from transformers import AutoModel

        AutoModel.from_config  # noqa: B018
        mapping = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES
        if config.model_type in mapping:
            return getattr(transformers, mapping[config.model_type])
    except Exception:  # pragma: no cover - defensive
        pass
    raise WeightsmithError(f"unknown architecture {config.architectures or config.model_type!r}: transformers {transformers.__version__} has no class for it")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList whose children all share one class (ties: more parameters)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            if not any(is_linear(x) for x in mod[0].modules()):
                continue
            size = sum(p.numel() for p in mod.parameters())
            key = (len(mod), size)
            if best is None or key > best[0]:
                best = (key, name, mod)
    if best is None:
        raise WeightsmithError(f"unsupported model {type(model).__name__}: no repeated blocks with linear layers found")
    return best[1], best[2]


@dataclass
class Layer:
    name: str  # full module name in the model
    rel: str  # name inside its block
    module: nn.Module


class LazyModel:
    """A model whose parameters live on disk until a block asks for them."""

    def __init__(self, source: CheckpointSource, device: str = "cpu"):
        self.source = source
        self.device = torch.device(device)
        self.weight_limit: float | None = WEIGHT_LIMIT  # None: only NaN/Inf stop the run (--allow-large-weights)
        try:
            self.config = from_pretrained(transformers.AutoConfig, source.dir)
        except (ValueError, KeyError, OSError) as e:
            raise WeightsmithError(f"unknown or unsupported model in {source.dir}: {str(e).splitlines()[0]}") from None
        if getattr(self.config, "quantization_config", None):
            raise WeightsmithError(f"{source.origin} is already quantized ({self.config.quantization_config.get('quant_method', '?')}); quantize a float checkpoint")
        cls = model_class(self.config)
        with init_empty_weights(include_buffers=False):
            self.model = cls._from_config(self.config, dtype=torch.float32)
        self.model.eval()
        self.blocks_name, self.blocks = find_blocks(self.model)
        self.keymap = self._map_keys()

    # ---- names -----------------------------------------------------------------------------------
    def _map_keys(self) -> dict[str, str]:
        """Model state-dict name → checkpoint key (exact, or with/without the base-model prefix)."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        have = set(self.source.index)
        out: dict[str, str] = {}
        for k in self.model.state_dict(keep_vars=True):
            for cand in (k, k[len(prefix) + 1 :] if prefix and k.startswith(prefix + ".") else None, f"{prefix}.{k}" if prefix else None):
                if cand and cand in have:
                    out[k] = cand
                    break
        return out

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def layers(self, i: int, ignore: list[str] = ()) -> list[Layer]:
        pats = [re.compile(p) for p in ignore]
        pre = self.block_prefix(i)
        out = []
        for rel, m in self.blocks[i].named_modules():
            if is_linear(m) and not any(p.search(pre + rel) for p in pats):
                out.append(Layer(pre + rel, rel, m))
        return out

    def block_keys(self, i: int) -> dict[str, str]:
        """State-dict names of block ``i`` (relative) → checkpoint keys."""
        pre = self.block_prefix(i)
        return {k[len(pre) :]: v for k, v in self.keymap.items() if k.startswith(pre)}

    def outside_keys(self) -> list[str]:
        pre = self.blocks_name + "."
        return [v for k, v in self.keymap.items() if not k.startswith(pre)]

    # ---- materialising ---------------------------------------------------------------------------
    def _load_into(self, module: nn.Module, names: dict[str, str], what: str) -> None:
        sd = {}
        for rel, key in names.items():
            t = self.source.get(key).to(self.device, torch.float32)
            if self.source.dtype(key).is_floating_point:
                check_weight(key, t, self.weight_limit)
            sd[rel] = t
        missing = [n for n, p in module.named_parameters() if n not in sd]
        if missing:
            raise WeightsmithError(f"checkpoint lacks {what} tensor {missing[0]} (config.json does not match the weights?)")
        try:
            module.load_state_dict(sd, strict=False, assign=True)
        except RuntimeError as e:
            raise WeightsmithError(f"checkpoint does not match config.json ({what}): {str(e).splitlines()[-1].strip()}") from None

    def load_outside(self) -> None:
        """Materialise everything outside the blocks (embeddings, final norm, heads)."""
        pre = self.blocks_name + "."
        names = {k: v for k, v in self.keymap.items() if not k.startswith(pre)}
        tied = _tied_pairs(self.model)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        sd = {}
        for k, key in names.items():
            if k in params or k in dict(self.model.named_buffers()):
                t = self.source.get(key).to(self.device, torch.float32)
                if self.source.dtype(key).is_floating_point:
                    check_weight(key, t, self.weight_limit)
                sd[k] = t
        self.model.load_state_dict(sd, strict=False, assign=True)
        for target, src in tied.items():
            if target not in sd and src in sd:
                mod_name, _, attr = target.rpartition(".")
                setattr(self.model.get_submodule(mod_name), attr, self.model.get_parameter(src))
        for n, p in self.model.named_parameters():
            if not n.startswith(pre) and p.is_meta:
                raise WeightsmithError(f"checkpoint lacks tensor {n} (config.json does not match the weights?)")

    def unload_outside(self) -> None:
        pre = self.blocks_name + "."
        for name, mod in self.model.named_modules():
            if name == self.blocks_name or name.startswith(pre):
                continue
            _to_meta(mod)

    def load_block(self, i: int) -> nn.Module:
        self._load_into(self.blocks[i], self.block_keys(i), f"block {i}")
        return self.blocks[i]

    def unload_block(self, i: int) -> None:
        for m in self.blocks[i].modules():
            _to_meta(m)

    # ---- block inputs ----------------------------------------------------------------------------
    def capture_inputs(self, ids: torch.Tensor) -> tuple[tuple, dict]:
        """Run the model's own forward on ``ids`` up to block 0; return block 0's (args, kwargs)."""

        def hook(_m, args, kwargs):
            raise _Captured(args, kwargs)

        h = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        kw = {"input_ids": ids.to(self.device)}
        if "use_cache" in _forward_params(self.model):
            kw["use_cache"] = False
        try:
            with torch.no_grad():
                self.model(**kw)
        except _Captured as c:
            return c.args_, c.kwargs_
        finally:
            h.remove()
        raise WeightsmithError("the model's forward never reached its first block")


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` of weights the model ties when its config asks for it."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return dict(tied)
    # older transformers: a list of target names, tied to the input embeddings
    src = None
    emb = model.get_input_embeddings()
    for n, m in model.named_modules():
        if m is emb:
            src = n + ".weight"
    return {t: src for t in tied if src}


def _to_meta(m: nn.Module) -> None:
    for n, p in list(m._parameters.items()):
        if p is not None and not p.is_meta:
            m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
