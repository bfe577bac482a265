"""Lookup-table (T-MAC style) low-bit matmul: weight packing, the compiled library, and a pure-torch
emulation of exactly what the kernel computes (for the tests).

The algorithm and the packed layout are described at the top of ``csrc/lut_gemv.cpp``. In short:
the codes of a layer are split into bit planes; for every quad of 4 activations a 16-entry table
of centred partial sums is built once per token and quantized to int8 (one scale per token and
per block of ``S`` activations); the matmul is then ``vpshufb`` lookups of 64 rows at a time,
summed in int16 per block, scaled in float by ``scale * lut_scale``; the zero point is applied
through the float sum of each group's activations.

Act-order (any ``g_idx``) is handled at pack time: columns are sorted by group, each group padded
to a common size ``G`` (a multiple of 4); at run time the activations are gathered once per token
through ``perm`` (padding reads as 0); without act-order or padding ``perm`` is empty (the identity).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("weightsmith")

TILE = 64
MAX_BLOCK = 64
SRC = Path(__file__).parent / "csrc" / "lut_gemv.cpp"
ABI_VERSION = 14
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fopenmp"]
ISA_NAMES = {0: "none", 1: "avx2", 2: "avx512bw"}
PLANES, DOT4 = 0, 1  # packed layouts: bit planes (table lookups), 4-bit nibbles (AVX-512 VNNI dot products)
LAYOUT_NAMES = {PLANES: "bit planes (table lookups)", DOT4: "4-bit nibbles (VNNI dot products)"}


# ----------------------------------------------------------------------------------- packing
@dataclass
class PackedLayer:
    """A quantized linear layer in the kernel's layout (see ``csrc/lut_gemv.cpp``)."""

    w: torch.Tensor  # uint8 [tiles][blocks][S/4 quads][bits * 32]
    scale: torch.Tensor  # float16 [tiles][groups][64]
    zero2: torch.Tensor  # int8 [tiles][groups][64]: 2 * zero - (2**bits - 1)
    perm: torch.Tensor  # int32 [Kp]: source column of each packed column, -1 = padding; empty: the identity (Kp = K)
    out_features: int
    in_features: int
    group: int  # G: packed columns per group (multiple of 4)
    block: int  # S: activations per table scale (divides G, <= 64)
    bits: int
    # HLQ layers (pack_planes): ``scale`` is float16 [tiles][groups][bits][64], one scale per bit plane,
    # ``zero2`` is empty and ``zc`` float32 [tiles][groups][64] = offset + sum_i scale_i / 2
    zc: torch.Tensor | None = None
    # PLANES: ``w`` as above; DOT4 (4-bit uniform grids): uint8 [tiles][Kp/8 chunks][4 row blocks][64],
    # byte 4i + j of a row block = code (row 16 rb + i, column 8c + j) | code (…, 8c + 4 + j) << 4
    layout: int = PLANES

    @property
    def planes(self) -> bool:
        return self.zc is not None

    @property
    def kp(self) -> int:
        return int(self.scale.shape[1]) * self.group

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    def columns(self) -> torch.Tensor:
        """The source column of each packed column (-1 = padding), also where ``perm`` is the stored identity."""
        return self.perm if self.perm.numel() else torch.arange(self.kp, dtype=torch.int32)

    def perm_ptr(self) -> int | None:
        return self.perm.data_ptr() if self.perm.numel() else None

    @property
    def tiles(self) -> int:
        return (self.out_features + TILE - 1) // TILE

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.scale, self.zero2, self.perm, *([self.zc] if self.planes else [])))

    @property
    def zcs(self) -> torch.Tensor:
        """float32 [tiles][groups][64]: ``scale * (zero - (2**bits - 1) / 2)``, as the kernel computes it."""
        return self.scale.float() * (self.zero2.float() * 0.5)


