"""``weightsmith inspect MODEL``: what is in a checkpoint — tensors, dtypes, the quantization scheme
of each layer (every layer may have its own grid), bits per weight as stored (and, for weightsmith's
dequantized dirs, as a packed format would store them), per scheme and overall, size on disk — and, against ``--reference ORIGINAL``, each
matrix's relative Frobenius error ‖W − W_ref‖ / ‖W_ref‖. Every matrix's density (share of nonzeros) and
the N:M patterns it satisfies are measured from its weights (``prune/check.py``), with the overall
density over the blocks' matrices.

Reads weightsmith dequantized dirs, compressed-tensors pack-quantized, GPTQ format, GGUF and plain
float dirs (``export/readers.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import WeightsmithError
from .export.readers import GGUFView, open_checkpoint
from .prune.check import sparsity_check, summarize as sparsity_summary


def inspect(model: str | Path, reference: str | Path | None = None) -> dict:
    view = open_checkpoint(model)
    ref = open_checkpoint(reference) if reference is not None else None
    if ref is not None and ref.format == "gguf":
        raise WeightsmithError("--reference must be a Hugging Face directory (the original float model), not a .gguf file")
    with view:
        infos = view.tensors()
        rows = [i.as_dict() for i in infos]
        _add_sparsity(view, rows)
        if ref is not None:
            with ref:
                _add_errors(view, ref, rows)
        quant = [r for r in rows if _quantized(r)]
        params = sum(_numel(r["shape"]) for r in rows)
        qparams = sum(_numel(r["shape"]) for r in quant)
        out = {
            "model": str(model),
            "format": view.format,
            "size_on_disk_bytes": view.size_on_disk(),
            "tensor_bytes": sum(r["nbytes"] for r in rows),
            "parameters": params,
            "quantized_layers": len(quant),
            "quantized_parameters": qparams,
            "bits_per_weight_quantized": (8.0 * sum(r["nbytes"] for r in quant) / qparams) if qparams else None,
            "bits_per_weight_all": 8.0 * sum(r["nbytes"] for r in rows) / params if params else None,
            "packed_bits_per_weight_quantized": _packed_bpw(quant),
            "schemes": sorted({r["scheme"] for r in rows}),
            "by_scheme": _by_scheme(rows),
            "sparsity": _sparsity_summary(rows),
            "tensors": rows,
        }
        if ref is not None:
            errs = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
            out["reference"] = str(reference)
            out["mean_rel_error"] = sum(errs) / len(errs) if errs else None
            out["max_rel_error"] = max(errs) if errs else None
    return out


BLOCK_MATRIX = re.compile(r"(^|\.)(\d+)\.")  # a matrix inside a numbered block (model.layers.3.…, blk.3.…): what pruners touch


def _add_sparsity(view, rows: list[dict]) -> None:
    """Each matrix's measured density and the N:M patterns it satisfies, from its (dequantized) weights."""
    for r in rows:
        if len(r["shape"]) == 2:
            r.update(sparsity_check(view.weight(r["name"])))


def _sparsity_summary(rows: list[dict]) -> dict:
    """Over the matrices of the blocks (all matrices when none is in a numbered block): overall density and
    the count of matrices by the first (smallest-M) N:M pattern they satisfy."""
    mats = [r for r in rows if "density" in r]
    inside = [r for r in mats if BLOCK_MATRIX.search(r["name"])]
    out = sparsity_summary(inside or mats, lambda r: _numel(r["shape"]))
    if out:
        out["over"] = "matrices of the blocks" if inside else "all matrices"
    return out


def _quantized(r: dict) -> bool:
    """A matrix with integer codes (a pruned-only layer, ``float + sparsity …``, is float)."""
    return not r["scheme"].startswith("float")


def _packed_bpw(rows: list[dict]) -> float | None:
    """Bits per weight over ``rows`` as packed formats store them (for weightsmith's dequantized dirs,
    what an export would hold; for packed formats, what they hold)."""
    n = sum(_numel(r["shape"]) for r in rows)
    return sum(r["packed_bits_per_weight"] * _numel(r["shape"]) for r in rows) / n if n else None


