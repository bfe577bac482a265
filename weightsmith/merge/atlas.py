"""aTLAS: task vectors combined with one learned coefficient per parameter block per task.

Zhang, Albert, Rodriguez-Opazo, van den Hengel, Abbasnejad 2024, "Knowledge Composition using Task
Vectors with Learned Anisotropic Scaling" (NeurIPS 2024, arXiv:2407.02880). What is implemented:

- ``θ(Λ) = θ_base + Σ_t Σ_b λ_{t,b} τ_{t,b}`` with ``τ_t = θ_t − θ_base`` and a *block* ``b`` = one
  parameter tensor of the model (every weight matrix, norm vector, embedding table; a tied LM head is
  the embedding's block). ``Λ`` (tasks × blocks) starts at ``init`` (0: the base, as the reference
  code's ``torch.zeros`` coefficients).
- Objective: the mean over tasks of each task's mean next-token cross-entropy on its own calibration
  windows (a few windows per task, cut once with the seed), full batch every step; Adam on ``Λ`` only
  — the base and the task vectors are frozen tensors, the forward runs through
  ``torch.func.functional_call`` with the merged tensors, so no copy of the model is made per step.
  The gradient of ``λ_{t,b}`` is ``⟨∂L/∂θ_b, τ_{t,b}⟩``.
- The coefficients kept are those of the lowest objective evaluated (each step's, and the last
  update's), so the fitted model is never worse on the calibration objective than ``init``.

Memory: the base, every task vector (float32) and one merged copy with its gradient are resident —
about ``(T + 3) · 4`` bytes per parameter plus the activations of one task's windows; unlike the
streamed merges this is a whole-model method (the merged checkpoint itself is then written tensor by
tensor by the merge driver). This module has no I/O: ``methods/atlas.py`` loads and writes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call


@dataclass
class Fit:
    coef: torch.Tensor  # (tasks, blocks) float32, the coefficients kept
    loss_before: list[float]  # per task, at ``init``
    loss_after: list[float]  # per task, at ``coef``
    objective: list[float]  # the objective evaluated at each step (before its update)
    best_step: int  # the step whose coefficients were kept (``steps``: after the last update)


def task_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` with ``params`` on the windows ``ids`` (n, seqlen)."""
    logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def merged_params(base: dict[str, torch.Tensor], taus: dict[str, torch.Tensor], names: list[str],
                  coef: torch.Tensor) -> dict[str, torch.Tensor]:
    """``θ_b + Σ_t coef[t, b] τ_{t,b}`` for every block ``b`` (``taus[name]``: the task vectors stacked, (T, *shape))."""
    out = {}
    for b, n in enumerate(names):
        tau = taus[n]
        out[n] = base[n] + torch.tensordot(coef[:, b], tau, dims=1)
    return out


def fit_coefficients(model: torch.nn.Module, taus: dict[str, torch.Tensor], windows: list[torch.Tensor], *, steps: int,
                     lr: float, init: float, progress=None) -> Fit:
    """Fit ``Λ`` (module docstring). ``model``: the base, whose parameters are the frozen ``θ_base``;
    ``taus``: per parameter name the stacked task vectors (T, *shape), float32 on the model's device;
    ``windows[t]``: task ``t``'s token windows. ``progress``: a callable(step, objective) or None."""
    names = list(taus)
    base = {n: p.detach() for n, p in model.named_parameters() if n in taus}
    for p in model.parameters():
        p.requires_grad_(False)
    n_tasks = len(windows)
    dev = next(iter(base.values())).device
    coef = torch.full((n_tasks, len(names)), float(init), dtype=torch.float32, device=dev, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=lr)

    def losses(c: torch.Tensor) -> list[torch.Tensor]:
        params = merged_params(base, taus, names, c)
        return [task_loss(model, params, w) for w in windows]

    was_training = model.training
    model.eval()  # no dropout: the objective is a function of Λ
    try:
        best, best_coef, best_step, history, before = float("inf"), coef.detach().clone(), 0, [], None
        for step in range(steps + 1):
            if step < steps:
                per = losses(coef)
                obj = torch.stack(per).mean()
                value = float(obj.detach())
            else:  # the last update's coefficients: evaluated, not stepped
                with torch.no_grad():
                    per = losses(coef)
                value = float(torch.stack(per).mean())
            if before is None:
                before = [float(x.detach()) for x in per]
            if value < best:
                best, best_coef, best_step = value, coef.detach().clone(), step
            if step == steps:
                break
            history.append(value)
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            if progress is not None:
                progress(step, value)
        with torch.no_grad():
            after = [float(x) for x in losses(best_coef)]
    finally:
        model.train(was_training)
    return Fit(best_coef.cpu(), before, after, history, best_step)
