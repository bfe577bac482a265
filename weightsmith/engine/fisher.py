"""Gradients of the float model's loss at every linear layer, from one whole-model forward+backward pass.

:func:`gradient_pass` is the shared pass: the float model on ``samples`` calibration windows, ``chunk``
windows at a time, the summed next-token loss differentiated with respect to activations only (no
parameter gradient is stored); for each watched layer it hands the layer's input ``x`` (b, T, in) and
output gradient ``dy = ∂L/∂y`` (b, T, out) of every chunk to a consumer. Two statistics are built on it:

- **output Fisher** (the ``out_fisher`` need, :func:`output_fisher`): ``f_i = Σ_t (∂L/∂y_{t,i})²``. With
  it, the loss increase of a weight error ``E = Q − W`` is estimated, to second order and with the
  Kronecker-factored (K-FAC) approximation of the weight Fisher ``E[g gᵀ] ⊗ E[x xᵀ]`` kept diagonal in
  the output, as ``½ Σ_i f_i · (E H Eᵀ)_ii`` with ``H = XᵀX / N`` (cf. HAWQ, Dong et al. 2019, and
  SqueezeLLM, Kim et al. 2023) — for planners.
- **block Fisher** (the ``block_fisher`` need, :func:`block_fisher`): the per-window weight gradient
  ``g = Σ_t dy_t x_tᵀ`` (out, in) formed from ``x`` and ``dy`` (never as a parameter gradient), flattened
  row-major and cut into blocks of ``B`` consecutive weights, and ``F_b = (1/m) Σ_windows g_b g_bᵀ``
  (nblocks, B, B) float32 — the empirical Fisher of the Optimal BERT Surgeon (``prune/obert.py``).
  Each window's loss is its mean token loss (the loss a per-sample gradient is taken of). Storage is
  ``numel · B · 4`` bytes per layer: the layers are split into passes of at most ``memory_mb``, each
  pass one more forward+backward of the whole model, and the results of a pass are kept in a
  directory (one safetensors file per layer) when there is more than one.

The pass holds the whole float model in memory (unlike the block-streamed passes): fine for the models
a CPU compresses in minutes. Encoders would need the masked-LM loss, which the engine does not form:
the pass refuses them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import WeightsmithError
from ..model.adapter import LazyModel, is_linear

log = logging.getLogger(__name__)


def _check_causal(lm: LazyModel, what: str) -> None:
    from ..eval.loading import model_kind

    if model_kind(lm.config) != "causal":
        raise WeightsmithError(f"{what} needs a causal LM (it differentiates the next-token loss; the masked-LM loss of encoders is not supported)")


def gradient_pass(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], consume: Callable[[str, torch.Tensor, torch.Tensor], None],
                  chunk: int = 2, progress: bool = True, per_window_mean: bool = False, desc: str = "gradients",
                  weights: dict[str, torch.Tensor] | None = None) -> int:
    """One forward+backward of the whole float model over ``ids``; ``consume(name, x, dy)`` per layer and chunk
    (float32, (b, T, in) and (b, T, out)). The loss is summed over tokens, or (``per_window_mean``) the sum over
    windows of each window's mean token loss. ``weights`` ({layer: (out, in)}) replace those linear layers'
    checkpoint weights for this pass (a gradual step's model as changed so far). Returns the number of
    predicted tokens."""
    lm.load_outside()
    for i in range(len(lm.blocks)):
        lm.load_block(i)
    model = lm.model
    mods = dict(model.named_modules())
    missing = [n for n in [*layer_names, *(weights or {})] if n not in mods or not is_linear(mods[n])]
    if missing:
        raise WeightsmithError(f"gradient pass: no linear layer {missing[0]}")
    for n, w in (weights or {}).items():
        if tuple(w.shape) != tuple(mods[n].weight.shape):
            raise WeightsmithError(f"gradient pass: the weight given for {n} is {tuple(w.shape)}, the layer's {tuple(mods[n].weight.shape)}")
        mods[n].weight.data = w.to(mods[n].weight.device, mods[n].weight.dtype)
    hooks, inputs = [], {}

    def watch(name):
        def fwd(_m, inp, out):
            if not out.requires_grad:
                return
            if name in inputs:
                raise WeightsmithError(f"gradient pass: {name} is called twice in one forward")
            inputs[name] = inp[0].detach()

            def grad(g):  # returns None: the gradient flows on unchanged
                consume(name, inputs.pop(name).float(), g.detach().float())
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
            for s in tqdm(range(0, ids.shape[0], chunk), desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True):
                x = ids[s:s + chunk].to(lm.device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
                loss = nll.reshape(x.shape[0], -1).mean(1).sum() if per_window_mean else nll.sum()
                loss.backward()
                inputs.clear()
                tokens += x[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        for i in range(len(lm.blocks)):
            lm.unload_block(i)
        lm.unload_outside()
    return tokens


def _accumulate(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """``acc[name] += value`` (the first value of a layer is kept as is)."""
    acc[name] = acc[name].add_(value) if name in acc else value


def _finite(out: dict, what: str) -> None:
    bad = [n for n, f in out.items() if not torch.isfinite(f).all()]
    if bad:
        raise WeightsmithError(f"{what} of {bad[0]} is not finite: the float model's loss has no usable gradient")


def output_fisher(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], chunk: int = 2, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{layer: f}`` with ``f`` (out_features,) float32 the summed squared gradient of the loss at each output."""
    _check_causal(lm, "the output-Fisher objective")
    acc: dict[str, torch.Tensor] = {}

    def consume(name, _x, dy):
        _accumulate(acc, name, dy.double().pow(2).reshape(-1, dy.shape[-1]).sum(0).cpu())

    tokens = gradient_pass(lm, ids, layer_names, consume, chunk, progress, desc="output Fisher")
    out = {n: (acc[n] / max(tokens, 1)).float() for n in layer_names if n in acc}
    _finite(out, "output Fisher")
    log.info("output Fisher of %d layers from %d tokens", len(out), tokens)
    return out


def window_grads(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-window weight gradients ``g = Σ_t dy_t x_tᵀ``: (b, out, in) from x (b, T, in), dy (b, T, out)."""
    return torch.einsum("bto,bti->boi", dy, x)


def flat_blocks(g: torch.Tensor, B: int) -> torch.Tensor:
    """``(..., out, in)`` → ``(..., nblocks, B)``: row-major flattening, zero-padded to a multiple of ``B``."""
    flat = g.reshape(*g.shape[:-2], -1)
    pad = -flat.shape[-1] % B
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, B)


class BlockFisher:
    """The ``block_fisher`` of a run: ``get(name)`` → (nblocks, B, B) float32, from memory or its directory."""

    def __init__(self, block: int, tensors: dict | None = None, directory: Path | None = None, names: set | None = None):
        self.block, self.tensors, self.directory, self.names = block, tensors or {}, directory, names or set(self.tensors)

    def get(self, name: str) -> torch.Tensor | None:
        if name in self.tensors:
            return self.tensors[name]
        if self.directory is not None and name in self.names:
            from safetensors.torch import load_file

            return load_file(self.directory / f"{name}.safetensors")["F"]
        return None


def block_fisher(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], block: int, *, memory_mb: float = 4096,
                 directory: Path | None = None, chunk: int = 2, progress: bool = True,
                 weights: dict[str, torch.Tensor] | None = None, desc: str = "block Fisher") -> BlockFisher:
    """The block-diagonal empirical Fisher of every layer (module docstring), in passes of at most ``memory_mb``;
    ``weights`` as in :func:`gradient_pass` (the model the gradients are taken of)."""
    _check_causal(lm, "the block Fisher (oBERT)")
    shapes = {n: tuple(lm.source.shape(k)) for n, k in _weight_keys(lm, layer_names).items()}
    sizes = {n: -(-(shapes[n][0] * shapes[n][1]) // block) * block * block * 4 for n in layer_names}
    passes, cur, used = [], [], 0
    for n in layer_names:
        if cur and used + sizes[n] > memory_mb * 2**20:
            passes.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += sizes[n]
    passes.append(cur)
    spill = len(passes) > 1
    if spill and directory is None:
        raise WeightsmithError(f"the block Fisher needs {sum(sizes.values()) / 2**20:.0f} MB, over its budget of {memory_mb:.0f} MB, and has no directory to keep passes in")
    kept: dict[str, torch.Tensor] = {}
    m = ids.shape[0]
    for k, names in enumerate(passes):
        acc: dict[str, torch.Tensor] = {}

        def consume(name, x, dy):
            gb = flat_blocks(window_grads(x, dy), block)  # (b, nblocks, B)
            _accumulate(acc, name, torch.einsum("bnk,bnl->nkl", gb, gb).cpu())

        gradient_pass(lm, ids, names, consume, chunk, progress, per_window_mean=True,
                      desc=f"{desc} {k + 1}/{len(passes)}" if spill else desc, weights=weights)
        out = {n: acc[n] / m for n in names if n in acc}
        _finite(out, "block Fisher")
        if spill:
            from safetensors.torch import save_file

            directory.mkdir(parents=True, exist_ok=True)
            for n, f in out.items():
                save_file({"F": f.contiguous()}, str(directory / f"{n}.safetensors"))
        else:
            kept.update(out)
    log.info("block Fisher (B=%d) of %d layers from %d windows in %d pass(es)", block, len(layer_names), m, len(passes))
    return BlockFisher(block, kept, directory if spill else None, set(layer_names))


def _weight_keys(lm: LazyModel, names: list[str]) -> dict[str, str]:
    keys = {}
    for i in range(len(lm.blocks)):
        bk = lm.block_keys(i)
        for l in lm.layers(i):
            if l.name in names:
                keys[l.name] = bk[l.rel + ".weight"]
    return keys


def weight_fisher(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], chunk: int = 2, progress: bool = True,
                  desc: str = "weight Fisher") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per weight, the mean per-window gradient ``ḡ`` and the diagonal empirical Fisher ``mean g²`` (the
    ``weight_fisher`` need): ``({layer: ḡ}, {layer: f})``, each (out, in) float32; 2·numel floats per layer."""
    _check_causal(lm, "the weight Fisher")
    gs: dict[str, torch.Tensor] = {}
    fs: dict[str, torch.Tensor] = {}

    def consume(name, x, dy):
        g = window_grads(x, dy).double()
        _accumulate(gs, name, g.sum(0).cpu())
        _accumulate(fs, name, g.square().sum(0).cpu())

    gradient_pass(lm, ids, layer_names, consume, chunk, progress, per_window_mean=True, desc=desc)
    m = ids.shape[0]
    g_out = {n: (v / m).float() for n, v in gs.items()}
    f_out = {n: (v / m).float() for n, v in fs.items()}
    _finite(f_out, desc)
    return g_out, f_out
