"""What a weight matrix's zeros are, measured from the weights themselves (not from a mask or a
report): the density (share of nonzero entries) and the N:M patterns it satisfies along the input
dimension — for each ``M`` in :data:`NM_WIDTHS` that divides the width, ``N`` is the largest number of
nonzeros in any ``M`` consecutive inputs of any row, and the matrix satisfies ``N:M`` when ``N < M``.
A 2:4 matrix also satisfies 4:8 (a quantized kept weight that rounded to 0 can only lower ``N``).
Used by ``weightsmith inspect`` and the quantize report."""
from __future__ import annotations

import torch

NM_WIDTHS = (4, 8, 16)


def density(w: torch.Tensor) -> float:
    return float(torch.count_nonzero(w)) / w.numel() if w.numel() else 1.0


def nm_patterns(w: torch.Tensor) -> list[str]:
    """``["2:4", "4:8", "8:16"]``-style list of the N:M patterns ``w`` (out, in) satisfies, smallest ``M`` first."""
    if w.ndim != 2:
        return []
    rows, cols = w.shape
    out = []
    nz = w != 0
    for m in NM_WIDTHS:
        if cols % m or cols < m:
            continue
        n = int(nz.reshape(rows, cols // m, m).sum(-1).max()) if rows else 0
        if n < m:
            out.append(f"{n}:{m}")
    return out


def sparsity_check(w: torch.Tensor) -> dict:
    """``{"density": share of nonzeros, "nm": [patterns satisfied]}``."""
    return {"density": density(w), "nm": nm_patterns(w)}


def summarize(rows: list[dict], key_numel) -> dict:
    """Overall density (weighted by size) and how many matrices satisfy each matrix's first (smallest-M) pattern."""
    n = sum(key_numel(r) for r in rows)
    if not n:
        return {}
    counts: dict[str, int] = {}
    for r in rows:
        first = r["nm"][0] if r["nm"] else "none"
        counts[first] = counts.get(first, 0) + 1
    return {"density": sum(r["density"] * key_numel(r) for r in rows) / n, "matrices": len(rows), "parameters": n,
            "nm": dict(sorted(counts.items()))}
