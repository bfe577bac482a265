"""Continual merging by orthogonal projection (OPCM): models arrive one at a time and are folded into
a stored state, in memory and disk that do not grow with their number.

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging" (NeurIPS 2025, arXiv:2501.09522); reference code in tanganke/fusion_bench
(``method/opcm``). What is implemented, exactly:

- The state holds the base ``θ0`` (a path and its fingerprint, not a copy), the *running update*
  ``S`` per tensor (float32: the sum of the projected task vectors so far), the number of models
  ``n``, the sum of their task-vector norms and ``λ``; the merged model is ``θ0 + S/λ``.
- The first model ``θ1``: ``S = τ1 = θ1 − θ0``, ``λ = 1`` (the merged model is ``θ1``).
- Model ``t``, task vector ``τ = θt − θ0``: per 2-D tensor that is not an embedding table (the
  linear layers, an untied LM head), with the SVD ``S = U Σ Vᵀ`` and the split rank ``r`` = the
  first index at which the cumulative share of singular values ``Σ_{j≤i} σ_j / Σ_j σ_j`` exceeds
  ``alpha``: ``P = Uᵀ τ V``; the entries ``P_ii`` (every singular direction pair) and the block
  ``P[:r, :r]`` (the dominant subspace) are zeroed; ``τ⊥ = U P Vᵀ`` — with the full SVD, which keeps
  everything of ``τ`` outside the span of ``S``'s singular vectors. Computed from the thin SVD as
  ``τ⊥ = τ − U_k (M ⊙ U_kᵀ τ V_k) V_kᵀ`` (``M`` the zeroed entries), the same matrix at O(mn)
  memory. Other tensors (1-D, embeddings): ``τ⊥ = τ``. Then ``S ← S + τ⊥``.
- Adaptive scaling: ``λ = ‖S‖ / mean_i ‖τ_i‖`` with norms over the whole model, so the merged
  task vector ``S/λ`` has the mean norm of the task vectors seen: the distance from the base stays
  that of one fine-tune, however many are folded in (the reference code's ``λ_t``).

``weightsmith merge --continual STATE_DIR NEW_MODEL [--base BASE] [--alpha A] [--out OUT]``: the
state directory is created on first use (``--base`` required then); an update writes the next
generation of ``S`` beside the current one and switches ``state.json`` to it in one atomic rename,
so an interrupted update leaves the previous state intact. ``--out`` writes ``θ0 + S/λ`` as a
Hugging Face directory. Peak memory: base, new model and ``S`` of one tensor plus its SVD.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource

log = logging.getLogger(__name__)

STATE = "state.json"
HISTORY = "history.jsonl"
FORMAT = 1
DEFAULT_ALPHA = 0.5
EMBEDDING = re.compile(r"embed|(^|\.)wte\.|(^|\.)wpe\.")
SHARD_BYTES = 2 * 2**30


def projected(key: str, t: torch.Tensor) -> bool:
    """Whether a tensor's task vectors are projected (a 2-D weight that is not an embedding table)."""
    return t.ndim == 2 and not EMBEDDING.search(key) and min(t.shape) > 1


def split_rank(s: torch.Tensor, alpha: float) -> int:
    total = float(s.sum())
    if not total > 0:
        return 0
    share = torch.cumsum(s.double(), 0) / total
    above = (share > alpha).nonzero()
    return int(above[0]) if above.numel() else 0


def orthogonal_part(tau: torch.Tensor, running: torch.Tensor, alpha: float) -> torch.Tensor:
    """``τ⊥``: ``τ`` without its components on the singular direction pairs of ``running`` and on
    its dominant ``r × r`` block (see the module docstring)."""
    u, s, vh = torch.linalg.svd(running, full_matrices=False)
    r = split_rank(s, alpha)
    p = u.T @ tau @ vh.T
    removed = torch.zeros_like(p)
    removed.diagonal().copy_(p.diagonal())
    removed[:r, :r] = p[:r, :r]
    return tau - u @ removed @ vh


