"""Model-zoo statistics of a checkpoint's matrices, read tensor by tensor.

After "A Model Zoo on Phase Transitions in Neural Networks" (Schürholt et al., 2025), which
characterises trained weights by per-layer norms, spectra and the heavy-tail exponent of the
empirical spectral density (ESD); the exponent follows WeightWatcher / Martin & Mahoney,
"Implicit Self-Regularization in Deep Neural Networks" (JMLR 2021).

Per matrix ``W`` (m × n, float64 arithmetic on float32 weights; the singular values are the square
roots of the eigenvalues of the smaller Gram matrix, accumulated slice by slice so that memory stays
one float32 copy of W plus min(m, n)² doubles), with singular values σ₁ ≥ σ₂ ≥ …:
- ``frobenius`` ‖W‖_F (exact, from the entries), ``spectral`` σ₁;
- ``stable_rank`` ‖W‖_F² / σ₁²;
- ``effective_rank`` exp(H(p)), p_i = σ_i / Σσ_j (Roy & Vetterli, "The effective rank", EUSIPCO 2007);
- ``alpha``: the power-law exponent of the tail of the eigenvalues λ_i = σ_i² of WᵀW, by the continuous
  maximum-likelihood estimator α = 1 + k / Σ_{i≤k} ln(λ_i / λ_k) over the top-k eigenvalues (the Hill
  form of the MLE), with the tail start λ_k chosen to minimise the Kolmogorov–Smirnov distance between
  the tail and the fitted law (Clauset, Shalizi & Newman, "Power-law distributions in empirical data",
  SIAM Review 2009) — what WeightWatcher does through the ``powerlaw`` package. At least
  ``MIN_TAIL`` eigenvalues are kept in the tail; ``alpha_tail`` says how many were.

Bounded cost: memory is one float32 matrix plus the Gram matrix; the Gram product costs
m·n·min(m, n) and the eigenvalues min(m, n)³. Singular values below ~1e-8·σ₁ are not resolved (the
eigenvalues of the Gram matrix carry a rounding error of ~1e-16·σ₁²): none of the statistics
depends on them. When min(m, n) > ``full_limit`` (default 4096: every matrix of a 7B-class model is
exact) the spectrum is not computed whole; the top ``rank_cap`` (default 256) singular values come
from a randomized SVD (Halko, Martinsson & Tropp 2011: ``torch.svd_lowrank`` in float32, 4 power
iterations, 10 oversampling columns). σ₁ and the stable rank are then those of the top values (σ₁
to the randomized accuracy: 0.7 % low on a 2048 × 5632 Gaussian matrix, whose flat spectrum is the
worst case), α is fitted on the top ``rank_cap`` eigenvalues only (the tail start is searched among
them), and the effective rank spreads the unexplained energy ‖W‖_F² − Σ_top σ_i² evenly over the
remaining min(m, n) − rank_cap values (an estimate; ``method`` says ``randomized:256``). ‖W‖_F is
always exact. Measured on one core, a 2048 × 5632 matrix: 3.6 s in full, 2.5 s randomized; 576 × 1536
(SmolLM2-135M's MLP) 0.2 s.
"""
from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..validate import compile_regex

MIN_TAIL = 10
FULL_LIMIT = 4096
RANK_CAP = 256
STATS = ("frobenius", "spectral", "stable_rank", "effective_rank", "alpha")
_INTEGER = ("I64", "I32", "I16", "I8", "U8", "BOOL")
_LAYER_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


CHUNK_BYTES = 64 * 2**20


