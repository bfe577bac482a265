"""Run a weightsmith output directory on the lookup-table kernel: load the dequantized model with
transformers, swap every quantized ``nn.Linear`` for a :class:`LutLinear` built from its integer
codes, then generate (``weightsmith run``) or time greedy decoding against the dequantized float
path on the same model, prompt and threads (``weightsmith bench-kernel``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsmithError
from . import lut
from .linear import LutLinear, get_num_threads as _threads, get_table_passes, set_num_threads, set_table_passes

log = logging.getLogger("weightsmith")

PROMPT_TEXT = ("The history of computing is a story of machines that became smaller, faster and cheaper with every "
               "decade, from rooms full of vacuum tubes to chips that fit in a pocket. Along the way engineers learned "
               "that the cost of moving data often matters more than the cost of arithmetic, and that a good algorithm "
               "respects the memory hierarchy. ")


def swap_quantized_layers(model: nn.Module, ckpt, use_kernel: bool = True) -> dict:
    """Replace every quantized ``nn.Linear`` of ``model`` (a :class:`QuantizedCheckpoint`'s layers)
    by a :class:`LutLinear`; returns counts and byte sizes. Layers that are not ``nn.Linear``
    (GPT-2's ``Conv1D``) or whose bit width the kernel does not handle stay in float."""
    swapped, kept, packed_bytes, float_bytes = 0, [], 0, 0
    layouts: dict[str, int] = {}
    planes = [n for n in ckpt.encoded if n not in ckpt.layers and any(e["kind"] == "planes" for e in ckpt.encodings(n))]
    for name in sorted([*ckpt.layers, *planes]):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            kept.append(f"{name} (not a module of the model)")
            continue
        if type(mod) is not nn.Linear:
            kept.append(f"{name} ({type(mod).__name__}, not nn.Linear)")
            continue
        grid = ckpt.grid(name)
        bits = grid.bits if grid is not None else next(int(e["bits"]) for e in ckpt.encodings(name) if e["kind"] == "planes")
        if not 1 <= bits <= 4:
            kept.append(f"{name} ({bits} bits; the kernel handles 1-4)")
            continue
        try:
            if grid is not None:
                new = LutLinear.from_quant_layer(ckpt.layer(name), mod.bias, use_kernel=use_kernel)
            else:
                q, ps, off, gs, b = ckpt.planes(name)
                new = LutLinear.from_planes(q, ps, off, gs, b, mod.bias, use_kernel=use_kernel)
        except ValueError as e:  # qparams the kernel layout cannot hold exactly (see lut.pack)
            kept.append(f"{name} ({e})")
            continue
        float_bytes += mod.weight.numel() * mod.weight.element_size()
        packed_bytes += new.packed_nbytes()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
        key = "dot4" if new.layout == lut.DOT4 else "planes"
        layouts[key] = layouts.get(key, 0) + 1
    for k in kept:
        log.warning("left in float: %s", k)
    return {"quantized_layers": swapped, "float_layers_kept": len(kept), "packed_bytes": packed_bytes, "float_bytes": float_bytes,
            "kernel_layouts": layouts}


HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEAD_INT4 = "int4"  # opt-in: the head quantized at run time (RTN W4 g32 symmetric, clip search) onto the kernel
HEAD_INT8 = "int8"  # opt-in: the head rounded at run time to int8 per row (symmetric), the library's int8 rows kernel
HEAD_CHOICES = (*HEAD_DTYPES, HEAD_INT8, HEAD_INT4)


class _HeadIn(nn.Module):
    """The output head with its weight in a narrower float type (a copy, so a tied input embedding
    keeps its float32 weight): float32 in and out, the matmul in ``weight.dtype``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(self.weight.dtype), self.weight).float()
        return y if self.bias is None else y + self.bias


def quantized_head(weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = True, group_size: int = 32) -> LutLinear:
    """The output head rounded to 4 bits (RTN, groups of 32, symmetric, the grid's clip search) as a
    :class:`LutLinear` — a copy: a tied input embedding keeps its float32 weight. It changes the
    model's outputs (the checkpoint's head stays float): the user opts in."""
    from ..config import GridConfig
    from ..quant.grid import codes
    from ..quant.rtn import rtn_quantize

    w = weight.detach().float()
    gs = group_size if w.shape[1] % group_size == 0 else w.shape[1]
    res = rtn_quantize(w, GridConfig(bits=4, group_size=gs, sym=True, clip_search=True))
    gi = res.g_idx.long()
    q = codes(w, res.scale[:, gi], res.zero[:, gi], 4).to(torch.int32)
    return LutLinear(lut.pack(q, res.scale, res.zero, res.g_idx, 4, layout=lut.preferred_layout(4)), bias, use_kernel=use_kernel)


class Int8Head(nn.Module):
    """The output head rounded to int8, one float32 scale per output row (symmetric, ``absmax / 127``,
    round to nearest) — a copy: a tied input embedding keeps its float32 weight. ``use_kernel``: the
    matmul is the kernel library's (a quarter of a float32 head's bytes read per token): on an AVX-512
    VNNI CPU the rows are repacked once into VNNI tiles (``lut.i8_gemm_tiles``: every token's
    activations rounded to int8 twice, value and residual, each row's products summed in integers in
    its own lane, the head read as one stream), elsewhere the int8 rows kernel widening the weights to
    float in registers (``lut.i8_gemm``); torch's own ``_weight_int8pack_mm`` was slower than a bfloat16
    head on Zen 4, bench/results/kernel_avx512_smollm2_int8.md;
    otherwise, or where the library is unavailable, the float32 matmul of the rounded weight (the
    dequantized path's reference, the same outputs within float rounding)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = True):
        super().__init__()
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise WeightsmithError("--head-dtype int8: the output head has non-finite weights")
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer("qrows", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("tiles", None, persistent=False)  # the VNNI tiles, made from qrows on first kernel use
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = w.shape
        self.use_kernel = use_kernel and self.available()
        self._dense: torch.Tensor | None = None  # the dequantized path's float32 weight, made on first use

    @staticmethod
    def available() -> bool:
        """Whether the kernel library (with its int8 rows kernel) loads here (else the float32 matmul serves)."""
        return lut.available()

    @property
    def qweight(self) -> torch.Tensor:
        """The int8 rows (out, in), however they are held."""
        return self.qrows if self.qrows is not None else lut.i8_unpack_tiles(self.tiles, self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def packed_nbytes(self) -> int:
        return (self.qrows if self.qrows is not None else self.tiles).numel() + 4 * self.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.use_kernel and x2.device.type == "cpu" and self.in_features <= 32768 and lut.i8_vnni():
            if self.tiles is None:  # one copy only: the rows become tiles
                self.tiles, self.qrows = lut.i8_pack_tiles(self.qrows), None
            y = lut.i8_gemm_tiles(self.tiles, self.scale, x2, self.out_features, threads=_threads())
        elif self.use_kernel and x2.device.type == "cpu":
            y = lut.i8_gemm(self.qweight, self.scale, x2, threads=_threads(), act8=True)
        else:  # the dequantized path: the rounded weight in float32, made once
            if self._dense is None:
                self._dense = self.dequantized_weight()
            y = x2 @ self._dense.T
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def head_on_kernel(head: nn.Module) -> bool:
    """Put a rounded head (int4: :class:`LutLinear`, int8: :class:`Int8Head`) on its kernel, where this
    build has it; False for a float head (nothing to do)."""
    if isinstance(head, LutLinear):
        head.use_kernel = True
    elif isinstance(head, Int8Head):
        head.use_kernel = Int8Head.available()
    else:
        return False
    return True


def set_head_dtype(model: nn.Module, dtype: str | None, use_kernel: bool = True) -> str:
    """Put the model's output head (``get_output_embeddings()``, float32 as the checkpoint keeps it) in
    ``dtype``: "float32" leaves it as it is; "bfloat16" halves the bytes every decoded token reads
    there; "int8" rounds it to int8 per row (:class:`Int8Head`: a quarter of the bytes, outputs within
    ~0.1 % of the checkpoint's); "int4" rounds it to 4 bits on the kernel (:func:`quantized_head`: an
    eighth of the bytes, and other outputs). ``use_kernel=False``: the rounded heads multiply as float32
    (the dequantized path). Returns the head's dtype name."""
    if dtype is None or dtype == "float32":
        return "float32"
    if dtype not in HEAD_CHOICES:
        raise WeightsmithError(f"--head-dtype must be one of {', '.join(HEAD_CHOICES)}, not {dtype!r}")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise WeightsmithError(f"--head-dtype {dtype}: the model's output head is a {type(head).__name__}, not nn.Linear")
    bias = None if head.bias is None else head.bias.detach().float().clone()
    if dtype == HEAD_INT4:
        try:
            new = quantized_head(head.weight, bias, use_kernel=use_kernel)
        except ValueError as e:  # scales the kernel layout cannot hold (lut.pack)
            raise WeightsmithError(f"--head-dtype int4: {e}") from None
    elif dtype == HEAD_INT8:
        new = Int8Head(head.weight, bias, use_kernel=use_kernel)
    else:
        new = _HeadIn(head.weight.detach().to(HEAD_DTYPES[dtype]).contiguous(), bias)
    model.set_output_embeddings(new)
    return dtype


def load_float(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..safety import from_pretrained

    path = Path(path)
    try:
        model = from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise WeightsmithError(f"cannot load {path} as a causal LM with transformers: {e}") from None
    try:
        tok = from_pretrained(AutoTokenizer, path)
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok


def load_lut_model(path: str | Path, use_kernel: bool = True):
    """``(model, tokenizer, info)``: the quantized checkpoint at ``path`` with its quantized layers on
    the kernel (``info``: counts, sizes, the kernel's instruction set or why it is unavailable)."""
    from ..export.common import QuantizedCheckpoint

    ckpt = QuantizedCheckpoint(path)
    model, tok = load_float(path)
    with ckpt:
        info = swap_quantized_layers(model, ckpt, use_kernel=use_kernel)
    info.update(_scheme(ckpt), **kernel_info())
    return model, tok, info


def _scheme(ckpt) -> dict:
    """``bits`` and ``group_size`` when every quantized layer has the same (grid or HLQ planes), else None."""
    kinds = {(e["kind"], int(e["bits"]), int(e["group_size"])) for n in ckpt.encoded for e in ckpt.encodings(n)
             if e["kind"] in ("grid", "planes")}
    (_, bits, gs), = kinds if len(kinds) == 1 else ((None, None, None),)
    return {"bits": bits, "group_size": gs, "hlq": any(k == "planes" for k, _, _ in kinds)}


def kernel_info() -> dict:
    return {"kernel": lut.isa()} if lut.available() else {"kernel": "unavailable", "kernel_reason": lut.unavailable_reason()}


def prompt_ids(tok, n: int, vocab: int) -> torch.Tensor:
    """``n`` prompt tokens: a fixed English text repeated, or (without a usable tokenizer) fixed ids."""
    ids: list[int] = []
    if tok is not None:
        piece = tok(PROMPT_TEXT, add_special_tokens=False).input_ids
        if piece and max(piece) < vocab and len(set(piece)) > 4:
            while len(ids) < n:
                ids += piece
    if not ids:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    return torch.tensor([ids[:n]])


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding with the KV cache: ``(new token ids, prefill seconds, decode seconds)``; the
    decode time covers the ``new_tokens - 1`` single-token steps after the prompt."""
    import inspect

    # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` before, now deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    past = getattr(out, key)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{key: past})
        past = getattr(out, key)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    t2 = time.perf_counter()
    return torch.cat(toks, 1)[0], t1 - t0, t2 - t1


def _set_threads(threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise WeightsmithError(f"--threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    set_num_threads(n)
    return n


def _set_passes(passes: int | None) -> int:
    if passes is not None:
        if passes not in (1, 2):
            raise WeightsmithError(f"--table-passes must be 1 (int8 tables) or 2 (int8 + residual), not {passes}")
        set_table_passes(passes)
    return get_table_passes()


RUNTIMES = ("auto", "lean", "transformers")


def _lean(model, max_len: int, runtime: str):
    """The lean decoder for ``runtime`` ("auto": where the architecture allows; "lean": required), or None."""
    from .lean import LeanDecoder, unsupported_reason

    if runtime not in RUNTIMES:
        raise WeightsmithError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "transformers":
        return None
    why = unsupported_reason(model, max_len)
    if why:
        if runtime == "lean":
            raise WeightsmithError(f"--runtime lean: {why}")
        log.info("decoding through transformers: the lean loop does not run %s", why)
        return None
    return LeanDecoder(model, max_len)


def _runtime_name(dec) -> str:
    return "transformers" if dec is None else "lean (one library call per token)" if dec.native is not None else "lean (torch ops)"


def run(path: str | Path, prompt: str, max_new_tokens: int = 64, threads: int | None = None,
        table_passes: int | None = None, head_dtype: str | None = None, runtime: str = "auto") -> dict:
    """Generate greedily from ``prompt`` with the quantized layers on the kernel; ``runtime``: the lean
    loop (``kernels/lean.py``) where the architecture allows ("auto"), always ("lean"), or never ("transformers")."""
    threads = _set_threads(threads)
    passes = _set_passes(table_passes)
    model, tok, info = load_lut_model(path)
    info["head_dtype"] = set_head_dtype(model, head_dtype)
    if tok is None:
        raise WeightsmithError(f"{path} has no tokenizer; `weightsmith run` needs one to read --prompt")
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise WeightsmithError("--prompt is empty after tokenization")
    if max_new_tokens < 1:
        raise WeightsmithError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    dec = _lean(model, ids.shape[1] + max_new_tokens, runtime)
    info["runtime"] = _runtime_name(dec)
    if dec is not None:
        from .lean import greedy as lean_greedy

        new, t_prefill, t_decode = lean_greedy(dec, ids, max_new_tokens)
    else:
        new, t_prefill, t_decode = greedy(model, ids, max_new_tokens)
    eos = tok.eos_token_id
    lst = new.tolist()
    if eos is not None and eos in lst:
        lst = lst[: lst.index(eos)]
    info.update(threads=threads, table_passes=passes, prompt_tokens=int(ids.shape[1]), new_tokens=len(new),
                prompt_tokens_per_s=ids.shape[1] / t_prefill,
                decode_tokens_per_s=(len(new) - 1) / t_decode if len(new) > 1 and t_decode > 0 else None,
                text=tok.decode(lst, skip_special_tokens=True))
    return info


def bench_kernel(path: str | Path, threads: int | None = None, prompt_tokens: int = 64, new_tokens: int = 128,
                 warmup_tokens: int = 4, table_passes: int | None = None, head_dtype: str | None = None) -> dict:
    """Decode and prompt tokens/s of the kernel vs the dequantized float32 path (the model's own
    ``nn.Linear``), same model, prompt and threads; greedy, batch 1 — through transformers, and (where the
    architecture allows) both again through the lean loop (``lean_*`` keys)."""
    from ..export.common import QuantizedCheckpoint

    if new_tokens < 2 or prompt_tokens < 1:
        raise WeightsmithError("bench-kernel needs --new-tokens >= 2 and --prompt-tokens >= 1")
    threads = _set_threads(threads)
    passes = _set_passes(table_passes)
    ckpt = QuantizedCheckpoint(path)
    model, tok = load_float(path)
    ids = prompt_ids(tok, prompt_tokens, model.config.vocab_size)
    # a rounded head (int8, int4) runs dequantized (float32 matmul of its rounded weight) on the dequantized path, on its kernel on the kernel's
    res = {"model": str(path), **_scheme(ckpt), "threads": threads, "table_passes": passes,
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "head_dtype": set_head_dtype(model, head_dtype, use_kernel=False)}

    from .lean import greedy as lean_greedy
    from .lean import unsupported_reason

    lean_ok = unsupported_reason(model, prompt_tokens + new_tokens) is None

    def timed(tag, lean=False):
        dec = _lean(model, prompt_tokens + new_tokens, "lean") if lean else None
        gen = (lambda i, n: lean_greedy(dec, i, n)) if lean else (lambda i, n: greedy(model, i, n))
        gen(ids[:, : min(8, prompt_tokens)], warmup_tokens)
        toks, tp, td = gen(ids, new_tokens)
        res[f"{tag}_decode_tokens_per_s"] = round((new_tokens - 1) / td, 3)
        res[f"{tag}_prompt_tokens_per_s"] = round(prompt_tokens / tp, 3)
        if lean:
            res[f"{tag}_runtime"] = _runtime_name(dec)
        return toks

    ref = timed("dequant")
    if lean_ok:
        timed("lean_dequant", lean=True)
    with ckpt:
        res.update(swap_quantized_layers(model, ckpt))
    head = model.get_output_embeddings()
    if head_on_kernel(head):
        res["head_packed_bytes"] = head.packed_nbytes()
    res.update(kernel_info())
    if lut.available():
        got = timed("kernel")
        diff = (got != ref).nonzero()
        res["greedy_tokens_same_prefix"] = int(diff[0, 0]) if diff.numel() else new_tokens
        res["decode_speedup"] = round(res["kernel_decode_tokens_per_s"] / res["dequant_decode_tokens_per_s"], 3)
        if lean_ok:
            got = timed("lean_kernel", lean=True)
            diff = (got != ref).nonzero()
            res["lean_greedy_tokens_same_prefix"] = int(diff[0, 0]) if diff.numel() else new_tokens
            res["lean_decode_speedup"] = round(res["lean_kernel_decode_tokens_per_s"] / res["lean_dequant_decode_tokens_per_s"], 3)
    else:
        res["kernel_decode_tokens_per_s"] = None
        res["kernel_prompt_tokens_per_s"] = None
    return res
