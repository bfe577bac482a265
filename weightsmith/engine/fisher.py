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

The loss is the model's own training loss: next-token for decoders; for encoders with a masked-LM
head (``BertForMaskedLM`` and kin), the masked-LM loss of BERT (Devlin et al. 2019) — in every window
15 % of the positions that hold no special token (at least one) are chosen, 80 % of them replaced by the
tokenizer's mask token, 10 % by a random token, 10 % left as they are, and the loss is the cross-entropy
of the original tokens at the chosen positions. The choice is seeded by the window's index
(:func:`mlm_inputs`), so it does not depend on the chunking and every pass sees the same masks.
Encoders without a masked-LM head are refused.

The pass holds the whole float model in memory (unlike the block-streamed passes): fine for the models
a CPU compresses in minutes.
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


MLM_RATE = 0.15  # BERT's share of masked positions


def _check_loss(lm: LazyModel, what: str) -> None:
    """A causal LM, or an encoder with a masked-LM head (the losses the pass forms)."""
    from ..eval.loading import model_kind

    if model_kind(lm.config) != "causal" and not _has_mlm_head(lm):
        raise WeightsmithError(f"{what} needs a causal LM or an encoder with a masked-LM head (it differentiates the model's "
                               f"next-token or masked-LM loss); {type(lm.model).__name__} has neither")


def _has_mlm_head(lm: LazyModel) -> bool:
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    return head is not None and type(lm.model).__name__.endswith("ForMaskedLM")


def _mask_token(lm: LazyModel) -> tuple[int, set[int]]:
    """The tokenizer's mask token id and its special-token ids (never masked)."""
    from ..eval.loading import load_tokenizer, locate_model

    tok = load_tokenizer(locate_model(lm.source.dir))
    if tok.mask_token_id is None:
        raise WeightsmithError(f"the masked-LM loss needs a mask token; the tokenizer in {lm.source.dir} has none")
    return int(tok.mask_token_id), set(int(i) for i in tok.all_special_ids)


