"""``weightsmith align A B OUT``: permute B's hidden units to match A's, without changing B's function.

Weight matching from "Git Re-Basin: Merging Models modulo Permutation Symmetries" (Ainsworth, Hayase &
Srinivasa, ICLR 2023, Algorithm 1), as analysed for linear mode connectivity in "Analysis of Linear
Mode Connectivity via Permutation-Based Weight Matching" (Ito, Yamada & Kumagai, 2024): find the
permutations π of B's units that maximise Σ_tensors ⟨W_A, π(W_B)⟩, by coordinate descent — each
permutation in turn (a seeded random order per sweep) is the solution of a linear assignment problem
with the others held fixed (``lap.py``), until a sweep improves nothing.

For Llama-style decoders (llama, mistral, qwen2: RMSNorm, rotary attention with GQA, gated MLP), the
permutations are:
- per block, the MLP's hidden units: rows of ``gate_proj`` / ``up_proj`` (and their biases), columns
  of ``down_proj``;
- per block, the attention heads as whole units (each head's rows keep their order, so its rotary
  layout is untouched): a permutation of the key/value heads (rows of ``k_proj`` / ``v_proj``) and one
  of the query heads (rows of ``q_proj``, columns of ``o_proj``) that maps the n_heads / n_kv_heads
  query heads reading a kv head onto those reading its image, so grouped-query attention stays
  consistent. The pair is solved jointly: for every (kv head of A, kv head of B) the best assignment
  of their query heads is a small assignment problem, and the kv heads are then assigned on the
  sum of the k/v similarity and that best query-head value;
- with ``residual=True`` (the default), one permutation of the residual stream for the whole model:
  columns of the embedding (and of an untied ``lm_head``), every norm weight, the input columns of
  q/k/v/gate/up and the output rows (and biases) of o/down. It is exact: RMSNorm's scale
  ‖x‖/√d does not depend on the order of x's entries, and the norm's elementwise weight moves with it.
A permutation only reorders values, so B' computes B's function (up to float summation order).
Both models are held in memory (float32) while matching; the output is written atomically. Any
tensor outside this list is refused by name (QK-norm weights, which act within a head, are kept).
"""
from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource
from .lap import linear_sum_assignment

ARCHS = ("llama", "mistral", "qwen2")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class PermSpec:
    """Permutations (name → size) and, per tensor, the axes they act on: (axis, perm, unit size)."""
    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    # coupled attention permutations: name → (query-head perm, kv-head perm, query heads per kv head)
    heads: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    def add(self, key: str, axis: int, perm: str, unit: int) -> None:
        self.axes.setdefault(key, []).append((axis, perm, unit))


