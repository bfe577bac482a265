"""LoRC: low-rank compensation of the quantization error.

Yao, Wu, Li, Youn, He, "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
Comprehensive Study to Low Rank Compensation", 2023 (arXiv:2303.08302), §5. Written from the paper:
the error ``E = W − Q(W)`` is approximated by a rank-``r`` product ``A·B`` from a truncated SVD, and the
layer computes ``(Q + A·B) x``; ``A`` (out, r) and ``B`` (r, in) are small float matrices stored beside
the quantized weight (the paper also quantizes them to 8 bits; here they are counted at 16 bits).

``whiten`` (default on; not in the paper) makes the approximation optimal for the layer *output*
error ``tr((E − AB) H (E − AB)ᵀ)`` with ``H = XᵀX/N`` instead of the weight error ``‖E − AB‖_F``: with
``R = (H + λI)^{1/2}`` (symmetric square root by eigendecomposition, ``λ = damp·mean(diag H)`` keeps it
invertible), the SVD of ``E·R`` truncated to rank ``r`` is ``U Σ Vᵀ`` and ``A = U Σ^{1/2}``,
``B = Σ^{1/2} Vᵀ R⁻¹`` (Eckart–Young in the whitened space, then un-whitened). At rank ≥ min(out, in)
both variants reproduce ``E`` exactly, so ``Q + AB = W``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..encodings import LowRank
from .registry import register


class LoRCConfig(Strict):
    name: Literal["lorc"] = "lorc"
    rank: int = Field(8, ge=1, description="rank r of the correction A·B per layer")
    whiten: bool = Field(True, description="minimise the output error tr(E H Eᵀ) (SVD of E·H^1/2) instead of the weight error ‖E‖_F")
    damp: float = Field(0.01, ge=0.0, le=1.0, description="whitening: H + damp·mean(diag H)·I")


def lowrank_factors(E: torch.Tensor, rank: int, H: torch.Tensor | None = None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A·B`` the best rank-``rank`` approximation of ``E`` (H-weighted when ``H`` is given)."""
    Ed = E.double()
    r = min(rank, *E.shape)
    R = Rinv = None
    if H is not None:
        Hd = H.double()
        mean = float(torch.diag(Hd).mean())
        if mean > 0:
            lam, V = torch.linalg.eigh(Hd + damp * mean * torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device))
            lam = lam.clamp(min=mean * 1e-12)
            R = (V * lam.sqrt()) @ V.T
            Rinv = (V * lam.rsqrt()) @ V.T
    M = Ed @ R if R is not None else Ed
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    sq = S[:r].sqrt()
    A = U[:, :r] * sq
    B = sq[:, None] * Vh[:r]
    if Rinv is not None:
        B = B @ Rinv
    return A.float(), B.float()


def correct(state, cfg: LoRCConfig, ctx) -> None:
    """LoRC (ZeroQuant-V2, Yao et al. 2023): rank-r SVD correction A·B of W − Q(W), optionally whitened by the activations."""
    H = state.H if cfg.whiten else None
    ref, Q = state.reference, state.W
    factors, a = [], 0
    for n in state.sizes:
        factors.append(lowrank_factors(ref[a : a + n].float() - Q[a : a + n].float(), cfg.rank, H, cfg.damp))
        a += n
    W = Q.clone()
    a = 0
    for (A, B), n in zip(factors, state.sizes):
        W[a : a + n] += A @ B
        a += n
    state.add(LowRank(factors), W, {"lorc_rank": int(factors[0][0].shape[1])})


register("lorc", LoRCConfig, kind="correction", needs=lambda cfg: frozenset({"H"} if cfg.whiten else ()),
         produces=("lowrank",), requires=("grid", "sparsity"))(correct)
