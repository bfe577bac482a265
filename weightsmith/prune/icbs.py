"""iCBS: iterative combinatorial brain surgeon — pruning masks by block coordinate descent.

Rosenberg, Brubaker, Schuetz, Salton, Zhu, Zhu, Katzgraber, Zhong (Amazon), "Scalable iterative pruning
of large language and vision models using block coordinate descent", 2024 (arXiv:2411.17796;
reference code amazon-science/icbs ``pruner.py``/``solvers.py``/``sa-card``, read, not copied).

The paper starts from a one-shot mask and repeatedly picks a *block* of weights — some currently
pruned, some kept, chosen near the keep/prune boundary — and re-solves which of them to prune with
everything else fixed: a quadratic binary problem (QUBO) ``min xᵀQx + 2cᵀx`` over the block's prune
indicators ``x`` with a cardinality constraint (as many pruned after as before), solved by simulated
annealing whose moves swap a pruned and a kept weight (``sa-card``). Kept weights keep their values;
the paper's ``Q`` comes from a second-order expansion of the network loss.

Here (a layer step of the engine) the objective is the layer's own quadratic, exact:
``f = Σ_rows (w0 − v∘m) H (w0 − v∘m)ᵀ`` with ``H = XᵀX/N`` (damped by ``damp``·mean diag, as SparseGPT),
``m`` the mask and ``v`` the values a kept weight has. Rows are independent given ``H``, so every
block lies in one row and all rows are solved at once (batched). For a block ``S`` of a row, with
``a`` the row's error when every block weight is kept, ``Q = diag(v_S) H_SS diag(v_S)`` and
``c = v_S ∘ (H a)_S`` — the interactions with every pruned weight outside the block are in ``c``.

- **blocks** (unstructured): per row, the candidates are the ``candidates`` fraction of its pruned
  weights with the highest scores ``|v|·sqrt(H_jj)`` and the same fraction of its kept weights with the
  lowest (the paper's selection near the boundary; the rest stay fixed, like its fix fractions);
  each sweep shuffles them into blocks of ``block_size`` weights holding pruned and kept in the
  row's proportion, and visits every block once. N:M: blocks are ``block_size`` consecutive inputs
  (a multiple of ``M``; the windows shift by half a block every other sweep) and a swap stays inside
  one group of ``M``, so every group keeps exactly ``N``.
- **block solver**: the paper's heuristic — simulated annealing with cardinality-preserving swap
  moves, ``anneal`` moves per block variable, geometric temperature from the mean |swap gain| down
  by 10³ — then greedy best-improvement swaps until none improves (a 2-swap local optimum, so a
  block never gets worse). Not an exact QUBO solve; the tests compare it with exhaustive enumeration
  on small blocks.
- **values** (``update``, our addition — the paper keeps the original values): after the initial
  mask and after every sweep, the kept weights of each row are refitted towards least squares,
  ``v_K = H_KK⁻¹ (H w0)_K``, by ``refit_iters`` steps of Jacobi-preconditioned conjugate gradients on
  all rows at once, warm-started (30 steps reach the exact solve to 4 digits on SmolLM2 layers, at a
  fraction of a per-row Cholesky's cost); the next sweep's QUBO uses those values (a pruned
  weight that comes back returns with its original value). Every step lowers ``f``, so the result
  is at or below the initial mask's least-squares error — with ``init=sparsegpt`` below SparseGPT's.
  ``update=false`` is the paper's mask-only variant.

Each row keeps exactly its count of zeros (``round(cols·sparsity)``, as SparseGPT's per-row
selection), or the N:M pattern. Quality/time: ``block_size``, ``sweeps``, ``candidates``, ``anneal``.
An earlier pruner's zeros stay pruned (never candidates); dead inputs (``H_jj = 0``) are pruned first.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..encodings import Sparsity
from ..errors import WeightsmithError
from ..quant.registry import register
from .common import PruneFields, mask_from_scores, nm
from .sparsegpt import sparsegpt


class ICBSConfig(PruneFields):
    name: Literal["icbs"] = "icbs"
    init: Literal["sparsegpt", "wanda", "magnitude"] = Field("sparsegpt", description="the starting mask")
    block_size: int = Field(64, ge=2, le=1024, description="weights per block (per row) re-solved jointly")
    sweeps: int = Field(2, ge=0, le=100, description="passes over the blocks (each followed by the value refit)")
    candidates: float = Field(0.5, gt=0.0, le=1.0, description="unstructured: fraction of each row's pruned and of its kept weights, nearest the boundary, that blocks draw from")
    anneal: int = Field(0, ge=0, le=1000, description="simulated-annealing swap moves per block variable before the greedy descent (0: greedy only)")
    update: bool = Field(True, description="refit the kept weights by least squares after each sweep (not in the paper, which keeps the original values)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="H + damp·mean(diag H)·I in the objective")
    refit_iters: int = Field(30, ge=1, le=10000, description="conjugate-gradient steps of each least-squares refit of the kept weights")
    shuffle_seed: int = Field(0, description="seed of the block shuffles and the annealing")


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(torch.diag(H).mean()))
    return H


def lstsq_rows(w0: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, chunk_elems: int = 1 << 23) -> torch.Tensor:
    """Per row, the kept weights minimising ``(w0 − v) H (w0 − v)ᵀ`` with ``v`` zero where ``mask`` is
    False: ``v_K = H_KK⁻¹ (H w0)_K`` (``H`` positive definite, float64). Rows with fewer kept weights are
    padded with identity equations."""
    rows, cols = w0.shape
    Hd = H.double()
    rhs_full = w0.double() @ Hd
    kept = mask.sum(1)
    K = int(kept.max()) if rows else 0
    out = torch.zeros(rows, cols, dtype=torch.float64, device=w0.device)
    if K == 0:
        return out.float()
    # kept indices first (stable), padded by pruned ones marked invalid
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=w0.device)[None, :] < kept[:, None]
    step = max(1, chunk_elems // (K * K))
    eye = torch.eye(K, dtype=torch.float64, device=w0.device)
    for a in range(0, rows, step):
        idx, val = order[a : a + step], valid[a : a + step]
        A = Hd[idx[:, :, None], idx[:, None, :]]
        vv = val[:, :, None] & val[:, None, :]
        A = torch.where(vv, A, eye.expand_as(A))
        b = torch.where(val, rhs_full[a : a + step].gather(1, idx), 0.0)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info.max()) != 0:
            raise WeightsmithError("icbs: H restricted to the kept weights is not positive definite")
        x = torch.cholesky_solve(b[:, :, None], L)[:, :, 0]
        out[a : a + step].scatter_(1, idx, torch.where(val, x, 0.0))
    return out.float()


def refit_rows(w0: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, iters: int) -> torch.Tensor:
    """The kept weights of every row towards their least-squares values (:func:`lstsq_rows`) by
    Jacobi-preconditioned conjugate gradients on all rows at once, started from ``v``: each step one
    (rows × in) · (in × in) product, and the objective never rises. ``iters`` large reaches the exact refit."""
    Hf = H.float()
    m = mask.float()
    dinv = 1.0 / torch.diag(Hf)
    x = v.float() * m
    r = ((w0.float() - x) @ Hf) * m
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(iters):
        Ap = (p @ Hf) * m
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rz / pAp.where(pAp > 0, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        z = r * dinv
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x * m


def solve_block(Q: torch.Tensor, c: torch.Tensor, x: torch.Tensor, free: torch.Tensor, grp: torch.Tensor | None, anneal: int,
                gen: torch.Generator) -> torch.Tensor:
    """Batched cardinality-preserving minimisation of ``xᵀQx + 2cᵀx`` over binary ``x`` (R, b): swap
    moves (one pruned ↔ one kept, both ``free``, same ``grp`` when given), simulated annealing then
    greedy best-improvement swaps to a local optimum. Returns the new ``x`` (float, 0/1)."""
    R, b = x.shape
    x = x.clone()
    g = torch.einsum("rij,rj->ri", Q, x) + c
    dQ = torch.diagonal(Q, dim1=1, dim2=2)
    ar = torch.arange(R, device=x.device)
    same = None if grp is None else grp[:, :, None] == grp[:, None, :]

    def apply(rows, i, j):
        si = 1.0 - 2.0 * x[rows, i]
        sj = 1.0 - 2.0 * x[rows, j]
        x[rows, i] += si
        x[rows, j] += sj
        g[rows] += Q[rows, :, i] * si[:, None] + Q[rows, :, j] * sj[:, None]

    if anneal > 0:
        s = 1.0 - 2.0 * x
        d = 2.0 * s * g + dQ
        t0 = float(d.abs()[free].mean()) if free.any() else 0.0
        n_moves = anneal * b
        for step in range(n_moves if t0 > 0 else 0):
            T = t0 * 10.0 ** (-3.0 * step / max(1, n_moves - 1))
            pw = ((x > 0.5) & free).float()
            has = pw.sum(1) > 0
            i = torch.multinomial(pw + (~has).float()[:, None], 1, generator=gen)[:, 0]  # rows without one: any, masked below
            kw = (x < 0.5) & free
            if same is not None:
                kw = kw & same[ar, i]
            has &= kw.any(1)
            if not has.any():
                break
            j = torch.multinomial(kw.float() + (~has).float()[:, None], 1, generator=gen)[:, 0]
            si = 1.0 - 2.0 * x[ar, i]
            sj = 1.0 - 2.0 * x[ar, j]
            delta = (2 * si * g[ar, i] + dQ[ar, i]) + (2 * sj * g[ar, j] + dQ[ar, j]) + 2 * si * sj * Q[ar, i, j]
            u = torch.rand(R, generator=gen, dtype=delta.dtype)
            acc = has & ((delta < 0) | (u < torch.exp((-delta / T).clamp(max=0))))
            if acc.any():
                apply(ar[acc], i[acc], j[acc])
    # greedy: the best improving swap of every row until none improves; a row without one is at a
    # 2-swap local optimum and stays there (nothing else in its block changes), so only the rows that
    # just moved are looked at again
    act = ar
    scale = Q.abs().flatten(1).amax(1)
    for _ in range(4 * b):
        xa, ga, Qa = x[act], g[act], Q[act]
        sa = 1.0 - 2.0 * xa
        d = 2.0 * sa * ga + dQ[act]
        D = d[:, :, None] + d[:, None, :] + 2.0 * sa[:, :, None] * sa[:, None, :] * Qa
        ok = ((xa > 0.5) & free[act])[:, :, None] & ((xa < 0.5) & free[act])[:, None, :]
        if same is not None:
            ok &= same[act]
        best, arg = torch.where(ok, D, torch.inf).flatten(1).min(1)
        go = best < -1e-10 * scale[act]
        if not go.any():
            break
        act = act[go]
        apply(act, arg[go] // b, arg[go] % b)
    return x


def icbs(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, pattern: str = "unstructured", init: str = "sparsegpt",
         block_size: int = 64, sweeps: int = 2, candidates: float = 0.5, anneal: int = 0, update: bool = True, damp: float = 0.01,
         seed: int = 0, refit_iters: int = 30, keep: torch.Tensor | None = None, norms: torch.Tensor | None = None,
         init_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``w`` (rows, cols) given ``h`` by iCBS (module docstring); returns ``(weight, mask, info)``.
    ``init_mask`` (a valid mask of the same sparsity or pattern) replaces ``init`` as the start."""
    W0 = w.float()
    rows, cols = W0.shape
    p = nm(pattern, cols)
    H = _damped(h, damp)
    Hf = H.float()
    dead = torch.diag(h) == 0
    forced = torch.zeros_like(W0, dtype=torch.bool) if keep is None else ~keep.to(W0.device, torch.bool)
    forced |= dead[None, :]
    norms = torch.diag(h).float().clamp(min=0).sqrt() if norms is None else norms.float()
    if init_mask is not None:
        mask = init_mask.to(W0.device, torch.bool) & ~forced
    elif init == "sparsegpt":
        mask = sparsegpt(W0, h, sparsity=sparsity, pattern=pattern, damp=damp, keep=~forced).mask
    else:
        score = W0.abs() * (norms[None, :] if init == "wanda" else 1.0)
        score = torch.where(forced, -1.0, score)
        mask = mask_from_scores(score, sparsity, pattern, per_row=True) & ~forced
    gen = torch.Generator().manual_seed(seed)

    def objective(Wh):
        E = (W0 - Wh).double()
        return float(((E @ h.double()) * E).sum())

    V = refit_rows(W0, H, mask, W0, refit_iters) if update else W0.clone()
    V = torch.where(mask, V, W0)  # a pruned weight that comes back returns with its original value
    info = {"icbs_init_error": objective(V * mask)}
    swaps = 0
    for sweep in range(sweeps):
        E = W0 - V * mask
        G = E @ Hf
        blocks = _blocks(mask, forced, V, norms, sparsity, p, block_size, candidates, sweep, gen)
        for S, free, grp in blocks:
            x0 = (~mask.gather(1, S)).float()
            vS = V.gather(1, S)
            Q = vS[:, :, None] * Hf[S[:, :, None], S[:, None, :]] * vS[:, None, :]
            # (H a)_S = G_S − H_SS (v_S ∘ x_S): c = v_S ∘ G_S − Q x
            c = vS * G.gather(1, S) - torch.einsum("rij,rj->ri", Q, x0)
            x = solve_block(Q, c, x0, free, grp, anneal, gen)
            dx = x - x0
            changed = dx != 0
            if not changed.any():
                continue
            swaps += int(changed.sum()) // 2
            dE = torch.zeros_like(W0).scatter_(1, S, vS * dx)  # E = w0 − v + v∘x: pruning adds v
            G += dE @ Hf
            mask.scatter_(1, S, x < 0.5)
        if update:
            V = torch.where(mask, refit_rows(W0, H, mask, V, refit_iters), W0)
    Wh = V * mask
    info.update(icbs_error=objective(Wh), icbs_swaps=swaps, density=float(mask.float().mean()))
    return Wh, mask, info


