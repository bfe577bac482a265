"""Layer encodings: what a layer's result is made of beyond its dense weight.

A layer's result is its dense weight (what the dequantized checkpoint holds, loadable anywhere) plus
a list of typed encodings, each knowing its storage in bits, how it is saved in
``qparams/block-*.safetensors`` and read back, and which exporters can hold it:

- :class:`Grid` — a uniform integer grid: ``w = (q − zero[:, g]) · scale[:, g]``, ``g = g_idx[c]``;
- :class:`Sparsity` — a 0/1 mask of the kept weights (unstructured or N:M along the input);
- :class:`LowRank` — factors ``A (out, r)``, ``B (r, in)`` added to the weight (LoRC).

On disk (the contract the exporters and readers follow): tensors ``{layer}.scale|zero|g_idx``
(grid), ``{layer}.mask`` (uint8, bits packed little-endian along the input), ``{layer}.lowrank_a|b``;
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


KINDS: dict[str, type] = {c.KIND: c for c in (Grid, Sparsity, LowRank)}


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
    if not gridded:
        kept = next((e.density() for e in encodings if isinstance(e, Sparsity)), 1.0)
        parts["weights"] = int(round(16 * shape[0] * shape[1] * (kept if "mask" in parts else 1.0)))
    n = shape[0] * shape[1]
    return {"bits_per_weight": sum(parts.values()) / n, "bits": parts}


def metadata(layers: dict[str, list[Encoding]]) -> dict[str, str]:
    """The safetensors metadata describing the encodings of the layers of one qparams file."""
    return {META_KEY: json.dumps({name: [e.meta() for e in encs] for name, encs in layers.items()}, sort_keys=True)}
