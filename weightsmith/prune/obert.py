"""The Optimal BERT Surgeon (oBERT): pruning by a block-diagonal inverse empirical Fisher of the model's loss.

Kurtić, Campos, Nguyen, Frantar, Kurtz, Fineran, Goin, Alistarh, "The Optimal BERT Surgeon: Scalable
and Accurate Second-Order Pruning for Large Language Models", EMNLP 2022 (arXiv:2203.07259; reference
code neuralmagic/sparseml ``research/optimal_BERT_surgeon_oBERT`` and its OBS pruning modifier, read,
not copied). Each layer's weights are flattened row-major and cut into blocks of ``B`` consecutive
weights (the paper's B = 50; a last partial block is zero-padded, its padding never counted). Per block
``F_b = λI + (1/m) Σ_i g_{b,i} g_{b,i}ᵀ`` over ``m`` per-window gradients of the model's loss
(``engine/fisher.py``, the ``block_fisher`` need: the next-token loss of decoders, BERT's masked-LM
loss of encoders with a masked-LM head). ``F_b⁻¹`` is
a direct B×B inverse (Cholesky, float64; ``λ`` escalating ×10 on a singular block) or, equivalently,
``m`` Sherman–Morrison (Woodbury) rank-one updates from ``I/λ`` (:func:`woodbury_inverse`, the paper's
form when the gradients are kept). The saliency of weight ``q`` is ``ρ_q = w_q² / (2 [F⁻¹]_qq)``; the
lowest ``sparsity`` fraction of the layer (unstructured) or the ``M − N`` lowest of every ``M``
consecutive inputs (N:M; ``B`` and the width must be multiples of ``M`` so that no group straddles two
blocks) is pruned, and within each block the kept weights get the multi-weight OBS update
``δw = −F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ E_Qᵀ w`` for its pruned set ``Q``.

**Gradual** (``rounds = k > 1``, ``obert:rounds=3`` / ``--rounds 3``): ``k`` rounds to the target
on the cubic schedule ``s_j = s (1 − (1 − j/k)³)``, the Fisher re-estimated on the model as pruned so far
before each round (masks nested; N:M patterns only in the last round, the earlier ones unstructured at
the schedule's sparsity). The paper fine-tunes between its rounds; here, post-training, the OBS update
is the only weight change. Cost: ``k`` gradient passes (each ``ceil(Fisher bytes / fisher_memory_mb)``
forward+backward passes of the whole model over the calibration windows) instead of one. In a recipe
the first ``k − 1`` rounds run in the step's ``gradients`` hook (:func:`gradients`: whole-model passes
before the block-streamed one, the layers' weights as pruned so far kept in memory) and the last round
is the streamed step itself, starting from those weights; :func:`obert_gradual` runs all rounds on a
whole in-memory model.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..encodings import Sparsity
from ..errors import WeightsmithError
from ..engine.fisher import flat_blocks
from ..quant.registry import register
from .common import PruneFields, mask_from_scores, nm


class OBERTConfig(PruneFields):
    name: Literal["obert"] = "obert"
    fisher_block: int = Field(50, ge=1, description="B: consecutive weights (row-major) per Fisher block (the paper's 50)")
    fisher_damp: float = Field(1e-7, gt=0.0, description="λ added to the Fisher's diagonal (the paper's 1e-7; escalates x10 on a singular block)")
    fisher_samples: int = Field(0, ge=0, description="calibration windows whose gradients form the Fisher (0 = all)")
    fisher_memory_mb: float = Field(4096, gt=0, description="memory for the Fisher blocks of one gradient pass (more layers: more passes)")
    rounds: int = Field(1, ge=1, le=32, description="gradual pruning: rounds to the sparsity on the cubic schedule, the Fisher "
                                                      "re-estimated on the model as pruned so far before each (k× the gradient passes; 1 = one-shot)")

    def gradient_request(self) -> dict:
        return {"block": self.fisher_block, "samples": self.fisher_samples or None, "memory_mb": self.fisher_memory_mb}


def block_inverse(F: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``(F + λI)⁻¹`` of every block (n, B, B), float64, ``λ`` ×10 until every block is positive definite."""
    F = F.double()
    eye = torch.eye(F.shape[-1], dtype=torch.float64, device=F.device)
    scale = max(float(F.diagonal(dim1=-2, dim2=-1).abs().mean()), 1e-30)
    lam = damp
    for _ in range(40):
        L, info = torch.linalg.cholesky_ex(F + lam * eye)
        if int(info.max()) == 0:
            return torch.cholesky_inverse(L), lam
        lam *= 10
        if lam > 1e6 * scale:
            break
    raise WeightsmithError(f"oBERT: a Fisher block is not positive definite even at damping {lam:g}")


