"""Robust weight signatures: what a hardened fine-tune adds to its plain counterpart, kept compact and
patched onto another model of the same base.

Cai et al. 2023, "Robust Weight Signatures: Gaining Robustness as Easy as Patching Weights?"
(ICML 2023, arXiv:2302.12480): the robustness a model gains from robust (or domain-hardened)
fine-tuning lives in a weight difference ``Δ = θ_robust − θ_plain`` that is low-rank / sparse
enough to be stored cheaply and added to other models fine-tuned from the same base,
``θ' = θ + s·Δ̂``.

``extract(robust, plain, out, rank=R | density=D)``: per floating tensor, ``Δ`` (float32) is
compressed — with ``rank``, a 2-D tensor becomes its truncated SVD ``A = U_r Σ_r`` (m × r) and
``B = V_rᵀ`` (r × n), ``r = min(R, m, n)`` (``diff._svd``: Gram eigen-decomposition, randomized
beyond ``full_limit``), other tensors (norms, biases) are stored dense; with ``density``, every
tensor keeps its ``k = max(1, ⌊D·n⌋)`` entries of largest ``|Δ|`` (flat int32/int64 indices and
values). The tensors go into safetensors shards (``ShardWriter``, shapes planned before any is
computed, each tensor streamed as it comes); ``signature.json`` holds the mode, per tensor its
kind, shape, stored bytes and relative error ``‖Δ − Δ̂‖/‖Δ‖``, and the total ``bytes`` (the stored
tensors, exactly) and ``fraction`` of the plain model's floating-tensor bytes.

``apply(model, signature, out, strength=s)``: every signature tensor must name a tensor of MODEL of
the same shape (refused otherwise, before any work); MODEL is streamed tensor by tensor, ``w + s·Δ̂``
computed in float32 and stored in ``w``'s dtype, the rest copied. Both write an ``AtomicDir`` (OUT's
lock, one final rename). Peak memory: one tensor, its difference and its SVD.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource, _read_header, _read_json
from .spectra import FULL_LIMIT

MANIFEST = "signature.json"
FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lowrank(d: torch.Tensor, rank: int, full_limit: int = FULL_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A @ B`` the best rank-``r`` approximation of the 2-D ``d``, ``r = min(rank, m, n)``;
    ``A = U_r Σ_r``, ``B = V_rᵀ`` (zero-padded where ``d`` has fewer nonzero singular values)."""
    from .diff import _svd

    r = min(rank, *d.shape)
    u, s, v, _ = _svd(d, r, full_limit)
    k = min(r, u.shape[1], s.numel())
    a = torch.zeros((d.shape[0], r), dtype=torch.float64)
    b = torch.zeros((r, d.shape[1]), dtype=torch.float64)
    a[:, :k] = u[:, :k] * s[:k]
    b[:k] = v[:, :k].T
    return a.float(), b.float()