def _chunk_map(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each byte of a quad's ``bits * 32``-byte chunk: (row, plane) of its low nibble and of its
    high nibble (the layout of ``csrc/lut_gemv.cpp``)."""
    rl, pl, rh, ph = [], [], [], []
    for pp in range(bits // 2):
        for o in range(64):
            h, j = divmod(o, 32)
            rl.append(32 * h + j // 2)
            rh.append(32 * h + 16 + j // 2)
            pl.append(2 * pp + j % 2)
            ph.append(2 * pp + j % 2)
    if bits % 2:
        for j in range(32):
            rl.append(j // 2 + 16 * (j % 2))
            rh.append(32 + j // 2 + 16 * (j % 2))
            pl.append(bits - 1)
            ph.append(bits - 1)
    return tuple(torch.tensor(v) for v in (rl, pl, rh, ph))


def _nibbles(p: "PackedLayer") -> torch.Tensor:
    """The packed weight back as nibbles (bits, rows padded to 64, quads): bit b of
    ``[i, n, q]`` = plane i of the code at row n, packed column 4q + b."""
    T, nb, F = p.tiles, p.kp // p.block, p.block // 4
    rl, pl, rh, ph = _chunk_map(p.bits)
    w4 = p.w.view(T, nb, F, p.bits * 32).permute(3, 0, 1, 2)  # (C, T, nb, F)
    nib = torch.zeros(p.bits, T, TILE, nb, F, dtype=torch.uint8)
    nib[pl, :, rl] = w4 & 15
    nib[ph, :, rh] = w4 >> 4
    return nib.reshape(p.bits, T * TILE, p.kp // 4)


def _block_size(G: int, limit: int = MAX_BLOCK) -> int:
    """Activations per table scale: the largest multiple of 4 dividing ``G`` and at most ``limit``."""
    return max(s for s in range(4, min(limit, MAX_BLOCK) + 1, 4) if G % s == 0)


def _pack_codes(q: torch.Tensor, g_idx: torch.Tensor, bits: int, ng: int, max_block: int | None, layout: int = PLANES):
    """The codes in the kernel's layout (bit planes, or DOT4's nibbles): ``(w, perm, G, S, tiles)``."""
    if not 1 <= bits <= 4:
        raise ValueError(f"the lookup-table kernel handles 1 to 4 bits, not {bits}")
    if layout not in (PLANES, DOT4) or (layout == DOT4 and bits != 4):
        raise ValueError(f"layout {layout} does not hold {bits}-bit codes (DOT4 is for 4 bits)")
    N, K = q.shape
    gi = g_idx.long()
    counts = torch.bincount(gi, minlength=ng)
    step = 8 if layout == DOT4 else 4  # DOT4: whole chunks of 8 columns per group
    G = max(step, (int(counts.max()) + step - 1) // step * step) if K else step
    Kp = ng * G
    order = torch.argsort(gi, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    dest = gi[order] * G + (torch.arange(K) - starts[gi[order]])
    perm = torch.full((Kp,), -1, dtype=torch.int32)
    perm[dest] = order.to(torch.int32)
    S = _block_size(G, max_block or int(os.environ.get("WEIGHTSMITH_LUT_BLOCK", MAX_BLOCK)))
    F, nb, nq = S // 4, Kp // S, Kp // 4
    T = (N + TILE - 1) // TILE
    Np = T * TILE
    qp = torch.zeros(Np, Kp, dtype=torch.uint8)
    qp[:N, dest] = q[:, order].to(torch.uint8)
    if layout == DOT4:
        q6 = qp.view(T, 4, 16, Kp // 8, 2, 4)
        w = (q6[..., 0, :] | (q6[..., 1, :] << 4)).permute(0, 3, 1, 2, 4).contiguous()  # (T, chunks, 4, 16, 4)
        if Kp == K and torch.equal(perm, torch.arange(K, dtype=torch.int32)):
            perm = perm[:0]
        return w.view(-1), perm, G, S, T
    nibs = []
    for i in range(bits):
        bit = ((qp >> i) & 1).view(Np, nq, 4)
        nibs.append(bit[..., 0] | (bit[..., 1] << 1) | (bit[..., 2] << 2) | (bit[..., 3] << 3))  # (Np, nq)
    nib = torch.stack(nibs).view(bits, T, TILE, nb, F)
    rl, pl, rh, ph = _chunk_map(bits)
    w = (nib[pl, :, rl] | (nib[ph, :, rh] << 4)).permute(1, 2, 3, 0).contiguous()  # (T, nb, F, bits * 32)
    if Kp == K and torch.equal(perm, torch.arange(K, dtype=torch.int32)):
        perm = perm[:0]  # no act-order, no padding: the kernel reads the activations as they are
    return w.view(-1), perm, G, S, T


def _tiled(t: torch.Tensor, T: int) -> torch.Tensor:
    """(N, groups, *rest) → [tiles][groups][*rest][64], rows padded with zeros to whole tiles."""
    N, ng, rest = t.shape[0], t.shape[1], t.shape[2:]
    pad = torch.zeros(T * TILE, ng, *rest, dtype=t.dtype)
    pad[:N] = t
    pad = pad.view(T, TILE, ng, *rest)
    return pad.permute(0, 2, *range(3, 3 + len(rest)), 1).contiguous()


def preferred_layout(bits: int) -> int:
    """The layout the kernel runs fastest for ``bits``-bit uniform codes on this CPU: DOT4 at 4 bits
    where the library has AVX-512 VNNI (``vpdpbusd`` on the codes beats two table lookups per plane
    pair), bit planes otherwise. ``WEIGHTSMITH_LUT_LAYOUT=planes`` (or ``dot4``) overrides it."""
    env = os.environ.get("WEIGHTSMITH_LUT_LAYOUT", "").lower()
    if env in ("planes", "lut", "tables"):
        return PLANES
    lib = load_library()
    dot = bits == 4 and lib is not None and bool(lib.ws_lut_dot_supported())
    if env in ("dot4", "dot", "vnni") and not dot:
        log.warning("WEIGHTSMITH_LUT_LAYOUT=%s ignored: %s", env, "not a 4-bit layer" if bits != 4 else "no AVX-512 VNNI kernel here")
    return DOT4 if dot else PLANES


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, bits: int,
         max_block: int | None = None, layout: int = PLANES) -> PackedLayer:
    """Repack integer codes ``q`` (out, in) with per-group ``scale``/``zero`` (out, n_groups) and
    ``g_idx`` (in,) for the kernel: ``w = (q - zero[:, g_idx]) * scale[:, g_idx]``, in bit planes
    (``layout=PLANES``) or, 4-bit codes only, as nibbles for VNNI dot products (``DOT4``; see
    :func:`preferred_layout`)."""
    N, K = q.shape
    ng = scale.shape[1]
    if zero.shape != scale.shape or g_idx.shape != (K,) or scale.shape[0] != N:
        raise ValueError(f"inconsistent qparams: q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}, g_idx {tuple(g_idx.shape)}")
    w, perm, G, S, T = _pack_codes(q, g_idx, bits, ng, max_block, layout)
    z2 = 2 * zero.double() - (2**bits - 1)
    if not torch.equal(z2, z2.round()) or z2.abs().max() > 127:
        raise ValueError("the lookup-table kernel stores zero points as half-integers in int8; "
                         f"this layer's zero points are not (range {float(zero.min())} .. {float(zero.max())})")
    return PackedLayer(w, _tiled(_fp16_scales(scale), T), _tiled(z2.to(torch.int8), T), perm, N, K, G, S, bits, layout=layout)


def pack_planes(q: torch.Tensor, plane_scale: torch.Tensor, offset: torch.Tensor, group_size: int, bits: int,
                max_block: int | None = None) -> PackedLayer:
    """An HLQ layer (``w = offset[:, g] + Σ_i plane_scale[:, g, i] · bit_i(q)``, natural groups of
    ``group_size`` columns, -1 one per row) in the kernel's layout: the codes as for :func:`pack`,
    one fp16 scale per plane, and ``zc = offset + Σ_i scale_i / 2`` (the centred tables' constant)."""
    N, K = q.shape
    ng = offset.shape[1]
    if plane_scale.shape != (N, ng, bits) or offset.shape[0] != N:
        raise ValueError(f"inconsistent HLQ parameters: q {tuple(q.shape)}, plane_scale {tuple(plane_scale.shape)}, offset {tuple(offset.shape)}")
    gs = K if group_size == -1 else group_size
    g_idx = (torch.arange(K) // gs).to(torch.int32)
    w, perm, G, S, T = _pack_codes(q, g_idx, bits, ng, max_block)
    ps16 = _fp16_scales(plane_scale)
    zc = offset.double() + 0.5 * ps16.double().sum(-1)
    return PackedLayer(w, _tiled(ps16, T), torch.zeros(0, dtype=torch.int8), perm, N, K, G, S, bits,
                       zc=_tiled(zc.float(), T))


def _fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """The scales in float16 (what the kernel reads); refused where float16 would change them by more
    than its own rounding (below its normal range, or above its maximum)."""
    h = scale.to(torch.float16)
    a = scale.abs().float()
    if not torch.isfinite(h).all() or bool(((a > 0) & (a < 2.0**-14)).any()):
        raise ValueError(f"the lookup-table kernel stores scales in float16; this layer's scales (|s| from "
                         f"{float(a[a > 0].min()) if bool((a > 0).any()) else 0:.3g} to {float(a.max()):.3g}) leave its normal range")
    return h


def _plane_weights(p: PackedLayer) -> torch.Tensor:
    """(bits, rows padded to 64, groups) float64: what each bit plane's lookups are scaled by — ``2^i ·
    scale`` on a uniform grid, the plane's own scale in an HLQ layer."""
    Np, ng = p.tiles * TILE, p.n_groups
    if p.planes:
        return p.scale.double().permute(2, 0, 3, 1).reshape(p.bits, Np, ng)
    sc = p.scale.double().permute(0, 2, 1).reshape(Np, ng)
    return torch.stack([sc * 2**i for i in range(p.bits)])


def _zero_coef(p: PackedLayer) -> torch.Tensor:
    """(rows padded to 64, groups) float64: the coefficient of each group's activation sum, so that
    ``y = Σ_i plane_weight_i · T_i + zero_coef · Σa`` with the centred tables ``T_i = Σ (bit − ½) a``."""
    Np, ng = p.tiles * TILE, p.n_groups
    if p.planes:
        return p.zc.double().permute(0, 2, 1).reshape(Np, ng)
    return -p.zcs.double().permute(0, 2, 1).reshape(Np, ng)


def _dot_codes(p: PackedLayer) -> torch.Tensor:
    """A DOT4 layer's codes back as (rows padded to 64, Kp) uint8."""
    w = p.w.view(p.tiles, p.kp // 8, 4, 16, 4).permute(0, 2, 3, 1, 4)  # (T, 4, 16, chunks, 4)
    return torch.stack([w & 15, w >> 4], -2).reshape(p.tiles * TILE, p.kp)


def _dot_qparams(p: PackedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of a DOT4 layer, float64 (rows padded to 64, groups)."""
    Np, ng = p.tiles * TILE, p.n_groups
    sc = p.scale.double().permute(0, 2, 1).reshape(Np, ng)
    zero = (p.zero2.double().permute(0, 2, 1).reshape(Np, ng) + (2**p.bits - 1)) * 0.5
    return sc, zero


def unpack(p: PackedLayer) -> torch.Tensor:
    """The dequantized float32 weight (out, in), read back from the packed form (the reference path)."""
    G = p.group
    if p.layout == DOT4:
        sc, zero = _dot_qparams(p)
        wp = (_dot_codes(p).double() - zero.repeat_interleave(G, 1)) * sc.repeat_interleave(G, 1)
        out = torch.zeros(p.out_features, p.in_features, dtype=torch.float32)
        cols = p.columns()
        valid = cols >= 0
        out[:, cols[valid].long()] = wp[: p.out_features, valid].float()
        return out
    Np = p.tiles * TILE
    nib = _nibbles(p)
    pw = _plane_weights(p)
    wp = (_zero_coef(p) - 0.5 * pw.sum(0)).repeat_interleave(G, 1)
    for i in range(p.bits):
        bit = torch.stack([(nib[i] >> b) & 1 for b in range(4)], -1).reshape(Np, p.kp)
        wp = wp + bit.double() * pw[i].repeat_interleave(G, 1)
    out = torch.zeros(p.out_features, p.in_features, dtype=torch.float32)
    cols = p.columns()
    valid = cols >= 0
    out[:, cols[valid].long()] = wp[: p.out_features, valid].float()
    return out


# ----------------------------------------------------------------------------------- emulation
def _gathered(p: PackedLayer, x: torch.Tensor) -> torch.Tensor:
    """``x`` (M, in) float32 in packed column order (M, Kp), padding columns 0 — what the kernel reads."""
    x = x.float()
    xs = torch.zeros(x.shape[0], p.kp, dtype=torch.float32)
    cols = p.columns()
    valid = cols >= 0
    xs[:, valid] = x[:, cols[valid].long()]
    return xs


def tables(p: PackedLayer, x: torch.Tensor, passes: int = 1):
    """The int8 tables the kernel builds for activations ``x`` (M, in): ``(tq (passes, M, Kp/4, 16) int8,
    lut_scale (passes, M, Kp/S), asum (M, n_groups) float64)``, with the kernel's float32 operations in
    the same order. Pass 2 (if any) holds the rounding residual of pass 1 at 1/254 of its scale."""
    xs = _gathered(p, x)
    M = xs.shape[0]
    a = xs.view(M, -1, 4)
    a0, a1, a2, a3 = a.unbind(-1)
    idx = torch.arange(16)
    e = [(((idx >> b) & 1).float() - 0.5) for b in range(4)]  # ±1/2: the products are exact
    c = ((e[0] * a0[..., None] + e[1] * a1[..., None]) + e[2] * a2[..., None]) + e[3] * a3[..., None]
    mx = (((a0.abs() + a1.abs()) + a2.abs()) + a3.abs()) * 0.5
    bm = mx.view(M, -1, p.block // 4).amax(-1)
    pos = bm > 0
    safe = torch.where(pos, bm, torch.ones_like(bm))
    inv = torch.where(pos, torch.full_like(bm, 127.0) / safe, torch.zeros_like(bm))
    ls = torch.where(pos, safe / 127.0, torch.zeros_like(bm))
    invq = inv.repeat_interleave(p.block // 4, 1)
    v = torch.round(c * invq[..., None]).clamp(-127, 127)
    tqs, lss = [v.to(torch.int8)], [ls]
    if passes == 2:
        inv2, ls2 = inv * 254.0, ls / 254.0
        r = c - v * ls.repeat_interleave(p.block // 4, 1)[..., None]
        tqs.append(torch.round(r * inv2.repeat_interleave(p.block // 4, 1)[..., None]).clamp(-127, 127).to(torch.int8))
        lss.append(ls2)
    asum = xs.double().view(M, p.n_groups, p.group).sum(-1)
    return torch.stack(tqs), torch.stack(lss), asum


def dot_activations(p: PackedLayer, x: torch.Tensor, passes: int = 1):
    """A DOT4 layer's int8 activations for ``x`` (M, in), with the kernel's float32 operations:
    ``(q (passes, M, Kp) int8, s (passes, M, groups) float32)`` — per token and group ``s1 = absmax / 127``,
    ``q1 = round(x / s1)``; pass 2 the residual ``round((x − s1 q1) / s2)`` with ``s2 = s1 / 254``."""
    xs = _gathered(p, x)
    M = xs.shape[0]
    xg = xs.view(M, p.n_groups, p.group)
    amax = xg.abs().amax(-1)
    a = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    b = a / 254.0
    q1 = torch.round(xg * (1.0 / a)[..., None]).clamp(-127, 127)
    qs, ss = [q1.to(torch.int8).view(M, p.kp)], [a]
    if passes == 2:
        qs.append(torch.round((xg - q1 * a[..., None]) * (1.0 / b)[..., None]).clamp(-127, 127).to(torch.int8).view(M, p.kp))
        ss.append(b)
    return torch.stack(qs), torch.stack(ss)


def emulate(p: PackedLayer, x: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """What the kernel computes for ``x`` (M, in), in float64 after exact integer lookups (or, DOT4,
    exact integer dot products): differs from the kernel only by float rounding of the final sums."""
    if p.layout == DOT4:
        qs, ss = dot_activations(p, x, passes)
        sc, zero = _dot_qparams(p)
        codes = _dot_codes(p).double().view(-1, p.n_groups, p.group)
        y = torch.zeros(x.shape[0], p.tiles * TILE, dtype=torch.float64)
        for q, s in zip(qs, ss):
            qg = q.double().view(x.shape[0], p.n_groups, p.group)
            d = torch.einsum("ngk,mgk->mng", codes, qg)  # exact integers
            y = y + (sc[None] * s.double()[:, None, :] * (d - zero[None] * qg.sum(-1)[:, None, :])).sum(-1)
        return y[:, : p.out_features]
    tqs, lss, asum = tables(p, x, passes)
    M = x.shape[0]
    T, nb, F = p.tiles, p.kp // p.block, p.block // 4
    Np, nq = T * TILE, p.kp // 4
    nib = _nibbles(p).long()
    pw = _plane_weights(p).repeat_interleave(p.group // p.block, 2)  # (bits, Np, nb)
    y = asum @ _zero_coef(p).T
    for tq, ls in zip(tqs, lss):
        tqe = tq.long().unsqueeze(1).expand(M, Np, nq, 16)
        for i in range(p.bits):
            look = tqe.gather(-1, nib[i].unsqueeze(0).expand(M, Np, nq).unsqueeze(-1)).squeeze(-1)  # (M, Np, nq)
            isum = look.view(M, Np, nb, F).sum(-1)  # exact integers
            y = y + (isum.double() * pw[i].unsqueeze(0) * ls.double().unsqueeze(1)).sum(-1)
    return y[:, : p.out_features]


def error_bound(p: PackedLayer, x: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Per output (M, out): the largest possible difference between the kernel and the exact float
    matmul from rounding the tables (each entry is off by at most half a step of its last pass) or,
    DOT4, the activations (``Σ_g s_last[g] / 2 · Σ_{k∈g} |w[n, k]|``)."""
    if p.layout == DOT4:
        _, ss = dot_activations(p, x, passes)
        sc, zero = _dot_qparams(p)
        wabs = ((_dot_codes(p).double().view(-1, p.n_groups, p.group) - zero[..., None]).abs().sum(-1)) * sc.abs()  # (Np, ng)
        return (0.5 * ss[-1].double() @ wabs.T)[:, : p.out_features]
    _, lss, _ = tables(p, x, passes)
    ls = lss[-1]
    wsum = _plane_weights(p).abs().sum(0).repeat_interleave(p.group // p.block, 1)  # (Np, nb): Σ_i |plane weight|
    return (ls.double() @ wsum.T)[:, : p.out_features] * (0.5 * (p.block // 4))


# ----------------------------------------------------------------------------------- library
_LIB = None
_LIB_REASON = ""
_TRIED = False


def _cache_dir() -> Path:
    root = os.environ.get("WEIGHTSMITH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weightsmith")
    return Path(root) / "kernels"


def _built_extension() -> Path | None:
    """The library built by ``pip install`` (setup.py's optional extension), if any."""
    here = Path(__file__).parent
    for f in sorted(here.glob("_lut_gemv*.so")):
        if SRC.is_file() and f.stat().st_mtime < SRC.stat().st_mtime:
            log.info("ignoring %s: older than %s (rebuild with pip install)", f, SRC)
            continue
        return f
    return None


def _compile(dest: Path) -> str | None:
    """Compile the kernel into ``dest``; returns an error message, or None on success."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return "no C++ compiler found (set CXX or install g++)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    print(f"weightsmith: compiling the lookup-table kernel once into {dest} …", file=sys.stderr)
    err = None
    for flags in (CXXFLAGS, [f for f in CXXFLAGS if f != "-fopenmp"]):  # without OpenMP: the kernel's own thread pool
        cmd = [cxx, *flags, "-o", tmp, str(SRC)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            err = f"{cxx} failed: {e}"
            continue
        if r.returncode == 0:
            os.replace(tmp, dest)
            return None
        err = f"{' '.join(cmd)} failed:\n{r.stderr.strip()[-2000:]}"
    os.unlink(tmp)
    return err


def _open(path: Path):
    lib = ctypes.CDLL(str(path))
    if lib.ws_lut_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.ws_lut_abi_version()}, expected {ABI_VERSION}")
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ws_lut_gemm.argtypes = [vp] * 7 + [i64] * 6 + [ci] * 4
    lib.ws_lut_gemm.restype = ci
    lib.ws_lut_gemm_planes.argtypes = [vp] * 7 + [i64] * 6 + [ci] * 4
    lib.ws_lut_gemm_planes.restype = ci
    lib.ws_lut_gemm_dot.argtypes = [vp] * 7 + [i64] * 6 + [ci] * 4
    lib.ws_lut_gemm_dot.restype = ci
    lib.ws_lut_dot_supported.restype = ci
    lib.ws_lut_tables.argtypes = [vp, vp, i64, i64, i64, ci, ci, vp, vp, vp]
    lib.ws_i8_gemm.argtypes = [vp] * 5 + [i64] * 3 + [ci] * 3
    lib.ws_i8_gemm.restype = ci
    lib.ws_i8_vnni.restype = ci
    lib.ws_i8_gemm_tiles.argtypes = [vp] * 5 + [i64] * 3 + [ci]
    lib.ws_i8_gemm_tiles.restype = ci
    lib.ws_lean_step.argtypes = [vp, i64, vp, vp, vp] + [i64] * 7 + [ctypes.c_float] * 2 + [ci] * 2
    lib.ws_lean_step.restype = ci
    lib.ws_lut_tables.restype = None
    lib.ws_lut_isa.restype = ci
    lib.ws_lut_openmp.restype = ci
    lib.ws_lut_omp_symbol.restype = vp
    return lib


def load_library(build: bool = True):
    """The compiled kernel (a ctypes library), or None with the reason in :func:`unavailable_reason`.
    ``WEIGHTSMITH_KERNEL=off`` disables it; without a library built by ``pip install``, it is compiled
    once into ``~/.cache/weightsmith/kernels`` (``WEIGHTSMITH_KERNEL_BUILD=0`` forbids that)."""
    global _LIB, _LIB_REASON, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("WEIGHTSMITH_KERNEL", "").lower() in ("off", "0", "no", "false"):
        _LIB_REASON = "disabled by WEIGHTSMITH_KERNEL=off"
        return None
    if sys.platform != "linux" or not _is_x86():
        _LIB_REASON = f"the kernel is for x86-64 Linux (this is {sys.platform} {os.uname().machine if hasattr(os, 'uname') else ''})"
        return None
    candidates = []
    ext = _built_extension()
    if ext is not None:
        candidates.append(ext)
    digest = hashlib.sha256(SRC.read_bytes() + " ".join(CXXFLAGS).encode()).hexdigest()[:16] if SRC.is_file() else None
    cached = _cache_dir() / f"lut_gemv-{digest}.so" if digest else None
    if cached is not None:
        candidates.append(cached)
    errors = []
    for c in candidates:
        if c == cached and not c.is_file():
            if not build or os.environ.get("WEIGHTSMITH_KERNEL_BUILD", "1").lower() in ("0", "no", "false", "off"):
                errors.append("not compiled (WEIGHTSMITH_KERNEL_BUILD=0)")
                continue
            err = _compile(c)
            if err:
                errors.append(err)
                continue
        try:
            lib = _open(c)
        except OSError as e:
            errors.append(f"{c}: {e}")
            continue
        if lib.ws_lut_isa() == 0:
            _LIB_REASON = "this CPU has neither AVX2 nor AVX-512BW"
            return None
        _LIB = lib
        return lib
    _LIB_REASON = "; ".join(errors) if errors else f"no kernel library and no source at {SRC}"
    return None


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def reset_library() -> None:
    """Forget the loaded library (tests: re-read ``WEIGHTSMITH_KERNEL``)."""
    global _LIB, _LIB_REASON, _TRIED
    _LIB, _LIB_REASON, _TRIED = None, "", False


def available() -> bool:
    return load_library() is not None


def unavailable_reason() -> str:
    load_library()
    return _LIB_REASON


def isa() -> str:
    lib = load_library()
    return ISA_NAMES[lib.ws_lut_isa()] if lib is not None else "none"


def kernel_openmp_runtime() -> str | None:
    """The file of the OpenMP runtime the kernel runs on (Linux; None without OpenMP). Built with
    OpenMP, it must be the libgomp torch loaded — one team for both, not two spinning against each other."""
    lib = load_library()
    addr = lib.ws_lut_omp_symbol() if lib is not None else None
    if not addr:
        return None
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= addr < hi and len(parts) >= 6:
                    return parts[5]
    except OSError:
        pass
    return None


def lut_tables_native(p: PackedLayer, x: torch.Tensor, passes: int = 1, isa: int = -1):
    """The kernel's own tables for one token (tests): ``(tq (passes, Kp/4, 16) int8, lut_scale (passes, Kp/S), asum)``."""
    lib = load_library()
    x = x.float().contiguous()
    tab = torch.empty(passes, p.kp // 4, 32, dtype=torch.int8)
    ls = torch.empty(passes, p.kp // p.block, dtype=torch.float32)
    asum = torch.empty(p.n_groups, dtype=torch.float32)
    lib.ws_lut_tables(x.data_ptr(), p.perm_ptr(), p.kp, p.group, p.block, passes, isa, tab.data_ptr(), ls.data_ptr(), asum.data_ptr())
    assert torch.equal(tab[..., :16], tab[..., 16:])
    return tab[..., :16], ls, asum


def gemm_entry(lib, p: PackedLayer):
    """The library function for ``p`` and its leading pointer arguments (weights, scales, zero term,
    permutation): ``ws_lut_gemm`` for a uniform grid, ``ws_lut_gemm_planes`` for HLQ, ``ws_lut_gemm_dot``
    for the DOT4 layout."""
    if p.layout == DOT4:
        return lib.ws_lut_gemm_dot, (p.w.data_ptr(), p.scale.data_ptr(), p.zero2.data_ptr(), p.perm_ptr())
    if p.planes:
        return lib.ws_lut_gemm_planes, (p.w.data_ptr(), p.scale.data_ptr(), p.zc.data_ptr(), p.perm_ptr())
    return lib.ws_lut_gemm, (p.w.data_ptr(), p.scale.data_ptr(), p.zero2.data_ptr(), p.perm_ptr())


def lut_gemm(p: PackedLayer, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int = 1, isa: int = -1,
             passes: int = 1) -> torch.Tensor:
    """``x`` (M, in) float32 → (M, out) float32 through the kernel. ``isa``: -1 best, 1 AVX2, 2 AVX-512BW;
    ``passes``: 1 = int8 tables (T-MAC), 2 = int8 tables plus an int8 residual pass (~15-bit tables, 2× lookups)."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the lookup-table kernel is unavailable: {_LIB_REASON}")
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"expected input (M, {p.in_features}), got {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    M = x.shape[0]
    y = torch.empty(M, p.out_features, dtype=torch.float32)
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    fn, ptrs = gemm_entry(lib, p)
    rc = fn(*ptrs, b.data_ptr() if b is not None else None, x.data_ptr(), y.data_ptr(),
            M, p.out_features, p.in_features, p.kp, p.group, p.block, p.bits, int(passes), int(threads), int(isa))
    if rc != 0:
        raise RuntimeError(f"ws_lut_gemm failed ({'bad arguments' if rc == -1 else 'instruction set not supported by this CPU'})")
    return y


def i8_gemm(qweight: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int = 1,
            isa: int = -1, act8: bool = False) -> torch.Tensor:
    """``x`` (M, in) float32 times int8 rows ``qweight`` (out, in) with one float32 ``scale`` per row
    (+ ``bias``) → (M, out) float32: the weights widened to float in registers (weight-only; the
    float32 matmul of ``qweight * scale`` up to summation order). ``isa``: -1 best, 1 AVX2, 2 AVX-512.
    ``act8``: for one token (M = 1) on a CPU with AVX-512 VNNI (:func:`i8_vnni`), the activations
    rounded twice to int8 (value and residual, ``|x − x̂| ≤ absmax(x) / 64516``) and each row's dot
    product done in integers by ``vpdpbusd`` — compute no longer bounds it, the int8 bytes do;
    elsewhere (more tokens, no VNNI, a non-finite ``x``, ``in`` > 32768) the weight-only path."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the kernel library is unavailable: {_LIB_REASON}")
    N, K = qweight.shape
    if qweight.dtype != torch.int8 or not qweight.is_contiguous() or scale.dtype != torch.float32 or scale.shape != (N,) or not scale.is_contiguous():
        raise ValueError("i8_gemm needs contiguous int8 rows (out, in) and a contiguous float32 scale per row")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"expected input (M, {K}), got {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    rc = lib.ws_i8_gemm(qweight.data_ptr(), scale.data_ptr(), b.data_ptr() if b is not None else None, x.data_ptr(), y.data_ptr(),
                        x.shape[0], N, K, int(threads), int(isa), int(bool(act8)))
    if rc < 0:
        raise RuntimeError(f"ws_i8_gemm failed ({'bad arguments' if rc == -1 else 'instruction set not supported by this CPU'})")
    return y


def i8_vnni() -> bool:
    """Whether :func:`i8_gemm`'s ``act8`` path (AVX-512 VNNI integer dot products) runs on this CPU."""
    lib = load_library()
    return bool(lib is not None and lib.ws_i8_vnni())


def i8_pack_tiles(qweight: torch.Tensor) -> torch.Tensor:
    """int8 rows (out, in) → the VNNI tiles of :func:`i8_gemm_tiles`: uint8 ``w + 128``,
    ``[ceil(out/64)][ceil(in/4)][4 row blocks][16 rows][4 columns]`` (padding holds weight 0)."""
    N, K = qweight.shape
    T, k4 = -(-N // TILE), -(-K // 4)
    u = torch.full((T * TILE, 4 * k4), 128, dtype=torch.uint8)
    u[:N, :K] = (qweight.to(torch.int16) + 128).to(torch.uint8)
    return u.view(T, 4, 16, k4, 4).permute(0, 3, 1, 2, 4).contiguous().view(-1)


def i8_unpack_tiles(tiles: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The int8 rows (out, in) back from :func:`i8_pack_tiles`."""
    T, k4 = -(-out_features // TILE), -(-in_features // 4)
    u = tiles.view(T, k4, 4, 16, 4).permute(0, 2, 3, 1, 4).reshape(T * TILE, 4 * k4)
    return (u[:out_features, :in_features].to(torch.int16) - 128).to(torch.int8)


def i8_gemm_tiles(tiles: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                  threads: int = 1) -> torch.Tensor:
    """``x`` (M, in) times int8 rows held as VNNI tiles (:func:`i8_pack_tiles`) with one float32 ``scale``
    per row (+ ``bias``), on AVX-512 VNNI (:func:`i8_vnni`): each token's activations rounded to int8
    twice (value and residual, ``|x − x̂| ≤ absmax(x) / 64516``), every row's products summed in integers
    by ``vpdpbusd`` in its own lane, the tiles read as one stream. A token with a non-finite activation
    gets NaN outputs."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the kernel library is unavailable: {_LIB_REASON}")
    K = x.shape[1]
    if tiles.dtype != torch.uint8 or tiles.numel() != -(-out_features // TILE) * TILE * 4 * -(-K // 4) or scale.shape != (out_features,):
        raise ValueError("i8_gemm_tiles: tiles, scale and input do not match")
    x = x.to(torch.float32).contiguous()
    sc = scale.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    rc = lib.ws_i8_gemm_tiles(tiles.data_ptr(), sc.data_ptr(), b.data_ptr() if b is not None else None, x.data_ptr(), y.data_ptr(),
                              x.shape[0], out_features, K, int(threads))
    if rc != 0:
        raise RuntimeError(f"ws_i8_gemm_tiles failed ({'bad arguments' if rc == -1 else 'no AVX-512 VNNI on this CPU'})")
    return y
