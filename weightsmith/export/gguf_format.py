"""GGUF for llama.cpp, written through the ``gguf`` package from our integer codes (no re-quantization).

Which of our grids a GGUF type holds (blocks of 32 consecutive input columns, one fp16 scale each):

=========  ===============================  ==========================================================
type       holds                            how
=========  ===============================  ==========================================================
Q4_0       4-bit symmetric                  ``w = d·(q - 8)``: ``d = fp16(scale)``, the codes as they are
Q4_1       4-bit, symmetric or asymmetric   ``w = d·q + m``: ``d = fp16(scale)``, ``m = fp16(-scale·zero)``
Q8_0       8-bit symmetric                  ``w = d·q8``: ``q8 = q - 128`` (int8), ``d = fp16(scale)``
=========  ===============================  ==========================================================

Exact up to the fp16 rounding of ``d`` (relative ≤ 2⁻¹¹ ≈ 4.9e-4) and of ``m`` (absolute ≤
2⁻¹¹·|scale·zero|), provided every block of 32 columns lies in one of our groups: group sizes that
are multiples of 32 (act-order with static groups included; a last, shorter group too when it is a
multiple of 32), per-row grids, and widths that are multiples of 32. Anything else is refused.

The k-quants (Q4_K, Q5_K, Q6_K, Q2_K, Q3_K) store each 16/32-column sub-block scale as a 6- or
8-bit integer times one fp16 scale per 256 columns; our scales are free float32 numbers per group,
so no weightsmith grid maps onto them without re-quantizing — they are refused with that reason.

Mixed grids: a type per tensor, each layer's from its own grid (the table above); ``--gguf-type``
is then an override that must hold every layer's grid (Q4_1 holds W4 sym and asym), else it is
refused naming a layer that does not fit; a grid no type holds (3-bit, 8-bit asymmetric …) is refused
naming its layer. ``general.file_type`` is the most common type. Layers without a grid (float, or
only pruned: exact zeros) are written as F16 like every other matrix; low rank is refused (``HOLDS``).

Tensors we do not quantize: 1-D (norms, biases) as F32 (llama.cpp requires it), matrices as F16,
except the token embedding and an untied output head, whose type ``embedding_type`` / ``output_type``
choose (``--gguf-embedding-type Q8_0`` gives the size of llama.cpp's own Q4_0 file; F16, the default,
keeps the weights the report measured). For Llama-style models the q/k rows are permuted as
llama.cpp's ``convert_hf_to_gguf.py`` does (a row permutation: exact for per-row codes and scales).
Metadata from the config; the tokenizer through gguf-py (``gguf_vocab``: the pre-tokenizer llama.cpp
needs is identified from ``tokenizer.json`` or the export is refused); or, with ``template=`` a GGUF of
the same model (e.g. the llama.cpp file a float model came from), its ``tokenizer.*`` keys are copied
as they are.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsmithError
from .common import QuantizedCheckpoint, QuantLayer
from .gguf_vocab import check_tokenizer, write_tokenizer

log = logging.getLogger(__name__)

BLOCK = 32
EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTE_QK = {"llama"}
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # LlamaFileType MOSTLY_*


# Types for the matrices we do not quantize (token embedding, an untied output head): F16 keeps what we
# measured; the others round them to nearest with gguf-py's quantizer, as llama.cpp's own Q4_0 file does
# (its token_embd is Q8_0 when the width is not a multiple of 256): smaller, and no longer what the report measured.
FLOAT_TYPES = ("F16", "F32", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def float_type(requested: str | None, what: str) -> str | None:
    if requested is None:
        return None
    t = requested.upper()
    if t not in FLOAT_TYPES:
        raise WeightsmithError(f"unsupported GGUF {what} type {requested!r}; choose one of {', '.join(FLOAT_TYPES)}")
    return t


HOLDS = frozenset({"grid", "sparsity"})  # sparsity: as exact zeros in F16 tensors or (up to fp16 rounding) in the blocks
NATURAL = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}


def choose_type(bits: int, sym: bool, requested: str | None, layer: str | None = None) -> str:
    """The GGUF type of a ``bits``-bit grid: ``requested`` when it holds it exactly, else refused."""
    where = f" (layer {layer})" if layer else ""
    t = (requested or "").upper() or None
    if t in KQUANTS:
        raise WeightsmithError(f"GGUF {t} stores sub-block scales as small integers times one fp16 scale per 256 columns, "
                               "which no weightsmith grid (a free float scale per group) maps onto without re-quantizing; "
                               "use Q4_0 (W4 sym), Q4_1 (W4) or Q8_0 (W8 sym)")
    if t is not None and t not in EXACT_TYPES:
        raise WeightsmithError(f"unknown or unsupported GGUF type {requested!r}; weightsmith writes {', '.join(EXACT_TYPES)}")
    if t is None:
        t = NATURAL.get((bits, sym))
        if t is None:
            raise WeightsmithError(f"no GGUF type holds a {bits}-bit {'symmetric' if sym else 'asymmetric'} grid exactly{where} "
                                   "(Q4_0: W4 sym, Q4_1: W4, Q8_0: W8 sym)")
    need = {"Q4_0": (4, True), "Q4_1": (4, None), "Q8_0": (8, True)}[t]
    if bits != need[0] or (need[1] is not None and sym != need[1]):
        kind = f"{need[0]}-bit" + (" symmetric" if need[1] else "")
        what = f"layer {layer} is" if layer else "this checkpoint is"
        raise WeightsmithError(f"GGUF {t} holds {kind} grids; {what} {bits}-bit {'symmetric' if sym else 'asymmetric'}")
    return t


def layer_types(ckpt: QuantizedCheckpoint, requested: str | None = None) -> dict[str, str]:
    """The GGUF type of every grid layer: from its own grid (Q4_0 / Q4_1 / Q8_0), or ``requested``
    for all of them — which must then hold every layer's grid, else refused naming the layer."""
    return {n: choose_type(ckpt.grid(n).bits, ckpt.grid(n).sym, requested, None if ckpt.uniform else n) for n in ckpt.layers}


