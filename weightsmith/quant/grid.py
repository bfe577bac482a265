"""The integer grid: scales and zero points per (row, group), optional MSE clip search, fake-quant.

Convention (the one GPTQ, compressed-tensors and GPTQModel share once the offsets are applied):
codes ``q`` are unsigned integers in ``[0, maxq]`` with ``maxq = 2**bits - 1`` and
``w ≈ (q - zero) * scale``. A symmetric grid fixes ``zero = 2**(bits-1)`` and
``scale = 2·max|w| / maxq``; an asymmetric grid spans ``[min(w, 0), max(w, 0)]``.
"""
from __future__ import annotations

import torch

from ..config import GridConfig


def maxq(bits: int) -> int:
    return 2**bits - 1


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = maxq(bits)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / q
        zero = torch.full_like(scale, (q + 1) / 2)
    else:
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / q
        zero = torch.round(-xmin / scale)
    return scale, zero


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (as floats, in ``[0, maxq]``) of ``w`` on the grid of broadcastable ``scale``/``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq(bits))


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` onto the grid given by broadcastable ``scale``/``zero``; returns dequantized values."""
    return scale * (codes(w, scale, zero, bits) - zero)


def find_params(w: torch.Tensor, grid: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``w`` (rows, cols) over all its columns; shapes (rows, 1).

    With ``grid.clip_search`` the range is shrunk by the factor ``p`` in
    ``{1, 1-1/n, …, 1-maxshrink}`` (n = ``grid.clip_grid``) that minimises
    ``Σ|fake_quant(w) - w|^norm`` per row. The search is coarse to fine: every
    ``CLIP_STRIDE``-th factor first, then the factors around each row's best — a third of the
    work of trying them all, and the same optimum wherever the error is unimodal over a stride.
    """
    w = w.float()
    if grid.clip_search and w.numel() > CLIP_CHUNK and w.shape[0] > 1:
        # rows are independent: search a cache-sized slab of rows at a time (the same result, bit for
        # bit; 1.7-2.7x faster where every trial streams the whole tensor through a slow memory bus)
        step = max(1, CLIP_CHUNK // max(w.shape[1], 1))
        parts = [find_params(w[i : i + step], grid) for i in range(0, w.shape[0], step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    scale, zero = _range_params(xmin, xmax, grid.bits, grid.sym)
    if not grid.clip_search:
        return scale, zero
    n = int(grid.clip_maxshrink * grid.clip_grid)  # candidates i = 0..n-1, p = 1 - i/grid
    best = torch.full_like(scale, float("inf"))
    best_i = torch.zeros_like(scale)
    buf = torch.empty_like(w)  # one work buffer for every trial (no allocation, no fresh pages, per trial)
    q = maxq(grid.bits)

    def trial(i: torch.Tensor | float) -> None:
        nonlocal scale, zero, best, best_i
        p = 1 - i / grid.clip_grid
        s1, z1 = _range_params(p * xmin, p * xmax, grid.bits, grid.sym)
        # fake_quant(w, s1, z1) - w, in place: the same IEEE operations in the same order
        torch.div(w, s1, out=buf).round_().add_(z1).clamp_(0, q).sub_(z1).mul_(s1).sub_(w)
        err = buf.abs_().pow_(grid.clip_norm).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_i = torch.where(better, torch.as_tensor(i, dtype=best_i.dtype), best_i)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)

    for i in range(0, n, CLIP_STRIDE):
        trial(float(i))
    coarse = best_i.clone()
    for off in range(-(CLIP_STRIDE - 1), CLIP_STRIDE):
        if off:
            trial(torch.clamp(coarse + off, 0, n - 1))
    return scale, zero


CLIP_STRIDE = 4
CLIP_CHUNK = 1 << 19  # elements per slab of the clip search (2 MiB of float32)


def grouped_params(w: torch.Tensor, grid: GridConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static per-group parameters of ``w`` in its natural column order.

    Returns ``scale``, ``zero`` of shape (rows, n_groups) and ``g_idx`` (cols,) int32. All full
    groups are solved at once (each group is a row of a reshaped view); a shorter last group, when
    the group size does not divide the width, separately.
    """
    rows, cols = w.shape
    gs = cols if grid.group_size == -1 else grid.group_size
    full = cols // gs
    scales, zeros = [], []
    if full:
        s, z = find_params(w[:, : full * gs].reshape(rows * full, gs), grid)
        scales.append(s.reshape(rows, full))
        zeros.append(z.reshape(rows, full))
    if cols % gs:
        s, z = find_params(w[:, full * gs :], grid)
        scales.append(s)
        zeros.append(z)
    g_idx = (torch.arange(cols, device=w.device) // gs).to(torch.int32)
    return torch.cat(scales, 1), torch.cat(zeros, 1), g_idx


def dequantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize every column ``j`` of ``w`` with the parameters of group ``g_idx[j]``."""
    gi = g_idx.long()
    return fake_quant(w, scale[:, gi], zero[:, gi], bits)


def relative_error(delta: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """‖ΔW X‖² / ‖W X‖² from the input statistics ``h = XᵀX / N`` (no activations needed)."""
    num = ((delta @ h) * delta).sum()
    den = ((w @ h) * w).sum()
    if den > 0:
        return float(num / den)
    return 0.0 if not num > 0 else float("inf")  # a zero layer (or zero input) is reproduced exactly: error 0, never NaN
