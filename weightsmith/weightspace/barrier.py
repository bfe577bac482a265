"""The loss barrier along the linear path between two models of one architecture.

For θ(α) = (1 − α)·θ_A + α·θ_B, the barrier is max_α [L(θ(α)) − ((1 − α)·L(θ_A) + α·L(θ_B))], with L the
mean next-token cross-entropy (nats per token) on a fixed set of text windows (Frankle et al.,
"Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020; the quantity git re-basin
lowers by permuting B, ``align.py``). Every floating tensor is interpolated (norm weights included);
perplexity is exp(L). The curve is evaluated on the grid ``alphas`` (default 0, 0.1, …, 1).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource

ALPHAS = tuple(round(i / 10, 1) for i in range(11))


def text_windows(model_dir: str | Path, text: str, seqlen: int, windows: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from ..eval.runner import cut_windows
    from ..safety import from_pretrained

    tok = from_pretrained(AutoTokenizer, model_dir)
    ids = tok(text, return_tensors="pt").input_ids[0]
    return cut_windows(ids, seqlen, windows)


def mean_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i : i + batch_size]
            logits = model(x).logits[:, :-1].float()
            tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
    return tot / n


def interpolation_curve(a: str | Path, b: str | Path, ids: torch.Tensor, alphas=ALPHAS) -> dict:
    """Loss and perplexity at each α of the path A → B, and the barrier (module docstring)."""
    from transformers import AutoModelForCausalLM

    from ..safety import from_pretrained

    alphas = [float(x) for x in alphas]
    if len(alphas) < 2 or alphas[0] != 0 or alphas[-1] != 1 or alphas != sorted(alphas):
        raise WeightsmithError("the α grid must rise from 0 to 1")
    with CheckpointSource(a) as sa, CheckpointSource(b) as sb:
        if sorted(sa.keys()) != sorted(sb.keys()) or any(sa.shape(k) != sb.shape(k) for k in sa.keys()):
            raise WeightsmithError(f"{a} and {b} are not checkpoints of one architecture (tensors or shapes differ)")
        wa = {k: sa.get(k).float() for k in sa.keys()}
        wb = {k: sb.get(k).float() for k in sb.keys()}
    model = from_pretrained(AutoModelForCausalLM, a, dtype=torch.float32).eval()
    params = dict(model.state_dict())
    missing = [k for k in wa if k not in params]
    if missing:
        raise WeightsmithError(f"{a}: tensor {missing[0]} is not a parameter of the model transformers builds from its config")
    losses = []
    for al in alphas:
        with torch.no_grad():
            for k in wa:
                t = wa[k] if not wa[k].is_floating_point() else torch.lerp(wa[k], wb[k], float(al))
                params[k].copy_(t)
        losses.append(mean_loss(model, ids))
    la, lb = losses[0], losses[-1]
    lin = [(1 - al) * la + al * lb for al in alphas]
    gaps = [x - y for x, y in zip(losses, lin)]
    return {"alphas": list(alphas), "loss": losses, "perplexity": [math.exp(x) for x in losses], "barrier": max(gaps),
            "barrier_alpha": alphas[gaps.index(max(gaps))]}
