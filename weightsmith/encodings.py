"""Layer encodings: what a layer's result is made of beyond its dense weight.

A layer's result is its dense weight (what the dequantized checkpoint holds, loadable anywhere) plus
a list of typed encodings, each knowing its storage in bits, how it is saved in
``qparams/block-*.safetensors`` and read back, and which exporters can hold it:

- :class:`Grid` — a uniform integer grid: ``w = (q − zero[:, g]) · scale[:, g]``, ``g = g_idx[c]``;
- :class:`Sparsity` — a 0/1 mask of the kept weights (unstructured or N:M along the input);
- :class:`LowRank` — factors ``A (out, r)``, ``B (r, in)`` added to the weight (LoRC);
- :class:`Planes` — codes whose bit planes have their own scale per row and group (HLQ);
- :class:`Factored` — the weight *is* a product ``A · S · B``: ``S`` an N:M-sparse core, ``A`` (out, out)
  and ``B`` (in, in) block-diagonal (ARMOR). The dense weight has no zeros; the core has.

On disk (the contract the exporters and readers follow): tensors ``{layer}.scale|zero|g_idx``
(grid), ``{layer}.mask`` (uint8, bits packed little-endian along the input), ``{layer}.lowrank_a|b``,
``{layer}.plane_scale|plane_offset`` (planes), ``{layer}.armor_a|armor_b|armor_core`` (factored: ``A``/``B`` as bands, row ``r`` holding its block's
columns ``[k·bs, k·bs + bs)`` with ``k = r // bs``, zero-padded past a shorter last block; the core dense
with its zeros);
and the safetensors metadata key ``weightsmith.encodings``: JSON ``{layer: [{"kind": ..., ...}]}``.
A new encoding (a codebook, a sign stack, a factorised form) is one more class here with a
``KIND``, its tensors, ``bits`` and ``meta``; exporters hold the kinds they list and refuse others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

META_KEY = "weightsmith.encodings"


class Encoding:
    KIND: ClassVar[str]

    def split(self, sizes: list[int]) -> list["Encoding"]:
        """Per-layer pieces of an encoding of stacked rows (layers that read one input)."""
        raise NotImplementedError

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    def bits(self, shape: tuple[int, int]) -> dict[str, int]:
        """Storage in bits, by part (the report sums them into bits per weight)."""
        raise NotImplementedError


@dataclass
class Grid(Encoding):
    KIND: ClassVar[str] = "grid"
    bits_: int
    group_size: int
    sym: bool
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) integers
    g_idx: torch.Tensor  # (in,) int32
    latent: Optional[torch.Tensor] = None  # not stored: the values the solver rounded (GPTQ's compensated weights)

    def split(self, sizes):
        out, a = [], 0
        for n in sizes:
            lat = None if self.latent is None else self.latent[a : a + n]
            out.append(Grid(self.bits_, self.group_size, self.sym, self.scale[a : a + n], self.zero[a : a + n], self.g_idx, lat))
            a += n
        return out

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        gi = self.g_idx.long()
        return self.scale[:, gi] * (q - self.zero[:, gi].float())

    def natural(self) -> bool:
        cols = self.g_idx.numel()
        gs = cols if self.group_size == -1 else self.group_size
        return bool(torch.equal(self.g_idx.long().cpu(), torch.arange(cols) // gs))

    def tensors(self, name):
        return {f"{name}.scale": self.scale.float().cpu().contiguous(), f"{name}.zero": self.zero.to(torch.int32).cpu().contiguous(),
                f"{name}.g_idx": self.g_idx.to(torch.int32).cpu().clone()}

    def meta(self):
        return {"kind": self.KIND, "bits": self.bits_, "group_size": self.group_size, "sym": self.sym}

    def bits(self, shape):
        return grid_bits(shape, self.bits_, int(self.scale.shape[1]), self.sym, not self.natural())


@dataclass
class Sparsity(Encoding):
    KIND: ClassVar[str] = "sparsity"
    mask: torch.Tensor  # (out, in) bool: True = kept
    pattern: str  # "unstructured" or "N:M"

    def split(self, sizes):
        return [Sparsity(m, self.pattern) for m in self.mask.split(sizes, 0)]

    def density(self) -> float:
        return float(self.mask.float().mean())

    def tensors(self, name):
        packed = np.packbits(self.mask.cpu().numpy().astype(np.uint8), axis=1, bitorder="little")
        return {f"{name}.mask": torch.from_numpy(packed)}

    def meta(self):
        return {"kind": self.KIND, "pattern": self.pattern, "density": round(self.density(), 6)}

    def bits(self, shape):
        """Packed formats store the kept weights' positions: one bit per weight (a bitmask); an
        N:M pattern needs ceil(log2(C(M, N))) bits per M weights (2:4: 3 bits per 4)."""
        out, cols = shape
        if ":" in self.pattern:
            n, m = map(int, self.pattern.split(":"))
            from math import comb, log2, ceil

            return {"mask": ceil(log2(comb(m, n))) * out * (cols // m)}
        return {"mask": out * cols}


@dataclass
class LowRank(Encoding):
    KIND: ClassVar[str] = "lowrank"
    factors: list  # per stacked layer: (A (out_l, r), B (r, in)) — one entry per layer of the group

    def split(self, sizes):
        if len(self.factors) != len(sizes):
            raise ValueError("low-rank factors are per layer")
        return [LowRank([f]) for f in self.factors]

    def tensors(self, name):
        (A, B), = self.factors
        return {f"{name}.lowrank_a": A.float().cpu().contiguous(), f"{name}.lowrank_b": B.float().cpu().contiguous()}

    def meta(self):
        return {"kind": self.KIND, "rank": int(self.factors[0][0].shape[1])}

    def bits(self, shape):
        return lowrank_bits(shape, int(self.factors[0][0].shape[1]))


def block_slices(d: int, bs: int) -> list[slice]:
    """The diagonal blocks of a ``d``-wide block-diagonal matrix with blocks of ``bs`` (the last one shorter)."""
    return [slice(a, min(a + bs, d)) for a in range(0, d, bs)]


def band_of(blocks: list[torch.Tensor], d: int, bs: int) -> torch.Tensor:
    """Blocks of a block-diagonal matrix as its band (d, bs): row ``r`` holds its block's row."""
    band = torch.zeros(d, bs, dtype=torch.float32)
    for sl, blk in zip(block_slices(d, bs), blocks):
        band[sl, : blk.shape[1]] = blk.float().cpu()
    return band


