"""compressed-tensors ``pack-quantized``: what llm-compressor writes and vLLM serves.

Per quantized layer ``NAME`` (layout of compressed-tensors 0.20, ``pack_quantized/helpers.py``):

* ``NAME.weight_packed`` int32 (out, ceil(in·bits/32)): the codes of each row as one little-endian
  bit stream, element ``c`` at bit ``c·bits`` (dense: a code may straddle two words when 32 is not a
  multiple of ``bits``; for 2, 4 and 8 bits this is also the older one-word-per-32/bits layout).
  The stored code is the *unsigned* one, ``q = q_signed + 2**(bits-1)`` — exactly our ``q``.
* ``NAME.weight_scale`` (out, n_groups) in the checkpoint's dtype (float32 for our float32 dirs).
* ``NAME.weight_zero_point`` (asymmetric grids only) int32 (ceil(out·bits/32), n_groups): our zero
  points packed the same way along dim 0 (compressed-tensors' signed zero point is ``zero - 2**(bits-1)``).
* ``NAME.weight_shape`` int64 ``[out, in]``.

compressed-tensors ≥ 0.1x dequantizes groups as contiguous column ranges of exactly ``group_size``
and has removed activation-ordered ``g_idx`` groups (``actorder: group``). Hence:

* act-order with *static* groups (our default: groups follow column order) is written as
  ``actorder: static`` — the format is the same as without act-order;
* a permuted ``g_idx`` (``--no-static-groups``) is refused;
* a group size that does not divide every layer's width is written, exactly, with the largest group
  size that divides both it and every width (``gcd``), each scale repeated; a warning says so.

Mixed grids: one ``config_groups`` entry per distinct (bits, group size, sym, actorder), whose
``targets`` are the exact module names of its layers (compressed-tensors 0.20 matches a plain target
against the module name exactly; ``re:`` would make it a regex); a uniform checkpoint keeps the one
group targeting ``Linear``. Layers without a grid (float, or only pruned) are in ``ignore``.
Sparsity is held as exact zeros; a low-rank encoding is refused (``HOLDS``).

**Sparse compression.** compressed-tensors 0.20 has no sparse compressor: its ``sparse-bitmask``
and ``sparse-24-bitmask`` formats survive as configuration classes only (no compressor is registered
for them, :func:`sparse_compressors`), its ``ModelCompressor`` writes an empty ``sparsity_config``
("sparsity is removed for now") and refuses the 2:4 (Sparse24) configs when loading. So a pruned
layer on a grid is written pack-quantized with its zeros as codes (the export result's
``sparsity`` entry says so, with the density measured from the codes), and a checkpoint that is only
pruned (no grid) is refused with that reason: the dense directory with exact zeros is then the
output (it loads anywhere; the mask is its encoding). Writing a bitmask by hand would produce a
checkpoint no installed loader reads back.
"""
from __future__ import annotations

import logging
import math
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsmithError
from .common import Grid, QuantizedCheckpoint, QuantLayer, unquantized_linears, write_hf_packed

HOLDS = frozenset({"grid", "sparsity"})  # sparsity: as exact zeros on the grid or in a float (ignored) layer