def top_magnitude(d: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices, values)`` of the ``k = max(1, ⌊density·n⌋)`` entries of largest ``|d|``, indices ascending."""
    flat = d.reshape(-1)
    k = max(1, int(density * flat.numel()))
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return idx.to(torch.int32 if flat.numel() < 2**31 else torch.int64), flat[idx].clone()


def _plan(key: str, shape: tuple[int, ...], rank: int | None, density: float | None, dtype: torch.dtype) -> list[tuple]:
    """The stored tensors of one model tensor: ``[(name, dtype, shape)]``, known before ``Δ`` is read."""
    if rank is not None:
        if len(shape) == 2 and min(shape) > 1:
            r = min(rank, *shape)
            return [(f"{key}.A", dtype, (shape[0], r)), (f"{key}.B", dtype, (r, shape[1]))]
        return [(f"{key}.dense", dtype, tuple(shape))]
    n = math.prod(shape)
    k = max(1, int(density * n))
    return [(f"{key}.idx", torch.int32 if n < 2**31 else torch.int64, (k,)), (f"{key}.val", dtype, (k,))]


def _reconstruct(parts: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if f"{key}.A" in parts:
        return parts[f"{key}.A"].float() @ parts[f"{key}.B"].float()
    if f"{key}.dense" in parts:
        return parts[f"{key}.dense"].float().reshape(shape)
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[parts[f"{key}.idx"].long()] = parts[f"{key}.val"].float()
    return out.reshape(shape)


def extract(robust, plain, out, *, rank: int | None = None, density: float | None = None, dtype: str = "float32",
            full_limit: int = FULL_LIMIT, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the signature ``robust − plain`` (module docstring) to the directory ``out``; returns the manifest."""
    from ..merge.driver import SHARD_BYTES, all_finite
    from ..model.saving import AtomicDir, ShardWriter
    from ..safety import check_output
    from ..validate import dumps

    if (rank is None) == (density is None):
        raise WeightsmithError("signature extract: give exactly one of --rank R (low-rank) or --density D (sparse)")
    if rank is not None and rank < 1:
        raise WeightsmithError(f"--rank must be at least 1, got {rank}")
    if density is not None and not 0 < density <= 1:
        raise WeightsmithError(f"--density must lie in (0, 1], got {density}")
    if dtype not in DTYPES:
        raise WeightsmithError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.time()
    check_output(out, [robust, plain], overwrite=overwrite)
    atomic = AtomicDir(out, overwrite)  # OUT's lock, held from here to the final rename
    try:
        with CheckpointSource(robust) as sr, CheckpointSource(plain) as sp:
            keys = sorted(k for k in sp.keys() if sp.dtype(k).is_floating_point)
            _check_same(keys, sp, sr, plain, robust)
            entries = {k: _plan(k, tuple(sp.shape(k)), rank, density, DTYPES[dtype]) for k in keys}
            shards = _split(keys, entries, SHARD_BYTES)
            rows, model_bytes = {}, 0
            with atomic as tmp:
                writer = ShardWriter(tmp, len(shards))
                for j, shard in enumerate(shards):
                    f = writer.stream(j, [e for k in shard for e in entries[k]])
                    try:
                        for k in shard:
                            w = sp.get(k)
                            model_bytes += w.numel() * w.element_size()
                            d = sr.get(k).float().sub_(w.float())
                            del w
                            if not all_finite(d):
                                raise WeightsmithError(f"{k}: NaN or Inf in the weights of {robust} or {plain}")
                            parts = _compress(d, rank, density, full_limit)
                            stored = {name: parts[name.rsplit(".", 1)[1]].to(dt) for name, dt, _ in entries[k]}
                            for name, _, _ in entries[k]:
                                f.write(name, stored[name])
                            err = float((d - _reconstruct(stored, k, tuple(d.shape))).norm())
                            norm = float(d.norm())
                            rows[k] = {"shape": list(d.shape), "kind": "lowrank" if "A" in parts else "sparse" if "idx" in parts else "dense",
                                       **({"rank": parts["A"].shape[1]} if "A" in parts else {}),
                                       **({"k": parts["idx"].numel()} if "idx" in parts else {}),
                                       "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
                                       "delta_norm": norm, "relative_error": err / norm if norm > 0 else 0.0}
                            del d, parts, stored
                    except BaseException:
                        f.abort()
                        raise
                    f.close()
                writer.finish()
                total = sum(r["bytes"] for r in rows.values())
                delta2 = sum(r["delta_norm"] ** 2 for r in rows.values())
                err2 = sum((r["relative_error"] * r["delta_norm"]) ** 2 for r in rows.values())
                man = {"format": FORMAT, "kind": "weightsmith-signature", "reference": "Cai et al. 2023, Robust Weight Signatures "
                       "(arXiv:2302.12480)", "robust": str(robust), "plain": str(plain), "mode": "rank" if rank is not None else "density",
                       "rank": rank, "density": density, "dtype": dtype, "bytes": total, "model_bytes": model_bytes,
                       "fraction": total / model_bytes if model_bytes else 0.0,
                       "relative_error": math.sqrt(err2 / delta2) if delta2 > 0 else 0.0,
                       "files": [writer.shard_name(j) for j in range(len(shards))],
                       "robust_fingerprint": sr.fingerprint(), "plain_fingerprint": sp.fingerprint(), "tensors": rows}
                (tmp / MANIFEST).write_text(dumps(man, indent=2) + "\n")
    finally:
        atomic.release()
    return {**{k: v for k, v in man.items() if k not in ("tensors", "robust_fingerprint", "plain_fingerprint")},
            "output": str(out), "tensor_count": len(rows), "wall_time_s": round(time.time() - t0, 2)}


def _compress(d: torch.Tensor, rank: int | None, density: float | None, full_limit: int) -> dict[str, torch.Tensor]:
    if rank is not None:
        if d.ndim == 2 and min(d.shape) > 1:
            a, b = lowrank(d, rank, full_limit)
            return {"A": a, "B": b}
        return {"dense": d}
    idx, val = top_magnitude(d, density)
    return {"idx": idx, "val": val}