def block_params(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every 32-column block (rows, cols / 32); refuses blocks that span groups."""
    out, cols = layer.shape
    if cols % BLOCK:
        raise WeightsmithError(f"layer {layer.name}: width {cols} is not a multiple of 32, GGUF's block size")
    g = layer.g_idx.long().reshape(cols // BLOCK, BLOCK)
    if not bool((g == g[:, :1]).all()):
        raise WeightsmithError(f"layer {layer.name}: a block of 32 columns spans several of our groups (group size not a multiple "
                               "of 32, or act-order without static groups); GGUF cannot hold it")
    return layer.scale[:, g[:, 0]], layer.zero[:, g[:, 0]]


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes < 16 → (n, 16) bytes: byte j = q[j] | q[j+16] << 4 (ggml's layout)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def encode(layer: QuantLayer, qtype: str, rows: torch.Tensor | None = None) -> np.ndarray:
    """The layer's codes as GGUF blocks: uint8 (out, cols / 32 · bytes per block)."""
    scale, zero = block_params(layer)
    q = layer.q
    if rows is not None:
        q, scale, zero = q[rows], scale[rows], zero[rows]
    out, cols = q.shape
    nb = cols // BLOCK
    qb = q.numpy().astype(np.uint8).reshape(out * nb, BLOCK)
    d = scale.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
    if qtype == "Q4_0":
        if not bool((zero == 8).all()):
            raise WeightsmithError(f"layer {layer.name}: Q4_0 needs a symmetric grid (zero point 8)")
        blocks = np.concatenate([d, _nibbles(qb)], axis=1)
    elif qtype == "Q4_1":
        m = (-scale * zero.float()).numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
        blocks = np.concatenate([d, m, _nibbles(qb)], axis=1)
    elif qtype == "Q8_0":
        if not bool((zero == 128).all()):
            raise WeightsmithError(f"layer {layer.name}: Q8_0 needs a symmetric grid (zero point 128)")
        blocks = np.concatenate([d, (qb.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    else:  # pragma: no cover - choose_type guards
        raise WeightsmithError(f"unsupported GGUF type {qtype}")
    return np.ascontiguousarray(blocks.reshape(out, -1))


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q (n_head = heads) or k (n_head = kv heads)."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def _rope_theta(cfg: dict) -> float | None:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters") or {}
    return float(rp["rope_theta"]) if "rope_theta" in rp else None


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type")
    return rs if kind not in (None, "default") else None


def export_gguf(ckpt: QuantizedCheckpoint, out: Path, qtype: str | None = None, template: str | Path | None = None,
                embedding_type: str = "F16", output_type: str | None = None, unverified_tokenizer: bool = False) -> dict:
    import gguf

    types = layer_types(ckpt, qtype)
    counts_t = Counter(types.values())
    t = counts_t.most_common(1)[0][0] if types else None
    cfg = _text_config(ckpt.config_dict())
    model_type = cfg.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise WeightsmithError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {model_type!r}")
    if _rope_scaling(cfg):
        raise WeightsmithError(f"GGUF export does not write rope scaling ({_rope_scaling(cfg)}); not supported yet")
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(str(cfg.get("_name_or_path") or ckpt.dir.name))
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if _rope_theta(cfg) is not None:
        w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(FILE_TYPES[t] if t else 1)  # the most common type ("mostly Q4_0"); only float layers: MOSTLY_F16
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    u = ckpt.uniform
    if u is not None:
        w.add_quantized_by(f"weightsmith ({ckpt.method.get('name', '?')} W{u.bits} g{u.group_size} {'sym' if u.sym else 'asym'})")
    else:
        mixed = ", ".join(f"W{g['bits']} g{g['group_size']} {'sym' if g['sym'] else 'asym'} x{g['layers']}" for g in ckpt.grid_summary())
        w.add_quantized_by(f"weightsmith ({ckpt.method.get('name', '?')} mixed: {mixed or 'float'})")
    if template is not None:
        _copy_template_kv(w, Path(template))
        pre = "(template)"
    else:
        pre = write_tokenizer(w, ckpt.dir, int(cfg["vocab_size"]), unverified_tokenizer)

    layers = set(ckpt.layers)
    counts = {"quantized": 0, "f16": 0, "f32": 0}
    for key in ckpt.source.keys():
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WeightsmithError(f"tensor {key} has no GGUF name for architecture {arch}")
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        rows = None
        if arch in PERMUTE_QK and name.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.bias", ".attn_k.bias")):
            nh = n_head if ".attn_q." in name else n_kv
            rows = qk_permutation(ckpt.source.shape(key)[0], nh)
        if base in layers:
            w.add_tensor(name, encode(ckpt.layer(base), types[base], rows), raw_dtype=gguf.GGMLQuantizationType[types[base]])
            counts["quantized"] += 1
            continue
        x = ckpt.source.get(key).float()
        if rows is not None:
            x = x[rows]
        if x.ndim == 1:
            w.add_tensor(name, x.numpy().astype(np.float32))
            counts["f32"] += 1
            continue
        ftype = embedding_type if name.startswith("token_embd.") else (output_type or embedding_type) if name.startswith("output.") else "F16"
        if ftype in ("F16", "F32"):
            w.add_tensor(name, x.numpy().astype(np.float16 if ftype == "F16" else np.float32))
        else:  # round-to-nearest in llama.cpp's own block format, by gguf-py's quantizer
            qt = gguf.GGMLQuantizationType[ftype]
            w.add_tensor(name, gguf.quants.quantize(x.numpy().astype(np.float32), qt), raw_dtype=qt)
        counts[ftype.lower()] = counts.get(ftype.lower(), 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = {"gguf_type": t, "tensors": counts, "pre_tokenizer": pre}
    if len(counts_t) > 1:
        info["gguf_types"] = dict(sorted(counts_t.items()))
    return info


def _copy_template_kv(w, template: Path) -> None:
    import gguf

    try:
        r = gguf.GGUFReader(str(template))
    except Exception as e:  # noqa: BLE001 - the reader raises many types on bad files
        raise WeightsmithError(f"cannot read GGUF template {template}: {e}") from None
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, val, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, val, vtype)


def write_atomically(out: Path, overwrite: bool, fn) -> dict:
    """Write the single file ``out`` via a temporary file in the same directory and a rename."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise WeightsmithError(f"output {out} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise WeightsmithError(f"output directory's parent {out.parent} does not exist")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        info = fn(tmp)
        if os.path.lexists(out) and not overwrite:  # never replace what this run did not create
            raise WeightsmithError(f"output {out} appeared while this run was writing it; it was not replaced (pass --overwrite to replace it)")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return info