log = logging.getLogger(__name__)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) → int32 (rows, ceil(n·bits/32)): element ``i`` at bit ``i·bits`` of
    the row's little-endian bit stream."""
    rows, n = codes.shape
    words = math.ceil(n * bits / 32)
    out = np.empty((rows, words), dtype="<u4")
    shifts = np.arange(bits, dtype=np.uint32)
    for a in range(0, rows, 512):
        c = codes[a : a + 512].numpy().astype(np.uint32)
        bitarr = ((c[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(c.shape[0], n * bits)
        pad = words * 32 - n * bits
        if pad:
            bitarr = np.pad(bitarr, ((0, 0), (0, pad)))
        out[a : a + 512] = np.packbits(bitarr, axis=1, bitorder="little").view("<u4")
    return torch.from_numpy(out.view(np.int32).copy())


def effective_group_size(group_size: int, widths: list[int], names: list[str] | None = None) -> int:
    """The group size to write for layers of widths ``widths``: ``group_size`` when it divides every
    width, else the gcd (scales repeated)."""
    if group_size == -1:
        return -1
    g = reduce(math.gcd, widths, group_size)
    if g != group_size:
        bad = sorted({w for w in widths if w % group_size})
        log.warning("group size %d does not divide the width(s) %s, which compressed-tensors requires; "
                    "writing group size %d with each scale repeated %d times (same weights, larger scale tensors)",
                    group_size, bad, g, group_size // g)
    return g


def pack_layer(layer: QuantLayer, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    out, cols = layer.shape
    if group_size == -1:
        cols_group = torch.zeros(cols, dtype=torch.long)
    else:
        cols_group = torch.arange(cols) // group_size
    # the group of our grid that every written group falls in (exact: each written group lies inside one of ours)
    first = torch.arange(0, cols, cols if group_size == -1 else group_size)
    src = layer.g_idx.long()[first]
    if not torch.equal(layer.g_idx.long(), src[cols_group]):
        raise WeightsmithError(f"layer {layer.name} has activation-ordered groups (a permuted g_idx); compressed-tensors "
                               "removed that layout (actorder: group) — quantize with --static-groups (the default), or export --format gptq")
    t = {
        "weight_packed": pack_rows_int32(layer.q, layer.bits),
        "weight_scale": layer.scale[:, src].to(layer.dtype).contiguous(),
        "weight_shape": torch.tensor([out, cols], dtype=torch.int64),
    }
    if not sym:
        t["weight_zero_point"] = pack_rows_int32(layer.zero[:, src].t().contiguous(), layer.bits).t().contiguous()
    return t


def _weights_args(grid: Grid, group_size: int, actorder: bool) -> dict:
    return {
        "actorder": "static" if actorder else None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None if group_size == -1 else group_size,
        "num_bits": grid.bits,
        "observer": "minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": "channel" if group_size == -1 else "group",
        "symmetric": grid.sym,
        "type": "int",
        "zp_dtype": None if grid.sym else "torch.int8",
    }


def quantization_config(groups: list[tuple[Grid, int, bool, list[str]]], ignore: list[str], uniform: bool) -> dict:
    """``groups``: (grid, written group size, actorder, layer names) — one ``config_groups`` entry each.
    A uniform checkpoint has one group targeting ``Linear`` (every linear not in ``ignore``); mixed
    grids target their layers by exact module name (compressed-tensors matches a plain target string
    against the module name exactly, ``re:`` prefixes a regex)."""
    try:
        import compressed_tensors

        version = compressed_tensors.__version__
    except ImportError:  # writing needs no package; loading does
        version = "0.20.0"
    cg = {}
    for i, (grid, gs, actorder, names) in enumerate(groups):
        cg[f"group_{i}"] = {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                            "targets": ["Linear"] if uniform else list(names), "weights": _weights_args(grid, gs, actorder)}
    return {
        "config_groups": cg,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def _actorder(ckpt: QuantizedCheckpoint, name: str) -> bool:
    g = next(e for e in ckpt.encodings(name) if e["kind"] == "grid")
    return bool(g.get("act_order", ckpt.method.get("act_order")))


SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "marlin-24")


def sparse_compressors() -> list[str]:
    """The sparse compression formats the installed compressed-tensors has a compressor for (0.20: none)."""
    try:
        from compressed_tensors.compressors import BaseCompressor
    except ImportError:
        return []
    have = set(BaseCompressor.registered_names()) if hasattr(BaseCompressor, "registered_names") else set()
    return [f for f in SPARSE_FORMATS if f in have]


def ct_version() -> str:
    try:
        import compressed_tensors

        return compressed_tensors.__version__
    except ImportError:
        return "not installed"


def no_sparse_reason() -> str:
    have = sparse_compressors()
    if have:  # a later compressed-tensors: not written by this weightsmith (untested against it)
        return (f"compressed-tensors {ct_version()} has the sparse compressor(s) {', '.join(have)}, which this weightsmith does not "
                "write yet")
    return (f"compressed-tensors {ct_version()} has no sparse compressor (its sparse-bitmask / sparse-24-bitmask formats are "
            "configuration classes only, and it writes and reads no sparsity_config), so a pruned checkpoint cannot be "
            "written compressed with it")


def check_compressed_tensors(ckpt: QuantizedCheckpoint) -> None:
    """Refuse, before writing, a grid pack-quantized cannot hold (naming a layer)."""
    if not ckpt.layers:
        pruned = [n for n in ckpt.encoded if any(e["kind"] == "sparsity" for e in ckpt.encodings(n))]
        if pruned:
            raise WeightsmithError(f"{ckpt.dir} is pruned ({len(pruned)} layers with a mask) but not quantized: {no_sparse_reason()}; "
                                   "the directory itself (dense, exact zeros) is the checkpoint to use, or add a quantizer "
                                   "(e.g. --method wanda,gptq) to pack it")
        raise WeightsmithError(f"{ckpt.dir}: no layer has a grid encoding, so there is nothing to pack-quantize; the directory is a float model as it is")
    for n in ckpt.layers:
        b = ckpt.grid(n).bits
        if not 1 <= b <= 8:
            raise WeightsmithError(f"compressed-tensors pack-quantized holds 1..8-bit integers, not {b}-bit (layer {n})")


def plan_groups(ckpt: QuantizedCheckpoint) -> list[tuple[Grid, int, bool, list[str]]]:
    """One entry per distinct (bits, written group size, sym, actorder), the largest first."""
    by_grid: dict[tuple[Grid, bool], list[str]] = {}
    for g in ckpt.distinct_grids():
        for n in ckpt.layers:
            if ckpt.grid(n) == g:
                by_grid.setdefault((g, _actorder(ckpt, n)), []).append(n)
    merged: dict[tuple, list] = {}
    for (g, ao), names in by_grid.items():
        gs = effective_group_size(g.group_size, [ckpt.source.shape(f"{n}.weight")[1] for n in names])
        key = (g.bits, gs, g.sym, ao)
        merged.setdefault(key, [g, gs, ao, []])[3].extend(names)
    return [(g, gs, ao, sorted(names)) for g, gs, ao, names in merged.values()]


def export_compressed_tensors(ckpt: QuantizedCheckpoint, out: Path) -> dict:
    check_compressed_tensors(ckpt)
    groups = plan_groups(ckpt)
    ignore = unquantized_linears(ckpt)
    qc = quantization_config(groups, ignore, uniform=len(groups) == 1)
    written = {n: (g, gs) for g, gs, _, names in groups for n in names}
    nz = {"zeros": 0, "numel": 0, "layers": 0}

    def pack(layer: QuantLayer) -> dict:
        if any(e["kind"] == "sparsity" for e in ckpt.encodings(layer.name)):  # density from the codes written, not the mask
            zero_code = layer.zero[:, layer.g_idx.long()]
            nz["zeros"] += int((layer.q == zero_code).sum())
            nz["numel"] += layer.q.numel()
            nz["layers"] += 1
        return pack_layer(layer, written[layer.name][1], layer.sym)

    write_hf_packed(ckpt, out, pack, qc)
    info: dict = {"group_size_written": groups[0][1], "ignore": ignore} if len(groups) == 1 else \
        {"group_size_written": {f"group_{i}": gs for i, (_, gs, _, _) in enumerate(groups)}, "ignore": ignore, "config_groups": len(groups)}
    if nz["layers"]:
        info["sparsity"] = {"layers": nz["layers"], "density": 1 - nz["zeros"] / nz["numel"],
                            "stored_as": f"zeros as codes in pack-quantized (no sparse compression: {no_sparse_reason()})"}
    return info