def _blocks(mask, forced, V, norms, sparsity, p, block_size, candidates, sweep, gen):
    """This sweep's blocks: a list of ``(S (R, b) column indices, free (R, b) bool, grp (R, b) or None)``."""
    rows, cols = mask.shape
    dev = mask.device
    if p is not None:
        n, m = p
        b = max(m, -(-block_size // m) * m)
        off = (b // 2 // m) * m if sweep % 2 else 0
        starts = ([0] if off else []) + list(range(off, cols, b))
        out = []
        for k, a in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else cols
            cols_ = torch.arange(a, e, device=dev)
            S = cols_.expand(rows, -1).contiguous()
            out.append((S, ~forced[:, a:e], (cols_ // m).expand(rows, -1)))
        return out
    score = V.abs() * norms[None, :]
    n_pruned = int(round(cols * sparsity))
    n_kept = cols - n_pruned
    if n_pruned == 0 or n_kept == 0:
        return []
    n_p = max(1, int(round(candidates * n_pruned)))
    n_k = max(1, int(round(candidates * n_kept)))
    inf = torch.tensor(float("inf"), device=dev)
    # pruned candidates: the highest scores among the free pruned; kept: the lowest among the kept
    sp = torch.where(~mask & ~forced, score, -inf)
    sk = torch.where(mask, score, inf)
    P = torch.argsort(sp, dim=1, descending=True, stable=True)[:, :n_p]
    K = torch.argsort(sk, dim=1, stable=True)[:, :n_k]
    Pok = torch.isfinite(sp.gather(1, P))
    Kok = torch.isfinite(sk.gather(1, K))
    # shuffle within each row (one permutation per row)
    pp = torch.argsort(torch.rand(rows, n_p, generator=gen), dim=1)
    pk = torch.argsort(torch.rand(rows, n_k, generator=gen), dim=1)
    P, Pok = P.gather(1, pp), Pok.gather(1, pp)
    K, Kok = K.gather(1, pk), Kok.gather(1, pk)
    bp = max(1, int(round(block_size * n_pruned / cols)))
    bk = max(1, block_size - bp)
    T = max(math.ceil(n_p / bp), math.ceil(n_k / bk))
    out = []
    for t in range(T):
        ps, ks = P[:, t * bp : (t + 1) * bp], K[:, t * bk : (t + 1) * bk]
        if ps.shape[1] == 0 or ks.shape[1] == 0:
            continue
        S = torch.cat([ps, ks], 1)
        free = torch.cat([Pok[:, t * bp : (t + 1) * bp], Kok[:, t * bk : (t + 1) * bk]], 1)
        out.append((S, free, None))
    return out


def prune(state, cfg: ICBSConfig, ctx) -> None:
    """iCBS (Rosenberg et al. 2024): re-solve the mask block by block (QUBO, swap annealing) on the layer objective, refitting kept weights."""
    if state.H is None:
        raise WeightsmithError("icbs needs the calibration inputs' H = XᵀX/N")
    norms = None if state.stats.norms is None else state.stats.norms.to(state.W.device)
    W, mask, info = icbs(state.W, state.H.to(state.W.device), sparsity=cfg.sparsity, pattern=cfg.pattern, init=cfg.init,
                         block_size=cfg.block_size, sweeps=cfg.sweeps, candidates=cfg.candidates, anneal=cfg.anneal,
                         update=cfg.update, damp=cfg.damp, seed=cfg.shuffle_seed, refit_iters=cfg.refit_iters, keep=state.mask, norms=norms)
    state.add(Sparsity(mask, cfg.pattern), W, info)


register("icbs", ICBSConfig, kind="pruner", needs={"H"}, produces=("sparsity",))(prune)
