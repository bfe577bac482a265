"""GPTQ format (AutoGPTQ / GPTQModel / transformers' GPTQ loader).

Per quantized layer ``NAME`` (``k = 32 // bits`` codes per int32):

* ``NAME.qweight`` int32 (in / k, out): column ``o`` holds the codes of output row ``o``; word
  ``i`` packs input columns ``i·k … i·k + k - 1``, column ``i·k + j`` at bits ``j·bits``.
* ``NAME.qzeros`` int32 (n_groups, out / k): zero points packed along the output dimension the same way.
* ``NAME.scales`` float16 (n_groups, out) — fp16 is the format's scale type: each scale is rounded to
  fp16 (relative change ≤ 2⁻¹¹).
* ``NAME.g_idx`` int32 (in,): the group of every input column (act-order may permute it).

Zero-point convention: ``checkpoint_format: gptq`` (v1, what AutoGPTQ wrote and most checkpoints on
the Hub use) stores ``zero - 1``; loaders add the 1 back (GPTQModel converts v1 to its internal v2 by
adding 1 to every packed field). ``gptq_v2`` stores ``zero`` itself. In v1 an asymmetric zero point of
0 becomes -1, i.e. ``2**bits - 1`` in its field, and the +1 on load carries into the neighbouring
field — so v1 cannot hold a zero point of 0 and such checkpoints are refused (use ``gptq_v2``).
Dequantization: ``w[o, c] = scales[g, o] · (q[c, o] - zero[g, o])`` with ``g = g_idx[c]``.

Bits 2, 4 and 8 are written (3-bit GPTQ uses a different, word-straddling layout: refused, the layer named).

Mixed grids (GPTQModel's convention): the most common grid is the top-level ``bits`` /
``group_size`` / ``sym``; each layer with another grid has a ``dynamic`` rule
``"+:^<escaped name>$": {"bits": b, "group_size": g, "sym": s}``, each float linear inside the model
``"-:^<escaped name>$": {}``. ``desc_act`` is global (true when any layer's g_idx is permuted; g_idx
is stored for every layer either way). A low-rank encoding is refused (``HOLDS``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import WeightsmithError
from .common import QuantizedCheckpoint, QuantLayer, unquantized_linears, write_hf_packed

HOLDS = frozenset({"grid", "sparsity"})  # sparsity: as exact zeros on the grid or in a float ("-:") layer

GPTQ_BITS = (2, 4, 8)
FORMATS = {"v1": "gptq", "v2": "gptq_v2"}


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) codes < 2**bits → int32 (n, m / k): ``k = 32 // bits`` consecutive columns per word,
    column ``j`` of a word at bits ``j·bits``."""
    k = 32 // bits
    n, m = codes.shape
    c = codes.to(torch.int64).reshape(n, m // k, k)
    shifts = torch.arange(k, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # disjoint bit fields: the sum is an or
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def pack_layer(layer: QuantLayer, version: str) -> dict[str, torch.Tensor]:
    bits = layer.bits
    k = 32 // bits
    out, cols = layer.shape
    if cols % k or out % k:
        raise WeightsmithError(f"layer {layer.name} ({out}x{cols}): GPTQ packs {k} {bits}-bit codes per int32, so both widths must be multiples of {k}")
    zero = layer.zero.t().contiguous()  # (n_groups, out)
    if version == "v1":
        if int(zero.min()) == 0:
            raise WeightsmithError(f"layer {layer.name} has a zero point of 0, which the GPTQ v1 format ('zeros minus one') cannot hold; export with --gptq-version v2")
        zero = zero - 1
    return {
        "qweight": _pack_in(layer.q, bits),
        "qzeros": pack_cols(zero, bits),
        "scales": layer.scale.t().to(torch.float16).contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }


def _pack_in(q: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight: codes (out, in) packed along the input dimension → (in / k, out)."""
    return pack_cols(q.contiguous(), bits).t().contiguous()


def quantize_config(ckpt: QuantizedCheckpoint, version: str, desc_act: bool, skip: list[str]) -> dict:
    """The most common grid is the top-level config; every layer with another grid gets a GPTQModel
    ``dynamic`` rule ``"+:^name$": {bits, group_size, sym}``, every float linear inside the model a
    ``"-:^name$": {}`` (not quantized)."""
    top = ckpt.distinct_grids()[0]
    cfg = {
        "bits": top.bits,
        "group_size": top.group_size,
        "desc_act": desc_act,
        "sym": top.sym,
        "lm_head": False,
        "true_sequential": bool(ckpt.report.get("config", {}).get("sequential", True)),
        "static_groups": bool(ckpt.method.get("static_groups", True)),
        "damp_percent": ckpt.method.get("damp", 0.01),
        "quant_method": "gptq",
        "checkpoint_format": FORMATS[version],
        "meta": {"quantizer": ["weightsmith"]},
    }
    dynamic = {}
    for n in ckpt.layers:  # GPTQModel's per-module rules: "+:" overrides the grid of a module
        g = ckpt.grid(n)
        if g != top:
            dynamic["+:^" + re.escape(n) + "$"] = {"bits": g.bits, "group_size": g.group_size, "sym": g.sym}
    inner = [n for n in skip if not n.endswith("lm_head")]
    for n in inner:  # "-:" excludes a module from quantization
        dynamic["-:^" + re.escape(n) + "$"] = {}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def check_gptq(ckpt: QuantizedCheckpoint, version: str) -> None:
    """Refuse, before writing, a version or a layer's grid GPTQ cannot pack (the layer named)."""
    if version not in FORMATS:
        raise WeightsmithError(f"unknown GPTQ checkpoint version {version!r}; choose v1 or v2")
    if not ckpt.layers:
        raise WeightsmithError(f"{ckpt.dir}: no layer has a grid encoding, so there is nothing for GPTQ to pack; the directory is a float model as it is")
    for n in ckpt.layers:
        g = ckpt.grid(n)
        if g.bits not in GPTQ_BITS:
            raise WeightsmithError(f"the GPTQ format is written for {', '.join(map(str, GPTQ_BITS))}-bit grids, not {g.bits}-bit "
                                   f"(layer {n}; 3-bit GPTQ packing is not supported)")
        k = 32 // g.bits
        out, cols = ckpt.source.shape(f"{n}.weight")[:2]
        if cols % k or out % k:
            raise WeightsmithError(f"layer {n} ({out}x{cols}): GPTQ packs {k} {g.bits}-bit codes per int32, so both widths must be multiples of {k}")


def export_gptq(ckpt: QuantizedCheckpoint, out: Path, version: str = "v1") -> dict:
    check_gptq(ckpt, version)
    desc_act = False
    seen: list[bool] = []

    def pack(layer: QuantLayer) -> dict:
        seen.append(not layer.natural_groups())
        return pack_layer(layer, version)

    skip = unquantized_linears(ckpt)
    # desc_act is only known after reading the g_idx: write config first with a placeholder, then fix it
    write_hf_packed(ckpt, out, pack, {})
    desc_act = any(seen)
    qc = quantize_config(ckpt, version, desc_act, skip)
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
    return {"checkpoint_format": FORMATS[version], "desc_act": desc_act}