def _split(keys: list[str], entries: dict[str, list[tuple]], limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for k in keys:
        n = sum(dt.itemsize * math.prod(shape) for _, dt, shape in entries[k])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _check_same(keys: list[str], a: CheckpointSource, b: CheckpointSource, name_a, name_b) -> None:
    have = sorted(k for k in b.keys() if b.dtype(k).is_floating_point)
    if have != keys:
        first = sorted(set(have) ^ set(keys))[0]
        raise WeightsmithError(f"{name_b} and {name_a} do not have the same tensors (first difference: {first}); "
                               "a signature needs two fine-tunes of one architecture")
    for k in keys:
        if a.shape(k) != b.shape(k):
            raise WeightsmithError(f"tensor {k} has shape {tuple(b.shape(k))} in {name_b} but {tuple(a.shape(k))} in {name_a}")


def read_signature(sig) -> tuple[dict, list[Path]]:
    """The manifest and shard files of a signature directory, every header validated."""
    d = Path(sig)
    p = d / MANIFEST
    if not p.is_file():
        raise WeightsmithError(f"{d} is not a signature directory (no {MANIFEST}; write one with `weightsmith signature extract`)")
    man = _read_json(p)
    if man.get("kind") != "weightsmith-signature" or man.get("format") != FORMAT:
        raise WeightsmithError(f"{p} is not a weightsmith signature manifest (format {FORMAT})")
    files = [d / f for f in man.get("files", [])]
    for f in files:
        if not f.is_file():
            raise WeightsmithError(f"signature file {f} listed in {p} is missing")
        _read_header(f)
    return man, files


def apply(model, sig, out, *, strength: float = 1.0, overwrite: bool = False, progress: bool = False) -> dict:
    """``model + strength · signature`` written to ``out`` (module docstring); returns a summary."""
    from safetensors import safe_open

    from ..merge.driver import SHARD_BYTES, split_shards
    from ..merge.plan import TensorPlan
    from ..model.saving import AtomicDir, ShardWriter
    from ..safety import check_output
    from ..validate import dumps

    if not math.isfinite(strength):
        raise WeightsmithError(f"--strength must be a finite number, got {strength}")
    t0 = time.time()
    check_output(out, [model, sig], overwrite=overwrite)
    man, files = read_signature(sig)
    atomic = AtomicDir(out, overwrite)
    try:
        with CheckpointSource(model) as src:
            rows = man["tensors"]
            for k, r in rows.items():
                if k not in src.index:
                    raise WeightsmithError(f"the signature patches {k}, which {model} lacks: it was extracted from another architecture")
                if tuple(src.shape(k)) != tuple(r["shape"]):
                    raise WeightsmithError(f"the signature's {k} has shape {tuple(r['shape'])} but {model} has {tuple(src.shape(k))}: "
                                           "patch a model of the signature's base")
                if not src.dtype(k).is_floating_point:
                    raise WeightsmithError(f"{model}: {k} is not a floating tensor ({src.dtype(k)}); the signature cannot patch it")
            where = {}
            handles = [safe_open(str(f), framework="pt") for f in files]
            for h in handles:
                for name in h.keys():
                    where[name] = h
            keys = sorted(src.keys())
            plans = [TensorPlan(k, tuple(src.shape(k)), [], {}, src.dtype(k), torch.float32) for k in keys]
            shards = split_shards(plans, SHARD_BYTES)
            patched, delta2 = 0, 0.0
            with atomic as tmp:
                writer = ShardWriter(tmp, len(shards))
                for j, shard in enumerate(shards):
                    f = writer.stream(j, [(p.key, p.out_dtype, p.shape) for p in shard])
                    for p in shard:
                        w = src.get(p.key)
                        if p.key in rows and strength != 0:
                            parts = {}
                            for suffix in ("A", "B", "dense", "idx", "val"):
                                name = f"{p.key}.{suffix}"
                                if name in where:
                                    parts[name] = where[name].get_tensor(name)
                            if not parts:
                                raise WeightsmithError(f"the signature's files lack the tensors of {p.key}")
                            d = _reconstruct(parts, p.key, p.shape).mul_(strength)
                            delta2 += float(d.double().square().sum())
                            w = w.float().add_(d).to(p.out_dtype)
                            patched += 1
                            del d, parts
                        f.write(p.key, w)
                    f.close()
                writer.finish()
                for a in src.aux_files():
                    shutil.copy2(a, tmp / a.name)
                res = {"command": "signature apply", "model": str(model), "signature": str(sig), "strength": strength,
                       "patched_tensors": patched, "patch_norm": math.sqrt(delta2), "signature_bytes": man["bytes"],
                       "signature_mode": man["mode"], "output": str(out)}
                (tmp / "report.json").write_text(dumps(res, indent=2) + "\n")
    finally:
        atomic.release()
    return {**res, "wall_time_s": round(time.time() - t0, 2)}
