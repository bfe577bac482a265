"""Output Fisher of every linear layer: ``f_i = Σ_t (∂L/∂y_{t,i})²`` over the calibration tokens, where
``y = W x`` is the layer's output and ``L`` the model's summed next-token loss (the ``out_fisher`` need).

With it, the loss increase of a weight error ``E = Q − W`` is estimated, to second order and with the
Kronecker-factored (K-FAC) approximation of the weight Fisher ``E[g gᵀ] ⊗ E[x xᵀ]`` kept diagonal in
the output, as ``½ Σ_i f_i · (E H Eᵀ)_ii`` with ``H = XᵀX / N``: a layer's output error weighted by how
much the model's loss cares about each of its output channels — which the plain per-layer error
(every layer counted alike) does not see. A planner that compares candidates across layers needs that
(cf. the Fisher-based sensitivities of HAWQ, Dong et al. 2019, and SqueezeLLM, Kim et al. 2023).

One forward and backward of the float model on ``samples`` calibration windows, ``chunk`` windows at
a time, with the gradient taken with respect to activations only (no parameter gradient is stored).
This pass holds the whole float model in memory (unlike the block-streamed passes): fine for the
models a CPU quantizes in minutes; for larger ones use a planner objective without it.
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from ..errors import WeightsmithError
from ..model.adapter import LazyModel, is_linear

log = logging.getLogger(__name__)


def output_fisher(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], chunk: int = 2, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{layer: f}`` with ``f`` (out_features,) float32 the summed squared gradient of the loss at each output."""
    from ..eval.loading import model_kind

    if model_kind(lm.config) != "causal":
        raise WeightsmithError("the output-Fisher objective needs a causal LM (it differentiates the next-token loss)")
    lm.load_outside()
    for i in range(len(lm.blocks)):
        lm.load_block(i)
    model = lm.model
    mods = dict(model.named_modules())
    missing = [n for n in layer_names if n not in mods or not is_linear(mods[n])]
    if missing:
        raise WeightsmithError(f"output Fisher: no linear layer {missing[0]}")
    acc = {n: torch.zeros(mods[n].weight.shape[0], dtype=torch.float64) for n in layer_names}
    hooks = []

    def watch(name):
        def grad(g):  # returns None: the gradient flows on unchanged
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def fwd(_m, _inp, out):
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    for n in layer_names:
        hooks.append(mods[n].register_forward_hook(watch(n)))
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    tokens = 0
    try:
        with torch.enable_grad():
            for s in tqdm(range(0, ids.shape[0], chunk), desc="output Fisher", unit="chunk", disable=not progress, dynamic_ncols=True):
                x = ids[s:s + chunk].to(lm.device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                tokens += x[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        for i in range(len(lm.blocks)):
            lm.unload_block(i)
        lm.unload_outside()
    out = {n: (a / max(tokens, 1)).float() for n, a in acc.items()}
    bad = [n for n, f in out.items() if not torch.isfinite(f).all()]
    if bad:
        raise WeightsmithError(f"output Fisher of {bad[0]} is not finite: the float model's loss has no usable gradient")
    log.info("output Fisher of %d layers from %d tokens", len(out), tokens)
    return out