def llama_spec(config: dict, keys: list[str], shapes: dict[str, tuple], residual: bool = True) -> PermSpec:
    """The permutation structure of a Llama-style checkpoint (module docstring); refuses other tensors."""
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise WeightsmithError(f"align handles Llama-style decoders ({', '.join(ARCHS)}); this model is {mt!r}")
    try:
        d = int(config["hidden_size"])
        nh = int(config["num_attention_heads"])
        nkv = int(config.get("num_key_value_heads") or nh)
        n_layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsmithError(f"config.json lacks a usable {e}") from None
    hd = int(config.get("head_dim") or d // nh)
    if nh % nkv:
        raise WeightsmithError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    rep = nh // nkv
    spec = PermSpec()
    if residual:
        spec.sizes["residual"] = d
    inter = None
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    for k in keys:
        shape = shapes[k]
        if k == "model.embed_tokens.weight" or k == "lm_head.weight":
            if residual:
                spec.add(k, 1, "residual", 1)
            continue
        if k == "model.norm.weight":
            if residual:
                spec.add(k, 0, "residual", 1)
            continue
        m = layer_re.match(k)
        if not m or int(m.group(1)) >= n_layers:
            raise WeightsmithError(f"align: tensor {k} is not part of a Llama-style model it knows how to permute")
        i, rest = int(m.group(1)), m.group(2)
        qh, kvh, mlp = f"q.{i}", f"kv.{i}", f"mlp.{i}"
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            if residual:
                spec.add(k, 0, "residual", 1)
            continue
        if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            continue  # within a head: unchanged by moving whole heads
        parts = rest.split(".")
        if len(parts) != 3 or parts[2] not in ("weight", "bias"):
            raise WeightsmithError(f"align: tensor {k} is not part of a Llama-style model it knows how to permute")
        mod, proj, kind = parts
        spec.sizes.setdefault(qh, nh)
        spec.sizes.setdefault(kvh, nkv)
        spec.heads[f"heads.{i}"] = (qh, kvh, rep)
        if mod == "self_attn" and proj in ATTN:
            perm = qh if proj in ("q_proj", "o_proj") else kvh
            if proj == "o_proj":
                if kind == "weight":
                    spec.add(k, 1, perm, hd)
                if residual:
                    spec.add(k, 0, "residual", 1)
            else:
                spec.add(k, 0, perm, hd)
                if kind == "weight" and residual:
                    spec.add(k, 1, "residual", 1)
        elif mod == "mlp" and proj in MLP:
            if proj == "down_proj":
                if kind == "weight":
                    spec.add(k, 1, mlp, 1)
                    inter = shape[1]
                if residual:
                    spec.add(k, 0, "residual", 1)
            else:
                spec.add(k, 0, mlp, 1)
                if kind == "weight":
                    inter = shape[0]
                    if residual:
                        spec.add(k, 1, "residual", 1)
            spec.sizes[mlp] = inter if inter is not None else shape[0]
        else:
            raise WeightsmithError(f"align: tensor {k} is not part of a Llama-style model it knows how to permute")
    for k, axes in spec.axes.items():  # every permuted axis must hold size × unit entries
        for axis, p, unit in axes:
            if shapes[k][axis] != spec.sizes[p] * unit:
                raise WeightsmithError(f"align: {k} has {shapes[k][axis]} entries on axis {axis}, but {p} has "
                                       f"{spec.sizes[p]} units of {unit} (config and weights disagree)")
    return spec


def _index(perm: torch.Tensor, unit: int) -> torch.Tensor:
    return (perm[:, None] * unit + torch.arange(unit)).reshape(-1)


def permute_tensor(t: torch.Tensor, axes, perms: dict[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
    for axis, p, unit in axes:
        if p != skip:
            t = t.index_select(axis, _index(perms[p], unit))
    return t


def apply_permutations(sd: dict[str, torch.Tensor], spec: PermSpec, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B' with B'[unit i] = B[unit perms[p][i]] on every permuted axis (exact: values are only moved)."""
    return {k: permute_tensor(v, spec.axes.get(k, []), perms) for k, v in sd.items()}


def _similarity(p: str, spec: PermSpec, a: dict, b: dict, perms: dict) -> torch.Tensor:
    n = spec.sizes[p]
    s = torch.zeros(n, n, dtype=torch.float64)
    for k, axes in spec.axes.items():
        for axis, q, unit in axes:
            if q != p:
                continue
            bk = permute_tensor(b[k], axes, perms, skip=p).to(torch.float64)
            am = a[k].to(torch.float64).movedim(axis, 0).reshape(n, -1)
            bm = bk.movedim(axis, 0).reshape(n, -1)
            s += am @ bm.T
    return s


def _match_heads(names: tuple[str, str, int], spec: PermSpec, a: dict, b: dict, perms: dict) -> float:
    """The kv-head and query-head permutations of one attention block, jointly optimal with the
    other permutations fixed (module docstring). Updates ``perms``; returns the gain."""
    qn, kvn, rep = names
    sq = _similarity(qn, spec, a, b, perms).numpy()  # query heads of A × query heads of B
    skv = _similarity(kvn, spec, a, b, perms).numpy()
    g = skv.shape[0]
    best = np.zeros((g, g))
    sub = {}
    for i in range(g):
        for j in range(g):
            blk = sq[i * rep : (i + 1) * rep, j * rep : (j + 1) * rep]
            sub[i, j] = linear_sum_assignment(blk, maximize=True)
            best[i, j] = skv[i, j] + blk[np.arange(rep), sub[i, j]].sum()
    kv = linear_sum_assignment(best, maximize=True)
    q = np.concatenate([kv[i] * rep + sub[i, int(kv[i])] for i in range(g)])
    old_q, old_kv = perms[qn].numpy(), perms[kvn].numpy()
    old = float(skv[np.arange(g), old_kv].sum() + sq[np.arange(len(old_q)), old_q].sum())
    new = float(best[np.arange(g), kv].sum())
    if new - old > 1e-12 * max(abs(old), 1.0):
        perms[qn], perms[kvn] = torch.from_numpy(q.astype(np.int64)), torch.from_numpy(kv.astype(np.int64))
        return new - old
    return 0.0


def objective(a: dict, b: dict) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def weight_matching(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermSpec, *, max_iter: int = 100,
                    seed: int = 0, restarts: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """Coordinate descent over the permutations (module docstring), from ``restarts`` seeded orders
    (seed, seed + 1, …): the run with the largest Σ⟨A, π(B)⟩ is kept. Returns (perms, info)."""
    if restarts < 1:
        raise WeightsmithError(f"--restarts must be at least 1, got {restarts}")
    runs = [_descent(a, b, spec, max_iter, seed + r) for r in range(restarts)]
    perms, info = max(runs, key=lambda x: x[1]["objective_after"])
    info = {**info, "restarts": restarts, "objectives": [x[1]["objective_after"] for x in runs]}
    return perms, info


def _descent(a: dict, b: dict, spec: PermSpec, max_iter: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    rng = random.Random(seed)
    coupled = {p for q, kv, _ in spec.heads.values() for p in (q, kv)}
    steps = sorted(p for p in spec.sizes if p not in coupled) + sorted(spec.heads)
    before = objective(a, b)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        gain = 0.0
        order = steps[:]
        rng.shuffle(order)
        for p in order:
            if p in spec.heads:
                gain += _match_heads(spec.heads[p], spec, a, b, perms)
                continue
            s = _similarity(p, spec, a, b, perms).numpy()
            old = perms[p].numpy()
            new = linear_sum_assignment(s, maximize=True)
            n = np.arange(len(new))
            delta = float(s[n, new].sum() - s[n, old].sum())
            if delta > 1e-12 * max(abs(float(s[n, old].sum())), 1.0):
                perms[p] = torch.from_numpy(new.astype(np.int64))
                gain += delta
        if gain <= 0.0:
            break
    after = objective(a, apply_permutations(b, spec, perms))
    moved = {p: int((perms[p] != torch.arange(len(perms[p]))).sum()) for p in sorted(spec.sizes)}
    return perms, {"objective_before": before, "objective_after": after, "sweeps": sweeps, "units_moved": moved, "seed": seed}


def _load(src: CheckpointSource) -> dict[str, torch.Tensor]:
    return {k: src.get(k) for k in src.keys()}


def align(a: str | Path, b: str | Path, out: str | Path, *, residual: bool = True, max_iter: int = 100, seed: int = 0,
          restarts: int = 1, overwrite: bool = False) -> dict:
    """Write B permuted to match A into ``out`` (B's config and tokenizer, ``align.json``)."""
    from ..model.saving import AtomicDir, save_tensors
    from ..safety import check_output
    from ..validate import dumps

    if max_iter < 1 or restarts < 1:
        raise WeightsmithError(f"--max-iter and --restarts must be at least 1, got {max_iter} and {restarts}")
    check_output(out, [a, b], overwrite=overwrite)
    with CheckpointSource(a) as sa, CheckpointSource(b) as sb:
        if sorted(sa.keys()) != sorted(sb.keys()):
            diff = sorted(set(sa.keys()) ^ set(sb.keys()))
            raise WeightsmithError(f"{a} and {b} have different tensors ({diff[0]} is in only one); align needs one architecture")
        for k in sa.keys():
            if sa.shape(k) != sb.shape(k):
                raise WeightsmithError(f"{k}: shape {tuple(sa.shape(k))} in {a} but {tuple(sb.shape(k))} in {b}")
        cfg_a, cfg_b = sa.config_dict, sb.config_dict
        for f in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim"):
            if cfg_a.get(f) != cfg_b.get(f):
                raise WeightsmithError(f"config {f} is {cfg_a.get(f)!r} in {a} but {cfg_b.get(f)!r} in {b}")
        keys = sb.keys()
        spec = llama_spec(cfg_b, keys, {k: tuple(sb.shape(k)) for k in keys}, residual=residual)
        with AtomicDir(out, overwrite) as tmp:  # the lock from here on, before the long work
            wa, wb = _load(sa), _load(sb)
            perms, info = weight_matching({k: v.float() for k, v in wa.items()}, {k: v.float() for k, v in wb.items()}, spec,
                                          max_iter=max_iter, seed=seed, restarts=restarts)
            del wa
            save_tensors(apply_permutations(wb, spec, perms), tmp / "model.safetensors", metadata={"format": "pt"})
            for f in sb.aux_files():
                shutil.copy2(f, tmp / f.name)
            rep = {"command": "align", "a": str(a), "b": str(b), "residual": residual, **info,
                   "permutations": {p: v.tolist() for p, v in perms.items()}}
            (tmp / "align.json").write_text(dumps(rep) + "\n")
    rep["output"] = str(out)
    rep.pop("permutations")
    return rep


__all__ = ["align", "weight_matching", "llama_spec", "apply_permutations", "PermSpec"]