def continual_merge(state_dir, new_model=None, *, base=None, alpha: float | None = None, out=None, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Fold ``new_model`` into the continual-merge state at ``state_dir`` (created with ``base`` on
    first use) and/or write the current merged model to ``out``. Returns a summary."""
    from ..api import _release_freed_memory_promptly
    from ..report import peak_rss_mb
    from ..safety import OutputLock, check_output

    t0 = time.time()
    _release_freed_memory_promptly()
    state_dir = Path(state_dir)
    if new_model is None and out is None:
        raise WeightsmithError("merge --continual: give NEW_MODEL to fold in, --out OUT to write the merged model, or both")
    if state_dir.exists() and not state_dir.is_dir():
        raise WeightsmithError(f"continual state {state_dir} exists and is not a directory")
    state = _read_state(state_dir)
    if state is None:
        if base is None:
            raise WeightsmithError(f"{state_dir} holds no continual-merge state yet: pass --base BASE to start one")
        if new_model is None:
            raise WeightsmithError(f"{state_dir} holds no continual-merge state yet: give the first model to fold in")
        a = DEFAULT_ALPHA if alpha is None else alpha
        if not 0 <= a < 1:
            raise WeightsmithError(f"--alpha must lie in [0, 1), got {a}")
        state = {"format": FORMAT, "kind": "opcm", "base": str(Path(base).resolve()), "alpha": a, "count": 0, "norm_sum": 0.0,
                 "lambda": 1.0, "generation": 0}
    else:
        if base is not None and Path(base).resolve() != Path(state["base"]):
            raise WeightsmithError(f"{state_dir} was started from the base {state['base']}, not {base}")
        if alpha is not None and alpha != state["alpha"]:
            raise WeightsmithError(f"{state_dir} merges with alpha {state['alpha']}; it cannot change (got --alpha {alpha})")
    base_path = Path(state["base"])
    inputs = [base_path] + ([Path(new_model)] if new_model is not None else [])
    for i in inputs:
        if not i.exists():
            raise WeightsmithError(f"model path {i} does not exist")
    check_output(state_dir, inputs, overwrite=True)
    if out is not None:
        check_output(out, inputs + [state_dir], overwrite=overwrite)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(state_dir)
    try:
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(CheckpointSource(base_path))
            if state["count"] and state.get("base_fingerprint") not in (None, _fp(src)):
                raise WeightsmithError(f"the base {base_path} changed since {state_dir} was started from it")
            keys = sorted(k for k in src.keys() if src.dtype(k).is_floating_point)
            running = _open_running(state_dir, state) if state["count"] else None
            if new_model is not None:
                new = stack.enter_context(CheckpointSource(new_model))
                _check_same(keys, src, new, new_model)
                state = _fold(state_dir, state, src, new, running, keys, str(new_model), progress)
                running = _open_running(state_dir, state)
            if out is not None:
                _write_merged(Path(out), overwrite, src, running, state, progress)
    finally:
        lock.release()
    mean = state["norm_sum"] / state["count"]
    return {"state": str(state_dir), "models": state["count"], "added": str(new_model) if new_model is not None else None,
            "alpha": state["alpha"], "lambda": state["lambda"], "mean_task_norm": mean, "merged_norm": state["running_norm"] / state["lambda"],
            "output": str(out) if out is not None else None, "wall_time_s": round(time.time() - t0, 2), "peak_rss_mb": peak_rss_mb()}


def _fp(src: CheckpointSource) -> str:
    from ..engine.checkpoint import digest

    fp = src.fingerprint()
    return digest({k: v for k, v in fp.items() if k != "origin"})


def _read_state(d: Path) -> dict | None:
    p = d / STATE
    if not p.is_file():
        if d.is_dir() and any(d.iterdir()):
            raise WeightsmithError(f"{d} is not empty and holds no continual-merge state ({STATE}); give a new or empty directory")
        return None
    try:
        st = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsmithError(f"{p} is corrupt") from None
    if not isinstance(st, dict) or st.get("format") != FORMAT or st.get("kind") != "opcm":
        raise WeightsmithError(f"{p} is not a weightsmith continual-merge state")
    return st


def _gen_dir(d: Path, g: int) -> Path:
    return d / f"running-{g:06d}"


def _open_running(d: Path, state: dict) -> CheckpointSource:
    g = _gen_dir(d, state["generation"])
    if not g.is_dir():
        raise WeightsmithError(f"the continual state {d} is damaged: {g.name} is missing")
    return CheckpointSource(g)


def _check_same(keys: list[str], base: CheckpointSource, new: CheckpointSource, name) -> None:
    have = {k for k in new.keys() if new.dtype(k).is_floating_point}
    if have != set(keys):
        diff = sorted(set(keys) ^ have)[0]
        raise WeightsmithError(f"{name} and the base do not have the same tensors (first difference: {diff})")
    for k in keys:
        if new.shape(k) != base.shape(k):
            raise WeightsmithError(f"tensor {k} has shape {tuple(new.shape(k))} in {name} but {tuple(base.shape(k))} in the base")


def _fold(d: Path, state: dict, base: CheckpointSource, new: CheckpointSource, running, keys: list[str], name: str,
          progress: bool) -> dict:
    from tqdm import tqdm

    from ..model.saving import ShardWriter
    from .driver import all_finite, split_shards
    from .plan import TensorPlan

    g = state["generation"] + 1
    gdir = _gen_dir(d, g)
    shutil.rmtree(gdir, ignore_errors=True)  # an interrupted update's leftovers
    gdir.mkdir()
    shutil.copy2(base.dir / "config.json", gdir / "config.json")
    plans = [TensorPlan(k, tuple(base.shape(k)), [], {}, torch.float32, torch.float32) for k in keys]
    shards = split_shards(plans, SHARD_BYTES)
    writer = ShardWriter(gdir, len(shards))
    tau_sq, run_sq, projected_n = 0.0, 0.0, 0
    bar = tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc="continual merge", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        for k, shard in enumerate(shards):
            f = writer.stream(k, [(p.key, torch.float32, p.shape) for p in shard])
            for p in shard:
                b = base.get(p.key).float()
                tau = new.get(p.key).float().sub_(b)
                del b
                if not all_finite(tau):
                    raise WeightsmithError(f"{name} has NaN/Inf values in {p.key}")
                tau_sq += float(tau.double().square().sum())
                if running is None:
                    s = tau
                else:
                    s = running.get(p.key).float()
                    if projected(p.key, s):
                        s = s.add_(orthogonal_part(tau, s, state["alpha"]))
                        projected_n += 1
                    else:
                        s = s.add_(tau)
                    del tau
                run_sq += float(s.double().square().sum())
                f.write(p.key, s)
                bar.update(p.nbytes)
                del s
            f.close()
        writer.finish()
    except BaseException:
        bar.close()
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    bar.close()
    tau_norm, run_norm = math.sqrt(tau_sq), math.sqrt(run_sq)
    count = state["count"] + 1
    norm_sum = state["norm_sum"] + tau_norm
    mean = norm_sum / count
    lam = run_norm / mean if mean > 0 else 1.0
    old = state["generation"]
    new_state = {**state, "count": count, "norm_sum": norm_sum, "lambda": lam, "running_norm": run_norm, "generation": g,
                 "base_fingerprint": state.get("base_fingerprint") or _fp(base)}
    from ..engine.checkpoint import _write_json_atomic

    _write_json_atomic(d / STATE, new_state)  # the commit point
    if running is not None:
        running.close()
    if state["count"]:
        shutil.rmtree(_gen_dir(d, old), ignore_errors=True)
    with open(d / HISTORY, "a", encoding="utf-8") as fh:  # a log of arrivals, not part of the state
        fh.write(json.dumps({"model": str(Path(name).resolve()), "index": count, "task_norm": tau_norm, "lambda": lam,
                             "projected_tensors": projected_n}) + "\n")
    log.info("folded %s into %s: %d model(s), lambda %.4f", name, d, count, lam)
    return new_state


def _write_merged(out: Path, overwrite: bool, base: CheckpointSource, running: CheckpointSource, state: dict, progress: bool) -> None:
    """``θ0 + S/λ`` (floating tensors; others from the base), in the base's dtypes, as an HF directory."""
    from ..model.saving import AtomicDir, ShardWriter
    from .driver import split_shards
    from .plan import TensorPlan

    keys = sorted(base.keys())
    plans = [TensorPlan(k, tuple(base.shape(k)), [], {}, base.dtype(k), torch.float32) for k in keys]
    shards = split_shards(plans, SHARD_BYTES)
    lam = state["lambda"]
    with AtomicDir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, len(shards))
        for k, shard in enumerate(shards):
            f = writer.stream(k, [(p.key, p.out_dtype, p.shape) for p in shard])
            for p in shard:
                w = base.get(p.key)
                if w.is_floating_point():
                    w = w.float().add_(running.get(p.key).float(), alpha=1 / lam).to(p.out_dtype)
                f.write(p.key, w)
            f.close()
        writer.finish()
        for a in base.aux_files():
            shutil.copy2(a, tmp / a.name)
        (tmp / "report.json").write_text(json.dumps({"command": "merge --continual", "method": "opcm", "base": state["base"],
                                                     "models": state["count"], "alpha": state["alpha"], "lambda": lam}, indent=2) + "\n")