def dense_of_band(band: torch.Tensor) -> torch.Tensor:
    """The (d, d) block-diagonal matrix of a band (see :func:`band_of`)."""
    d, bs = band.shape
    out = torch.zeros(d, d, dtype=band.dtype)
    for sl in block_slices(d, bs):
        n = sl.stop - sl.start
        out[sl, sl] = band[sl, :n]
    return out


@dataclass
class Factored(Encoding):
    """The layer's weight as ``A · S · B`` (ARMOR): ``S`` (out, in) sparse with an N:M ``pattern`` along
    the input, ``A`` and ``B`` block-diagonal with blocks of ``block_size`` (the last one shorter). The
    dense weight is the product; its storage is the core's kept values and positions plus the blocks."""

    KIND: ClassVar[str] = "factored"
    STORES_WEIGHT: ClassVar[bool] = True  # its parts replace the dense 16-bit weights in the bit count
    factors: list  # per stacked layer: (A band (out_l, bs), B band (in, bs), core (out_l, in))
    block_size: int
    pattern: str

    def split(self, sizes):
        if len(self.factors) != len(sizes):
            raise ValueError("factored encodings are per layer")
        return [Factored([f], self.block_size, self.pattern) for f in self.factors]

    def dense(self) -> torch.Tensor:
        (a, b, core), = self.factors
        return dense_of_band(a.float()) @ core.float() @ dense_of_band(b.float())

    def tensors(self, name):
        (a, b, core), = self.factors
        return {f"{name}.armor_a": a.float().cpu().contiguous(), f"{name}.armor_b": b.float().cpu().contiguous(),
                f"{name}.armor_core": core.float().cpu().contiguous()}

    def meta(self):
        (_, _, core), = self.factors
        return {"kind": self.KIND, "pattern": self.pattern, "block_size": self.block_size,
                "core_density": round(float((core != 0).float().mean()), 6)}

    def bits(self, shape):
        """16-bit kept core values and the N:M positions (as :class:`Sparsity` counts them), and the
        16-bit entries of the diagonal blocks of ``A`` and ``B``."""
        out, cols = shape
        n, m = map(int, self.pattern.split(":"))
        blocks = sum((s.stop - s.start) ** 2 for s in block_slices(out, self.block_size)) + sum(
            (s.stop - s.start) ** 2 for s in block_slices(cols, self.block_size))
        return {"weights": 16 * out * (cols // m) * n, **Sparsity(torch.zeros(0, 0, dtype=torch.bool), self.pattern).bits(shape),
                "factors": 16 * blocks}


@dataclass
class Planes(Encoding):
    """Hierarchical linear levels (ELUTQ's HLQ): each weight is a ``bits``-bit code whose bit planes
    carry their own scale per row and group, ``w = offset[:, g] + Σ_i plane_scale[:, g, i] · bit_i(q)``.
    The uniform grid is the special case ``plane_scale[..., i] = 2^i · scale``; the lookup-table kernel
    sums one table lookup per plane, so free plane scales cost it nothing but their storage. Groups
    are natural (``group_size`` consecutive columns; -1 one group per row)."""

    KIND: ClassVar[str] = "planes"
    STORES_WEIGHT: ClassVar[bool] = True  # its codes replace the dense 16-bit weights in the bit count
    bits_: int
    group_size: int
    plane_scale: torch.Tensor  # (out, n_groups, bits) float32
    offset: torch.Tensor  # (out, n_groups) float32

    def split(self, sizes):
        out, a = [], 0
        for n in sizes:
            out.append(Planes(self.bits_, self.group_size, self.plane_scale[a : a + n], self.offset[a : a + n]))
            a += n
        return out

    def levels(self) -> torch.Tensor:
        """(out, n_groups, 2**bits): the value of every code."""
        return self.offset[..., None] + self.plane_scale.float() @ plane_bits(self.bits_, self.offset.device).T

    def tensors(self, name):
        return {f"{name}.plane_scale": self.plane_scale.float().cpu().contiguous(), f"{name}.plane_offset": self.offset.float().cpu().contiguous()}

    def meta(self):
        return {"kind": self.KIND, "bits": self.bits_, "group_size": self.group_size}

    def bits(self, shape):
        """``bits`` per weight; per row and group one 16-bit scale per plane and a 16-bit offset."""
        out, cols = shape
        ng = int(self.offset.shape[1])
        return {"weights": self.bits_ * out * cols, "scales": 16 * out * ng * (self.bits_ + 1)}


def plane_bits(bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2**bits, bits): bit ``i`` of every code, the matrix that maps plane scales to levels."""
    codes = torch.arange(2**bits, device=device)
    return ((codes[:, None] >> torch.arange(bits, device=device)) & 1).to(dtype)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Code of the nearest level of every value: x (n, k), levels (n, L) → (n, k) int64 (a binary search
    among each row's sorted levels: no (n, k, L) distance tensor)."""
    order = levels.argsort(1)
    srt = levels.gather(1, order)
    mid = ((srt[:, 1:] + srt[:, :-1]) / 2).contiguous()
    return order.gather(1, torch.searchsorted(mid, x.contiguous()))


KINDS: dict[str, type] = {c.KIND: c for c in (Grid, Sparsity, LowRank, Factored, Planes)}


def grid_bits(shape: tuple[int, int], bits: int, n_groups: int, sym: bool, permuted: bool) -> dict[str, int]:
    """Storage of a grid: ``bits`` per weight; one 16-bit scale per (row, group); for an asymmetric
    grid one zero point per (row, group) at ``bits`` bits (symmetric grids have an implicit zero); a
    32-bit ``g_idx`` per input column only when act-order leaves columns outside their natural group."""
    out, cols = shape
    return {"weights": bits * out * cols, "scales": 16 * out * n_groups, "zeros": 0 if sym else bits * out * n_groups,
            "g_idx": 32 * cols if permuted else 0}


def lowrank_bits(shape: tuple[int, int], rank: int) -> dict[str, int]:
    """Low-rank factors ``A (out, r)`` and ``B (r, in)`` at 16 bits."""
    return {"lowrank": 16 * rank * (shape[0] + shape[1])}


def layer_bits(shape: tuple[int, int], encodings: list[Encoding]) -> dict:
    """Bits per weight of one layer from its encodings, as our exporters store it: on a grid every
    weight is a code (pruned ones too, as exact zeros: the mask costs nothing more); without a grid
    the kept weights at 16 bits plus the mask."""
    parts: dict[str, int] = {}
    gridded = any(isinstance(e, Grid) for e in encodings)
    for e in encodings:
        if gridded and isinstance(e, Sparsity):
            continue
        for k, v in e.bits(shape).items():
            parts[k] = parts.get(k, 0) + v
    if not gridded and not any(getattr(e, "STORES_WEIGHT", False) for e in encodings):
        kept = next((e.density() for e in encodings if isinstance(e, Sparsity)), 1.0)
        parts["weights"] = int(round(16 * shape[0] * shape[1] * (kept if "mask" in parts else 1.0)))
    n = shape[0] * shape[1]
    return {"bits_per_weight": sum(parts.values()) / n, "bits": parts}


def metadata(layers: dict[str, list[Encoding]]) -> dict[str, str]:
    """The safetensors metadata describing the encodings of the layers of one qparams file."""
    return {META_KEY: json.dumps({name: [e.meta() for e in encs] for name, encs in layers.items()}, sort_keys=True)}