def _by_scheme(rows: list[dict]) -> dict:
    """Per scheme of the matrices: how many, their parameters and bits per weight (packed, as above)."""
    out: dict[str, list] = {}
    for r in rows:
        if len(r["shape"]) == 2:
            out.setdefault(r["scheme"], []).append(r)
    return {k: {"tensors": len(v), "parameters": sum(_numel(r["shape"]) for r in v), "bits_per_weight": _packed_bpw(v)}
            for k, v in sorted(out.items())}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _add_errors(view, ref, rows: list[dict]) -> None:
    ref_keys = set(ref.src.keys())
    if isinstance(view, GGUFView):
        n_layers = int(view.field(f"{view.arch}.block_count") or 0)
        n_head = int(view.field(f"{view.arch}.attention.head_count") or 0)
        n_kv = int(view.field(f"{view.arch}.attention.head_count_kv") or n_head)
        to_hf = {}
        for k in ref_keys:
            g = view.hf_to_gguf(k, n_layers)
            if g is not None:
                to_hf[g] = k
    for r in rows:
        if len(r["shape"]) != 2:
            continue
        if isinstance(view, GGUFView):
            key = to_hf.get(r["name"])
            if key is None:
                continue
            w_ref = ref.weight(key)
            if view.arch == "llama" and r["name"].endswith((".attn_q.weight", ".attn_k.weight")):
                from .export.gguf_format import qk_permutation

                w_ref = w_ref[qk_permutation(w_ref.shape[0], n_head if ".attn_q." in r["name"] else n_kv)]
        else:
            key = r["name"]
            if key not in ref_keys:
                continue
            w_ref = ref.weight(key)
        w = view.weight(r["name"])
        if tuple(w.shape) != tuple(w_ref.shape):
            raise WeightsmithError(f"{r['name']}: shape {tuple(w.shape)} differs from the reference's {tuple(w_ref.shape)}")
        den = torch.linalg.norm(w_ref)
        r["rel_error"] = float(torch.linalg.norm(w - w_ref) / den) if den > 0 else 0.0


def format_table(res: dict) -> str:
    has_err = "reference" in res
    packed = res["format"] == "weightsmith"  # stored as float: also show what a packed export holds
    head = ["tensor", "shape", "dtype", "scheme", "bpw"] + (["packed bpw"] if packed else []) + ["MB", "density", "N:M"] + \
        (["rel. error"] if has_err else [])
    lines = ["  ".join(head)]
    for r in res["tensors"]:
        cells = [r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["scheme"], f"{r['bits_per_weight']:.2f}"]
        if packed:
            cells.append(f"{r['packed_bits_per_weight']:.2f}")
        cells.append(f"{r['nbytes'] / 1e6:.3f}")
        cells += [f"{r['density']:.4f}", (r["nm"] or ["none"])[0]] if "density" in r else ["", ""]
        if has_err:
            cells.append("" if r.get("rel_error") is None else f"{r['rel_error']:.4e}")
        lines.append("  ".join(cells))
    bq = res["bits_per_weight_quantized"]
    lines += [
        "",
        f"format: {res['format']}    size on disk: {res['size_on_disk_bytes'] / 1e6:.2f} MB    parameters: {res['parameters']:,}",
        f"quantized layers: {res['quantized_layers']}    bits/weight (quantized layers): {'–' if bq is None else f'{bq:.3f}'}"
        f"    bits/weight (all): {res['bits_per_weight_all']:.3f}",
        f"schemes: {', '.join(res['schemes'])}",
    ]
    pq = res.get("packed_bits_per_weight_quantized")
    if res["format"] == "weightsmith" and pq is not None:  # the dequantized dir stores floats: say what the report counts
        lines[-2] = lines[-2].replace("bits/weight (quantized layers):", "bits/weight stored here (dequantized, quantized layers):")
        lines.append(f"bits/weight of the quantized layers as packed formats store them (the report's bits/weight): {pq:.3f}")
    if len([k for k in res.get("by_scheme", {}) if not k.startswith("float")]) > 1:  # mixed: one line per scheme
        for k, v in res["by_scheme"].items():
            lines.append(f"  {k}: {v['tensors']} matrices, {v['parameters']:,} parameters, {v['bits_per_weight']:.3f} bits/weight")
    sp = res.get("sparsity")
    if sp:
        lines.append(f"density ({sp['over']}): {sp['density']:.4f}    N:M (first pattern satisfied: matrices): "
                     + ", ".join(f"{k}: {v}" for k, v in sp["nm"].items()))
    if has_err and res.get("mean_rel_error") is not None:
        lines.append(f"relative Frobenius error vs {res['reference']}: mean {res['mean_rel_error']:.4e}, max {res['max_rel_error']:.4e}")
    return "\n".join(lines)


def main_print(model: str, reference: str | None, as_json: bool) -> None:
    res = inspect(model, reference)
    from .validate import dumps

    print(dumps(res, indent=2) if as_json else format_table(res))