def mlm_inputs(ids: torch.Tensor, first: int, mask_id: int, vocab: int, special: set[int] = frozenset(),
               rate: float = MLM_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of windows ``ids`` (b, T), the first being window number ``first`` of the calibration set:
    ``(inputs, chosen)`` — the chosen positions (b, T) bool, and the inputs with 80 % of them the mask token,
    10 % a random token, 10 % unchanged. Seeded per window index: the same windows get the same masks."""
    inputs, chosen = ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    for j in range(ids.shape[0]):
        g = torch.Generator().manual_seed(1_000_003 * (first + j) + 17)
        u, kind, rnd = torch.rand(ids.shape[1], generator=g), torch.rand(ids.shape[1], generator=g), \
            torch.randint(0, vocab, (ids.shape[1],), generator=g)
        ok = torch.tensor([int(t) not in special for t in ids[j].tolist()])
        sel = (u < rate) & ok
        if not sel.any() and ok.any():
            sel[torch.where(ok, u, torch.full_like(u, 2.0)).argmin()] = True
        chosen[j] = sel
        inputs[j] = torch.where(sel & (kind < 0.8), torch.full_like(ids[j], mask_id), inputs[j])
        inputs[j] = torch.where(sel & (kind >= 0.8) & (kind < 0.9), rnd.to(ids.dtype), inputs[j])
    return inputs, chosen


def gradient_pass(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], consume: Callable[[str, torch.Tensor, torch.Tensor], None],
                  chunk: int = 2, progress: bool = True, per_window_mean: bool = False, desc: str = "gradients",
                  weights: dict[str, torch.Tensor] | None = None, labels: str = "data", seed: int = 0) -> int:
    """One forward+backward of the whole float model over ``ids``; ``consume(name, x, dy)`` per layer and chunk
    (float32, (b, T, in) and (b, T, out)). The loss is summed over tokens, or (``per_window_mean``) the sum over
    windows of each window's mean token loss. ``weights`` ({layer: (out, in)}) replace those linear layers'
    checkpoint weights for this pass (a gradual step's model as changed so far). ``labels="model"`` (causal
    LMs): each position's target is drawn from the model's own next-token distribution (seeded by ``seed``
    and the window index) instead of the text's next token — the squared gradients then estimate the
    model's (true) Fisher, the curvature of the KL to its own outputs, rather than the empirical Fisher
    of the data. Returns the number of predicted tokens (masked-LM: chosen positions)."""
    if labels not in ("data", "model"):
        raise WeightsmithError(f"gradient pass: labels must be data or model, not {labels!r}")
    from ..eval.loading import model_kind

    masked = model_kind(lm.config) != "causal"
    if masked:
        _check_loss(lm, "the gradient pass")
        mask_id, special = _mask_token(lm)
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
    first = _first_block(lm, layer_names)
    if first is None:  # a watched layer outside the blocks: differentiate from the embeddings up
        emb = model.get_input_embeddings()
        hooks.append(emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    else:  # from the lowest watched block's input up: the backward stops there (the same gradients, less work)
        hooks.append(lm.blocks[first].register_forward_pre_hook(_grad_from_here, with_kwargs=True))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    tokens = 0
    try:
        with torch.enable_grad():
            for s in tqdm(range(0, ids.shape[0], chunk), desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True):
                x = ids[s:s + chunk]
                if masked:  # BERT's masked-LM loss at the chosen positions
                    xin, chosen = mlm_inputs(x, s, mask_id, int(lm.config.vocab_size), special)
                    logits = model(input_ids=xin.to(lm.device)).logits.float()
                    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.to(lm.device).reshape(-1), reduction="none")
                    w = chosen.to(lm.device).reshape(x.shape).float()
                    nll = nll.reshape(x.shape) * w
                    loss = (nll.sum(1) / w.sum(1).clamp_min(1)).sum() if per_window_mean else nll.sum()
                    tokens += int(chosen.sum())
                else:
                    x = x.to(lm.device)
                    logits = model(input_ids=x, use_cache=False).logits.float()
                    target = x[:, 1:].reshape(-1)
                    if labels == "model":  # one draw per position from the model's own distribution
                        probs = torch.softmax(logits[:, :-1].detach().reshape(-1, logits.shape[-1]), -1).cpu()
                        target = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + s))[:, 0].to(lm.device)
                    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target, reduction="none")
                    loss = nll.reshape(x.shape[0], -1).mean(1).sum() if per_window_mean else nll.sum()
                    tokens += x[:, 1:].numel()
                loss.backward()
                inputs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        for i in range(len(lm.blocks)):
            lm.unload_block(i)
        lm.unload_outside()
    return tokens


def _first_block(lm: LazyModel, layer_names: list[str]) -> int | None:
    """The lowest block holding a watched layer, or None if one lies outside every block."""
    lo = None
    for n in layer_names:
        i = next((i for i in range(len(lm.blocks)) if n.startswith(lm.block_prefix(i))), None)
        if i is None:
            return None
        lo = i if lo is None else min(lo, i)
    return lo


def _grad_from_here(_m, args, kwargs):
    """Forward pre-hook: the block's hidden-state input (first positional, or ``hidden_states``) made a leaf
    that requires grad, so the graph — and the backward — begins at this block."""
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    if torch.is_tensor(kwargs.get("hidden_states")):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
    raise WeightsmithError("gradient pass: a block's hidden-state input is neither its first argument nor hidden_states")


def model_kind_of(lm: LazyModel) -> str:
    from ..eval.loading import model_kind

    return model_kind(lm.config)


def _accumulate(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """``acc[name] += value`` (the first value of a layer is kept as is)."""
    acc[name] = acc[name].add_(value) if name in acc else value


def _finite(out: dict, what: str) -> None:
    bad = [n for n, f in out.items() if not torch.isfinite(f).all()]
    if bad:
        raise WeightsmithError(f"{what} of {bad[0]} is not finite: the float model's loss has no usable gradient")


def output_fisher(lm: LazyModel, ids: torch.Tensor, layer_names: list[str], chunk: int = 2, progress: bool = True,
                  labels: str = "data") -> dict[str, torch.Tensor]:
    """``{layer: f}`` with ``f`` (out_features,) float32 the summed squared gradient of the loss at each output
    (``labels``: the text's next tokens, or draws from the model — see :func:`gradient_pass`; ``auto``: draws
    for a causal LM, the data labels for an encoder)."""
    _check_loss(lm, "the output-Fisher objective (bitalloc's default; --bitalloc-objective relative needs no gradients)")
    acc: dict[str, torch.Tensor] = {}

    def consume(name, _x, dy):
        _accumulate(acc, name, dy.double().pow(2).reshape(-1, dy.shape[-1]).sum(0).cpu())

    if labels == "auto":  # the true Fisher where the model's own predictions can be sampled, else the data labels
        labels = "model" if model_kind_of(lm) == "causal" else "data"
    if labels == "model" and model_kind_of(lm) != "causal":
        raise WeightsmithError("the model-sampled Fisher (fisher_labels: model) is for causal LMs; encoders use the masked-LM loss's data labels")
    tokens = gradient_pass(lm, ids, layer_names, consume, chunk, progress, desc="output Fisher", labels=labels)
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
    _check_loss(lm, "the block Fisher (oBERT)")
    shapes = {n: tuple(lm.source.shape(k)) for n, k in weight_keys(lm, layer_names).items()}
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
        out = {n: acc[n].div_(m) for n in names if n in acc}  # in place: one copy of the pass in memory, not two
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


def weight_keys(lm: LazyModel, names: list[str]) -> dict[str, str]:
    """Checkpoint key of each named linear layer's weight."""
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
    _check_loss(lm, "the weight Fisher")
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
