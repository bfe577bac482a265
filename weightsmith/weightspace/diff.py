"""``weightsmith diff BASE TUNED``: the SVD of each matrix's fine-tuning update ΔW = W_tuned − W_base.

After "Watch the Weights: Unsupervised monitoring and control of fine-tuned LLMs" (Zhong, Raghunathan
et al., 2025): a fine-tune's behaviour lives in a few singular directions of its weight updates, and
inputs that drive it show up as activations with large projections on those directions
(``weightsmith monitor``, ``monitor.py``).

Both checkpoints are read tensor by tensor (``CheckpointSource``: safetensors or GGUF). For each
2-D floating tensor present in both with the same shape, ΔW (float32, sums in float64) is
decomposed: in full when min(m, n) ≤ ``full_limit`` (through the smaller Gram matrix, memory one
float32 ΔW plus min(m, n)² doubles), else by a randomized SVD of rank ``rank`` (+10 oversampling,
4 power iterations; the spectrum summary then covers the top values only). The top-``rank`` triplets are
stored: ``directions.safetensors`` holds ``<tensor>.U`` (m × K), ``<tensor>.S`` (K) and ``<tensor>.V``
(n × K, the input-space directions the monitor projects activations on), float32; ``diff.json`` holds
per tensor ‖ΔW‖_F, ‖ΔW‖_F / ‖W_base‖_F, σ₁, the share of ‖ΔW‖_F² in the top K, ΔW's stable and
effective rank and its top singular values, plus the fingerprints of both inputs. Tensors with
ΔW = 0 are listed as unchanged. The directory is written atomically (``AtomicDir``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource
from .spectra import CHUNK_BYTES, FULL_LIMIT, gram, sum_squares

DIRECTIONS = "directions.safetensors"
SUMMARY = "diff.json"


def _svd(d: torch.Tensor, rank: int, full_limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U_k, all singular values known, V_k, method) of ``d`` (float32), float64 results. In full: the
    eigen-decomposition of the smaller Gram matrix (``spectra.gram``, no float64 copy of ``d``), the
    other side's vectors as D·v/σ or Dᵀ·u/σ, slice by slice; else a randomized SVD of rank ``rank``."""
    r = min(d.shape)
    if r > full_limit:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(d, q=min(rank + 10, r), niter=4)
        return u.double(), s.double(), v.double(), f"randomized:{rank}"
    g, rows = gram(d)
    ev, vec = torch.linalg.eigh(g)
    ev, vec = torch.flip(ev, [0]).clamp_min(0), torch.flip(vec, [1])
    s = ev.sqrt()
    k = int(min(rank, int((s > s[0] * 1e-7).sum()) if s[0] > 0 else 0))
    top = vec[:, :k]
    other = torch.empty((d.shape[1] if rows else d.shape[0], k), dtype=torch.float64)
    step = max(1, CHUNK_BYTES // (8 * r))
    for j in range(0, other.shape[0], step):  # Dᵀ·U (rows) or D·V, 64 MB of D at a time
        c = (d[:, j : j + step].T if rows else d[j : j + step]).to(torch.float64)
        other[j : j + step] = c @ top
    other /= s[:k]
    u, v = (top, other) if rows else (other, top)
    return u, s, v, "full"


def diff(base: str | Path, tuned: str | Path, rank: int = 8, out: str | Path | None = None, *, full_limit: int = FULL_LIMIT,
         overwrite: bool = False, progress: bool = False) -> dict:
    """Per-matrix SVD of ``tuned − base``; with ``out``, the top-``rank`` directions are written there."""
    if rank < 1 or full_limit < 1:
        raise WeightsmithError(f"--rank and --full-limit must be at least 1, got {rank} and {full_limit}")
    atomic = None
    if out is not None:
        from ..model.saving import AtomicDir
        from ..safety import check_output

        check_output(out, [base, tuned], overwrite=overwrite)
        atomic = AtomicDir(out, overwrite)  # OUT's lock, held from here to the final rename
    try:
        res, tensors = _diff(base, tuned, rank, full_limit, progress)
        if atomic is not None:
            from ..model.saving import save_tensors
            from ..validate import dumps

            with atomic as tmp:
                save_tensors(tensors, tmp / DIRECTIONS, metadata={"format": "pt", "weightsmith.diff": json.dumps({"rank": rank})})
                (tmp / SUMMARY).write_text(dumps(res, indent=2) + "\n")
            res["output"] = str(out)
    finally:
        if atomic is not None:
            atomic.release()
    return res


def _diff(base, tuned, rank: int, full_limit: int, progress: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    with CheckpointSource(base) as sb, CheckpointSource(tuned) as st:
        keys = [k for k in sb.keys() if k in st.index and len(sb.shape(k)) == 2 and sb.dtype(k).is_floating_point]
        bad = [k for k in keys if sb.shape(k) != st.shape(k)]
        if bad:
            raise WeightsmithError(f"{bad[0]}: shape {tuple(sb.shape(bad[0]))} in {base} but {tuple(st.shape(bad[0]))} in {tuned}; "
                                   "a diff needs two checkpoints of one architecture")
        if not keys:
            raise WeightsmithError(f"{base} and {tuned} share no floating-point matrix")
        only = sorted(set(st.keys()) ^ set(sb.keys()))
        it = keys
        if progress:
            from tqdm import tqdm

            it = tqdm(keys, desc="diff", unit="matrix")
        rows, unchanged, tensors = [], [], {}
        for k in it:
            wb = sb.get(k).float()
            base_norm = math.sqrt(sum_squares(wb))
            d = st.get(k).float().sub_(wb)
            del wb
            fro2 = sum_squares(d)
            if not math.isfinite(fro2) or not math.isfinite(base_norm):
                raise WeightsmithError(f"{k}: NaN or Inf in the weights of {base} or {tuned}")
            if fro2 == 0.0:
                unchanged.append(k)
                continue
            u, s, v, method = _svd(d, rank, full_limit)
            kk = min(rank, s.numel(), u.shape[1])
            s1 = float(s[0])
            p = s[s > 0] / s.sum()
            rows.append({"name": k, "shape": list(d.shape), "method": method, "delta_frobenius": math.sqrt(fro2),
                         "relative_delta": math.sqrt(fro2) / max(base_norm, 1e-300), "sigma_1": s1,
                         "top_energy": float((s[:kk] ** 2).sum()) / fro2, "stable_rank": fro2 / (s1 * s1),
                         "effective_rank": math.exp(float(-(p * torch.log(p)).sum())) if method == "full" else None,
                         "singular_values": [float(x) for x in s[:kk]]})
            tensors[f"{k}.U"] = u[:, :kk].float().contiguous()
            tensors[f"{k}.S"] = s[:kk].float().contiguous()
            tensors[f"{k}.V"] = v[:, :kk].float().contiguous()
            del d, u, v
        if not rows:
            raise WeightsmithError(f"{tuned} and {base} have the same matrices (ΔW = 0 everywhere): nothing to decompose")
        rows.sort(key=lambda r: -r["delta_frobenius"])
        res = {"base": str(base), "tuned": str(tuned), "rank": rank, "full_limit": full_limit, "changed": len(rows),
               "unchanged": unchanged, "only_in_one": only, "base_fingerprint": sb.fingerprint(),
               "tuned_fingerprint": st.fingerprint(), "matrices": rows}
    return res, tensors


def format_markdown(res: dict, top: int = 30) -> str:
    lines = [f"# ΔW = {res['tuned']} − {res['base']}", "",
             f"{res['changed']} matrices changed, {len(res['unchanged'])} unchanged; top {res['rank']} singular directions kept.", "",
             "| matrix | shape | ‖ΔW‖_F | ‖ΔW‖/‖W‖ | σ₁ | top-K energy | stable rank | effective rank |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["matrices"][:top]:
        er = "–" if r["effective_rank"] is None else f"{r['effective_rank']:.3g}"
        lines.append(f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['delta_frobenius']:.4g} | {r['relative_delta']:.3g} | "
                     f"{r['sigma_1']:.4g} | {r['top_energy']:.3f} | {r['stable_rank']:.3g} | {er} |")
    if len(res["matrices"]) > top:
        lines.append(f"| … {len(res['matrices']) - top} more (largest ‖ΔW‖ first) | | | | | | | |")
    return "\n".join(lines)
