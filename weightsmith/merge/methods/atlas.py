"""``merge_method: atlas`` — task vectors scaled by coefficients learned per tensor and per task.

Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling"
(NeurIPS 2024, arXiv:2407.02880); the fit is ``merge/atlas.py``.

Configuration (mergekit-style YAML)::

    merge_method: atlas
    base_model: base
    models:
      - model: python-ft
        parameters: {calibration: python.txt}   # this task's calibration text (file, .jsonl or directory)
      - model: c-ft
        parameters: {calibration: c.txt}
    parameters: {steps: 100, lr: 0.05, windows: 8, seqlen: 128}

The seed (``weightsmith merge --seed``, ``merge(seed=)``) cuts the calibration windows; with it the
coefficients are deterministic. Every fit parameter is one value for the whole model (no per-tensor
filters or gradients). The fit needs the base and every task vector in memory (float32): models of
more than :data:`MAX_PARAMS` parameters are refused unless ``allow_large: true``. The coefficients
and each task's loss before / after go into ``report.json`` (``fit``). Written tensor by tensor
afterwards: ``θ = θ_base + Σ_t λ_{t,tensor} (θ_t − θ_base)``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ...errors import WeightsmithError
from ..registry import Method, Param, TensorJob, register

log = logging.getLogger(__name__)

MAX_PARAMS = 1_000_000_000  # above: refused without allow_large (the fit holds (tasks + 3) float32 copies)
FIT_PARAMS = ("steps", "lr", "init", "windows", "seqlen", "device", "allow_large")


def apply(job: TensorJob) -> torch.Tensor:
    coef = job.context["coefficients"][job.key]
    base = job.base.load()
    out = base.clone()
    for inp in job.non_base:
        out.add_(inp.load().sub_(base), alpha=coef[job.context["models"].index(inp.model)])
    return out


def _uniform(plan, name: str, per_model: bool):
    """The value every tensor resolved for a fit parameter (refused when it varies per tensor)."""
    seen = {}
    for tp in plan.tensors:
        if tp.copy:
            continue
        vals = [(plan.models[i.model], i.params[name]) for i in tp.inputs if not i.is_base] if per_model else [(None, tp.params[name])]
        for who, v in vals:
            if seen.setdefault(who, v) != v:
                where = f" of model {who!r}" if who else ""
                raise WeightsmithError(f"atlas: {name}{where} must be one value for the whole model (it is fitted once), "
                                       f"got {seen[who]!r} and {v!r}; give it without filters or gradients")
    return seen


def _calibration_path(cfg, name: str) -> Path:
    p = Path(name).expanduser()
    for c in ([p] if p.is_absolute() else [p] + ([Path(cfg.root) / p] if cfg.root else [])):
        if c.exists():
            return c
    raise WeightsmithError(f"atlas: calibration {name!r} not found (looked from the current directory and the config's)")


def prepare(cfg, plan, sources, seed: int, progress: bool):
    """Fit the coefficients (``merge/atlas.py``): load the base, the task vectors and each task's windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...calib.sources import check_vocab, read_calibration_text, tokenize_text
    from ...calib.windows import sample_windows
    from ...safety import from_pretrained
    from ...validate import check_device
    from ..atlas import fit_coefficients
    from ..driver import all_finite

    base_name = next(plan.models[i.model] for i in plan.tensors[0].inputs if i.is_base)
    tasks = [plan.models[i.model] for i in plan.tensors[0].inputs if not i.is_base]
    if not tasks:
        raise WeightsmithError("atlas: give at least one fine-tuned model besides the base")
    if any([plan.models[i.model] for i in tp.inputs] != [plan.models[i.model] for i in plan.tensors[0].inputs] for tp in plan.tensors
           if not tp.copy):
        raise WeightsmithError("atlas: every tensor must take the same models (slices with other sources are not supported)")
    shared = {n: _uniform(plan, n, False)[None] for n in FIT_PARAMS}
    calib = _uniform(plan, "calibration", True)
    n_params = sum(int(torch.Size(tp.shape).numel()) for tp in plan.tensors if not tp.copy)
    if n_params > MAX_PARAMS and not shared["allow_large"]:
        gb = (len(tasks) + 3) * 4 * n_params / 1e9
        raise WeightsmithError(f"atlas: the model has {n_params / 1e9:.2f} B parameters; the fit holds the base and {len(tasks)} task "
                               f"vector(s) in float32 (about {gb:.0f} GB), above the {MAX_PARAMS / 1e9:.0f} B limit: set "
                               "parameters: {allow_large: true} to run it anyway")
    if shared["steps"] < 0 or shared["windows"] < 1 or shared["seqlen"] < 2 or not shared["lr"] > 0:
        raise WeightsmithError(f"atlas: steps ≥ 0, windows ≥ 1, seqlen ≥ 2 and lr > 0 are needed, got steps {shared['steps']}, "
                               f"windows {shared['windows']}, seqlen {shared['seqlen']}, lr {shared['lr']}")
    dev = check_device(shared["device"])
    base_src = sources[base_name]
    tok = from_pretrained(AutoTokenizer, base_src.dir)
    windows, calib_paths = [], []
    for t in tasks:
        path = _calibration_path(cfg, calib[t])
        ids = tokenize_text(tok, read_calibration_text(path))
        windows.append(sample_windows(ids, shared["windows"], shared["seqlen"], seed).to(dev))
        calib_paths.append(str(path))
    model = from_pretrained(AutoModelForCausalLM, base_src.dir, dtype=torch.float32).to(dev)
    check_vocab(torch.cat([w.reshape(-1) for w in windows]), model.get_input_embeddings().weight.shape[0])

    params = dict(model.named_parameters())
    alias = {}  # checkpoint key -> the parameter it is (a tied head saved under its own name: the embedding's)
    by_ptr = {p.data_ptr(): n for n, p in params.items()}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.data_ptr() in by_ptr:
            alias[k] = by_ptr[v.data_ptr()]
    keys = [tp.key for tp in plan.tensors if not tp.copy]
    unknown = [k for k in keys if k not in alias]
    if unknown:
        raise WeightsmithError(f"atlas: tensor {unknown[0]} of {base_name!r} is not a parameter of the model transformers builds "
                               "from its config; aTLAS needs every tensor to be a model parameter")
    taus = {}
    for k in keys:
        n = alias[k]
        if n in taus:
            continue
        b = params[n].detach()
        stack = torch.empty((len(tasks), *b.shape), dtype=torch.float32, device=dev)
        for j, t in enumerate(tasks):
            x = sources[t].get(k).float()
            if not all_finite(x):
                raise WeightsmithError(f"model {t!r} has NaN/Inf values in {k}: it cannot be merged")
            stack[j] = x.to(dev).sub_(b)
        taus[n] = stack
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=shared["steps"], desc="atlas fit", file=sys.stderr, leave=False)
    fit = fit_coefficients(model, taus, windows, steps=shared["steps"], lr=shared["lr"], init=shared["init"],
                           progress=(lambda s, v: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    col = {n: b for b, n in enumerate(taus)}
    coefficients = {k: [float(x) for x in fit.coef[:, col[alias[k]]]] for k in keys}
    del taus, model
    log.info("atlas: objective %.4f -> %.4f over %d steps", sum(fit.loss_before) / len(tasks), sum(fit.loss_after) / len(tasks),
             shared["steps"])
    report = {
        "method": "atlas", "parameters": n_params, "blocks": len(col), "seed": seed,
        **{n: shared[n] for n in ("steps", "lr", "init", "windows", "seqlen")},
        "tasks": [{"model": t, "calibration": c, "loss_before": lb, "loss_after": la}
                  for t, c, lb, la in zip(tasks, calib_paths, fit.loss_before, fit.loss_after)],
        "objective_before": sum(fit.loss_before) / len(tasks), "objective_after": sum(fit.loss_after) / len(tasks),
        "best_step": fit.best_step, "objective_per_step": fit.objective, "coefficients": coefficients,
    }
    return {"models": tasks, "coefficients": coefficients}, report


register(Method(
    name="atlas", fn=apply, base="required", min_inputs=2, seeded=True, prepare=prepare,
    params=(
        Param("calibration", str, "non_base", help="this task's calibration text: a file, a .jsonl (text field) or a directory"),
        Param("steps", int, "shared", 100, "Adam steps on the coefficients"),
        Param("lr", float, "shared", 0.05, "Adam's learning rate"),
        Param("init", float, "shared", 0.0, "the coefficients' starting value (0: the base)"),
        Param("windows", int, "shared", 8, "calibration windows per task"),
        Param("seqlen", int, "shared", 128, "tokens per window"),
        Param("device", str, "shared", "cpu", "where the fit runs: cpu or cuda[:N]"),
        Param("allow_large", bool, "shared", False, f"fit models above {MAX_PARAMS / 1e9:.0f} B parameters (memory: (tasks + 3) float32 copies)"),
    ),
    reference="Zhang et al. 2024, Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (arXiv:2407.02880)",
    description="base + Σ_t Σ_tensor λ_{t,tensor} · task vector, λ fitted by Adam on each task's next-token loss",
))