def gram(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of ``w`` in float64, accumulated over slices of at most ``CHUNK_BYTES``
    so that no float64 copy of ``w`` is made: (W Wᵀ, True) when rows ≤ columns, else (Wᵀ W, False)."""
    m, n = w.shape
    rows = m <= n
    r, long = (m, n) if rows else (n, m)
    step = max(1, CHUNK_BYTES // (8 * r))
    g = torch.zeros(r, r, dtype=torch.float64)
    for j in range(0, long, step):
        c = (w[:, j : j + step] if rows else w[j : j + step].T).to(torch.float64)  # r × step
        g.addmm_(c, c.T)
    return g, rows


def singular_values(w: torch.Tensor, full_limit: int = FULL_LIMIT, rank_cap: int = RANK_CAP, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Descending singular values of ``w`` (float64): all of them (square roots of the eigenvalues of
    the smaller Gram matrix, ``gram``), or the top ``rank_cap`` by a randomized SVD when
    min(shape) > ``full_limit``. Returns (values, method)."""
    w = w.detach()
    r = min(w.shape)
    if r <= full_limit or rank_cap >= r:
        ev = torch.linalg.eigvalsh(gram(w)[0])
        return torch.flip(ev.clamp_min(0), [0]).sqrt(), "full"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, _ = torch.svd_lowrank(w.float(), q=min(rank_cap + 10, r), niter=4)  # float32: half the time, σ to ~1e-6
    return s[:rank_cap].double(), f"randomized:{rank_cap}"


def sum_squares(w: torch.Tensor) -> float:
    """‖W‖_F² in float64, slice by slice."""
    flat = w.detach().reshape(-1)
    step = CHUNK_BYTES // 8
    return float(sum(flat[i : i + step].to(torch.float64).square().sum() for i in range(0, flat.numel(), step)))


def powerlaw_alpha(eigs: torch.Tensor, min_tail: int = MIN_TAIL) -> tuple[float | None, int, float | None]:
    """(α, tail size k, KS distance) of the continuous power law fitted to the largest eigenvalues
    (see the module docstring); (None, 0, None) when fewer than ``min_tail`` positive eigenvalues."""
    x = torch.sort(eigs.to(torch.float64)[eigs > 0], descending=True).values
    n = x.numel()
    if n < min_tail:
        return None, 0, None
    logx = torch.log(x)
    csum = torch.cumsum(logx, 0)  # Σ_{i≤k} ln λ_i
    best = (math.inf, None, 0)
    for k in range(min_tail, n + 1):
        xmin_log = logx[k - 1]
        denom = csum[k - 1] - k * xmin_log
        if denom <= 0:
            continue
        a = 1.0 + k / float(denom)
        tail = torch.flip(x[:k], [0])  # ascending
        fit = 1.0 - torch.exp((1.0 - a) * (torch.log(tail) - xmin_log))  # CDF of the fitted law
        emp_hi = torch.arange(1, k + 1, dtype=torch.float64) / k
        emp_lo = torch.arange(0, k, dtype=torch.float64) / k
        d = float(torch.maximum((emp_hi - fit).abs(), (fit - emp_lo).abs()).max())
        if d < best[0]:
            best = (d, a, k)
    if best[1] is None:
        return None, 0, None
    return best[1], best[2], best[0]


def matrix_stats(w: torch.Tensor, full_limit: int = FULL_LIMIT, rank_cap: int = RANK_CAP) -> dict:
    """The statistics of one matrix (module docstring)."""
    w = w.detach()
    fro2 = sum_squares(w)
    s, method = singular_values(w, full_limit, rank_cap)
    r = min(w.shape)
    s1 = float(s[0]) if s.numel() else 0.0
    out = {"shape": list(w.shape), "method": method, "frobenius": math.sqrt(fro2), "spectral": s1,
           "stable_rank": fro2 / (s1 * s1) if s1 > 0 else 0.0}
    if s1 <= 0:
        out.update(effective_rank=0.0, alpha=None, alpha_tail=0, alpha_ks=None)
        return out
    p = s.clone()
    rest = r - s.numel()
    if rest > 0:  # randomized: the unexplained energy spread evenly over the missing values
        left = max(fro2 - float((s * s).sum()), 0.0)
        p = torch.cat([p, torch.full((rest,), math.sqrt(left / rest), dtype=torch.float64)])
    p = p[p > 0] / p.sum()
    out["effective_rank"] = math.exp(float(-(p * torch.log(p)).sum()))
    a, k, ks = powerlaw_alpha(s * s)
    out.update(alpha=a, alpha_tail=k, alpha_ks=ks)
    return out


def layer_type(name: str) -> str:
    """The name with its block index removed: ``model.layers.3.mlp.down_proj.weight`` → ``mlp.down_proj``."""
    n = name[: -len(".weight")] if name.endswith(".weight") else name
    m = list(_LAYER_INDEX.finditer(n))
    if m:
        n = n[m[-1].end():] or n
    return n


def weight_stats(model: str | Path, full_limit: int = FULL_LIMIT, rank_cap: int = RANK_CAP, match: str | None = None,
                 progress: bool = False) -> dict:
    """Statistics of every 2-D floating matrix of ``model`` (any format ``inspect`` reads, dequantized),
    one tensor in memory at a time, and their per-layer-type summary (mean, median, min, max)."""
    from ..export.readers import open_checkpoint

    if full_limit < 1 or rank_cap < 1:
        raise WeightsmithError("--full-limit and --rank-cap must be positive")
    pat = None if match is None else compile_regex(match, "--match")
    view = open_checkpoint(model)
    rows = []
    with view:
        infos = [i.as_dict() for i in view.tensors()]
        names = [r["name"] for r in infos if len(r["shape"]) == 2 and (pat is None or pat.search(r["name"]))
                 and not (r["scheme"] == "float" and r["dtype"] in _INTEGER)]
        it = names
        if progress:
            from tqdm import tqdm

            it = tqdm(names, desc="spectra", unit="matrix")
        for name in it:
            w = view.weight(name)
            if not w.is_floating_point() or min(w.shape) == 0:
                continue
            rows.append({"name": name, "type": layer_type(name), **matrix_stats(w, full_limit, rank_cap)})
            del w
    if not rows:
        raise WeightsmithError(f"{model}: no matrices" + (f" match {match!r}" if match else ""))
    return {"model": str(model), "full_limit": full_limit, "rank_cap": rank_cap,
            "alpha_estimator": "continuous MLE (Hill form) over the top-k eigenvalues of WᵀW, k by minimum KS distance",
            "matrices": rows, "by_type": summarize(rows)}


def block_index(name: str) -> int | None:
    """The block number of a matrix inside a numbered block (``model.layers.3.…`` → 3), else None."""
    m = list(_LAYER_INDEX.finditer(name[: -len(".weight")] if name.endswith(".weight") else name))
    return int(m[-1].group(0).strip(".")) if m else None


def family_stats(models: list[str | Path], **kw) -> dict:
    """:func:`weight_stats` of each model (read one after the other), side by side."""
    if not models:
        raise WeightsmithError("no model given")
    return {"models": [weight_stats(m, **kw) for m in models]}


def plot(res: dict, path: str | Path) -> str | None:
    """Per block, the mean of each statistic over the block's matrices, one line per model; a PNG at
    ``path``. None (no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = res["models"] if "models" in res else [res]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for ax, key, label in zip(axes.flat, ("alpha", "effective_rank", "stable_rank", "spectral"),
                              ("α (power-law exponent of the ESD)", "effective rank", "stable rank", "spectral norm σ₁")):
        for run in runs:
            per: dict[int, list[float]] = {}
            for r in run["matrices"]:
                b = block_index(r["name"])
                if b is not None and r.get(key) is not None:
                    per.setdefault(b, []).append(r[key])
            xs = sorted(per)
            ax.plot(xs, [statistics.fmean(per[x]) for x in xs], "o-", ms=3, label=Path(run["model"]).name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix or '.png'}"  # complete or absent
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return str(path)


def format_family_markdown(res: dict) -> str:
    lines = ["# Weight statistics of a model family (mean per layer type)", "",
             "| model | layer type | matrices | ‖W‖_F | σ₁ | stable rank | effective rank | α (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in res["models"]:
        for t, d in run["by_type"].items():
            def m(k, key="mean"):
                return _f(d[k][key]) if d[k] else "–"
            lines.append(f"| {run['model']} | {t} | {d['matrices']} | {m('frobenius')} | {m('spectral')} | {m('stable_rank')} | "
                         f"{m('effective_rank')} | {m('alpha', 'median')} |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for t in sorted({r["type"] for r in rows}):
        sel = [r for r in rows if r["type"] == t]
        d = {"matrices": len(sel)}
        for k in STATS:
            v = [r[k] for r in sel if r.get(k) is not None]
            d[k] = {"mean": statistics.fmean(v), "median": statistics.median(v), "min": min(v), "max": max(v)} if v else None
        out[t] = d
    return out


def _f(x, spec=".4g") -> str:
    return "–" if x is None else format(x, spec)


def format_markdown(res: dict) -> str:
    lines = [f"# Weight statistics: {res['model']}", "",
             f"α: {res['alpha_estimator']}; spectra in full up to min(m, n) = {res['full_limit']}, "
             f"beyond that the top {res['rank_cap']} singular values by randomized SVD.", "",
             "## By layer type (mean; median α)", "",
             "| layer type | matrices | ‖W‖_F | σ₁ | stable rank | effective rank | α (mean) | α (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t, d in res["by_type"].items():
        def m(k, key="mean"):
            return _f(d[k][key]) if d[k] else "–"
        lines.append(f"| {t} | {d['matrices']} | {m('frobenius')} | {m('spectral')} | {m('stable_rank')} | {m('effective_rank')} | "
                     f"{m('alpha')} | {m('alpha', 'median')} |")
    lines += ["", "## Matrices", "", "| matrix | shape | ‖W‖_F | σ₁ | stable rank | effective rank | α | tail | method |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["matrices"]:
        lines.append(f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {_f(r['frobenius'])} | {_f(r['spectral'])} | "
                     f"{_f(r['stable_rank'])} | {_f(r['effective_rank'])} | {_f(r['alpha'], '.3f')} | {r['alpha_tail']} | {r['method']} |")
    return "\n".join(lines)