def woodbury_inverse(G: torch.Tensor, damp: float) -> torch.Tensor:
    """``(λI + (1/m) Σ_i g_i g_iᵀ)⁻¹`` per block by ``m`` Sherman–Morrison updates; ``G`` (n, m, B)."""
    n, m, B = G.shape
    Finv = torch.eye(B, dtype=torch.float64).expand(n, B, B) / damp
    for i in range(m):
        g = G[:, i].double()
        u = torch.einsum("nkl,nl->nk", Finv, g)
        Finv = Finv - torch.einsum("nk,nl->nkl", u, u) / (m + (g * u).sum(-1))[:, None, None]
    return Finv


def obert(w: torch.Tensor, F: torch.Tensor, *, sparsity: float = 0.5, pattern: str = "unstructured", damp: float = 1e-7,
          keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """oBERT on one layer ``w`` (rows, cols) with its Fisher blocks ``F`` (nblocks, B, B): (weights, mask, info)."""
    rows, cols = w.shape
    B = F.shape[-1]
    p = nm(pattern, cols)
    if p is not None and B % p[1]:
        raise WeightsmithError(f"oBERT: N:M groups of {p[1]} must lie inside the Fisher blocks, but the block size {B} is not a multiple of {p[1]}")
    Wb = flat_blocks(w.double(), B)  # (nb, B)
    if Wb.shape[0] != F.shape[0]:
        raise WeightsmithError(f"oBERT: the Fisher has {F.shape[0]} blocks of {B}, the layer {Wb.shape[0]} (a rule changed fisher_block?)")
    Finv, lam = block_inverse(F, damp)
    d = Finv.diagonal(dim1=-2, dim2=-1)
    rho = (Wb.square() / (2 * d)).reshape(-1)[: rows * cols].reshape(rows, cols)
    if keep is not None:
        rho = torch.where(keep.to(rho.device), rho, torch.full_like(rho, -1.0))
    mask = mask_from_scores(rho.float(), sparsity, pattern, per_row=False)
    if keep is not None:
        mask &= keep.to(mask.device)
    Q = ~flat_blocks(mask.double(), B).bool()  # pruned positions per block (padding counted as pruned: its w is 0)
    # multi-weight OBS update per block: δ = −F⁻¹ E_Q (F⁻¹_QQ)⁻¹ w_Q, solved with the kept set fixed as an identity
    Qf = Q.double()
    A = Finv * Qf[:, :, None] * Qf[:, None, :] + torch.diag_embed(1 - Qf)  # F⁻¹_QQ, identity on the kept positions
    z = torch.linalg.solve(A, Wb * Qf)  # (F⁻¹_QQ)⁻¹ w_Q on Q, 0 elsewhere
    Wn = Wb - torch.einsum("nkl,nl->nk", Finv, z)
    Wn = torch.where(Q, torch.zeros_like(Wn), Wn)
    out = Wn.reshape(-1)[: rows * cols].reshape(rows, cols).float()
    loss = float(0.5 * (Wb * Qf * z).sum())  # the predicted loss increase Σ_b ½ w_Qᵀ (F⁻¹_QQ)⁻¹ w_Q
    if not torch.isfinite(out).all():
        raise WeightsmithError("oBERT produced NaN/Inf weights (a Fisher block is too ill-conditioned: raise fisher_damp)")
    return out, mask, {"fisher_damp": lam, "damp_escalated": lam > damp * (1 + 1e-9), "obert_loss_increase": loss,
                       "density": float(mask.float().mean())}


def prune(state, cfg: OBERTConfig, ctx) -> None:
    """oBERT (Kurtić et al. 2022): prune by the block-Fisher OBS saliency, updating the kept weights of each block."""
    grads = None if state.stats is None else state.stats.grads
    if not grads or "block_fisher" not in grads:
        raise WeightsmithError("obert needs the block Fisher of the model's loss (the block_fisher need)")
    outs, masks, a, info = [], [], 0, {}
    base = state.mask
    earlier = grads.get(EARLIER_ROUNDS)  # gradual: per layer (weights, mask) after rounds 1 .. k-1, or None
    for k, n in enumerate(state.sizes):
        F = grads["block_fisher"][k]
        w, keep = state.W[a : a + n], None if base is None else base[a : a + n]
        if earlier is not None and earlier[k] is not None:
            w0, m0 = earlier[k]
            w, keep = w0.to(w.device, w.dtype), m0.to(w.device) if keep is None else keep & m0.to(w.device)
        W, m, info = obert(w, F.to(state.W.device), sparsity=cfg.sparsity, pattern=cfg.pattern, damp=cfg.fisher_damp, keep=keep)
        outs.append(W)
        masks.append(m)
        a += n
    mask = torch.cat(masks, 0)
    state.add(Sparsity(mask, cfg.pattern), torch.cat(outs, 0), info)


def cubic_schedule(sparsity: float, steps: int) -> list[float]:
    """The gradual schedule ``s_j = s (1 − (1 − j/k)³)``, j = 1..k (the last is ``s``)."""
    return [sparsity * (1 - (1 - j / steps) ** 3) for j in range(1, steps + 1)]


def obert_round(weights: dict, masks: dict, Fs, targets: dict, last: bool) -> dict:
    """One gradual round on ``weights`` / ``masks`` ({layer: tensor}, updated in place): each layer pruned to its
    ``targets[layer] = (sparsity, pattern, damp)`` with its Fisher ``Fs[layer]`` (a dict or a store with ``get``),
    its earlier mask kept; N:M only when ``last``. Returns each layer's info."""
    info = {}
    for n, (s, pattern, damp) in targets.items():
        F = Fs.get(n)
        weights[n], masks[n], info[n] = obert(weights[n], F, sparsity=s, pattern=pattern if last else "unstructured", damp=damp, keep=masks[n])
    return info


def obert_gradual(model: torch.nn.Module, layers: dict, fisher_fn, *, sparsity: float, steps: int, pattern: str = "unstructured",
                  damp: float = 1e-7) -> list[dict]:
    """Gradual oBERT on an in-memory model: ``layers`` {name: linear module}, ``fisher_fn()`` → {name: F} on the
    model as it is now (re-estimated each round). N:M patterns are applied in the last round only (earlier
    rounds unstructured at the schedule's sparsity). Returns each round's info per layer."""
    from ..model.adapter import get_weight, set_weight

    weights = {n: get_weight(mod).float() for n, mod in layers.items()}
    masks = {n: None for n in layers}
    log = []
    for j, s in enumerate(cubic_schedule(sparsity, steps)):
        Fs = fisher_fn()
        log.append(obert_round(weights, masks, Fs, {n: (s, pattern, damp) for n in layers}, last=j == steps - 1))
        for n, mod in layers.items():
            set_weight(mod, weights[n].to(mod.weight.dtype))
    return log


def _final_sparsity(sparsity: float, pattern: str) -> float:
    """The sparsity a layer ends at: ``sparsity``, or ``1 − N/M`` for an N:M pattern."""
    p = nm(pattern)
    return sparsity if p is None else 1 - p[0] / p[1]


EARLIER_ROUNDS = "obert_earlier_rounds"  # the key of the gradual rounds' (weights, mask) per layer in stats.grads


class _Earlier:
    """The gradual rounds' result for the streamed step: ``get(layer)`` → (weights, mask) or None (not pruned)."""

    def __init__(self, weights: dict, masks: dict):
        self.weights, self.masks = weights, masks

    def get(self, name: str):
        return (self.weights[name], self.masks[name]) if name in self.weights else None


def gradients(lm, cfg, step: OBERTConfig, ids: torch.Tensor, names: list[str], directory, progress: bool, rules: list) -> dict:
    """The ``block_fisher`` need of an oBERT step, over its rounds: one-shot, the Fisher of the float model;
    gradual (``rounds = k``), rounds 1 .. k−1 here — each a block Fisher of the model as pruned so far
    (the layers' weights given to the gradient pass) and each layer pruned to the schedule's sparsity with
    it — then the Fisher of the model after round k−1 for the streamed last round, which starts from
    those weights and masks (``EARLIER_ROUNDS``). Each layer's sparsity, pattern and damping are its own
    (per-layer rules and planners apply); a layer that a rule keeps out of oBERT stays dense here."""
    from ..engine.fisher import weight_keys, block_fisher

    req = step.gradient_request()
    fisher = lambda weights, desc: block_fisher(lm, ids, names, req["block"], memory_mb=req["memory_mb"], directory=directory,  # noqa: E731
                                                progress=progress, weights=weights, desc=desc)
    if step.rounds == 1:
        return {"block_fisher": fisher(None, "block Fisher")}
    targets = {}
    for n in names:
        st = cfg.layer_settings(n, rules)
        mine = [s for s in st.steps if s.name == step.name]
        if st.skip or not mine:
            continue
        if mine[0].rounds != step.rounds or mine[0].fisher_block != step.fisher_block:
            raise WeightsmithError(f"obert: a rule sets rounds or fisher_block for {n}; they hold for the whole model (set them on the step)")
        targets[n] = (mine[0].sparsity, mine[0].pattern, mine[0].fisher_damp)
    keys = weight_keys(lm, list(targets))
    weights = {n: lm.source.get(keys[n]).float() for n in targets}
    masks: dict = {n: None for n in targets}
    for j in range(step.rounds - 1):
        Fs = fisher(weights, f"block Fisher, round {j + 1}/{step.rounds}")
        obert_round(weights, masks, Fs, {n: (cubic_schedule(_final_sparsity(s, p), step.rounds)[j], "unstructured", d)
                                         for n, (s, p, d) in targets.items()}, last=False)
    return {"block_fisher": fisher(weights, f"block Fisher, round {step.rounds}/{step.rounds}"), EARLIER_ROUNDS: _Earlier(weights, masks)}


register("obert", OBERTConfig, kind="pruner", needs={"block_fisher"}, produces=("sparsity",), gradients=gradients)(prune)
