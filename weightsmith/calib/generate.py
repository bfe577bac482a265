"""Calibration data sampled from the model itself, for when no calibration text is given.

Each row starts with the tokenizer's BOS token (EOS when there is none, else token 0) and continues
with ``seqlen - 1`` tokens drawn by plain multinomial sampling at temperature 1.0 (no top-k, no
top-p, no penalties, no stopping: an EOS drawn mid-row is kept, like a document boundary in packed
pretraining text). A KV-cached loop is used instead of ``model.generate`` so that no generation
config of the checkpoint changes the distribution and every row has exactly ``seqlen`` tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import WeightsmithError

log = logging.getLogger(__name__)
BATCH = 32  # rows sampled per forward step (one step per token, whatever the batch: more rows per step, fewer steps)


def start_token_id(tokenizer: Any) -> int:
    """The id each generated row starts with: BOS, else EOS, else 0."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    return 0


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def generate_samples(
    model: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = BATCH,
    progress: bool = True,
) -> torch.Tensor:
    """``nsamples`` rows of ``seqlen`` tokens sampled from ``model``, as a CPU LongTensor.

    Batch ``b`` (``batch_size`` rows) samples with a generator seeded with ``seed + b``, so the
    result depends only on the model, ``seed`` and ``batch_size``.
    """
    if nsamples < 1 or seqlen < 2 or batch_size < 1:
        raise WeightsmithError(
            f"need nsamples >= 1, seqlen >= 2 and batch_size >= 1 (got {nsamples}, {seqlen}, {batch_size})"
        )
    start = start_token_id(tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    rows = []
    bar = tqdm(total=nsamples * seqlen, unit="tok", desc="sampling calibration text", disable=not progress)
    try:
        with torch.no_grad():
            for b, first in enumerate(range(0, nsamples, batch_size)):
                size = min(batch_size, nsamples - first)
                gen = torch.Generator(device=device).manual_seed(seed + b)
                rows.append(_sample_batch(model, start, size, seqlen, gen, device, bar).cpu())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(rows).to(torch.long)


def sample_tokens(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocab), drawn from softmax(logits) at temperature 1.0.

    Inverse-CDF sampling with one uniform number per row: the same distribution as
    ``torch.multinomial`` but it draws ``rows`` random numbers instead of ``rows * vocab``, which is
    most of the sampling time on a CPU.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=gen, device=probs.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _sample_batch(
    model: Any,
    start: int,
    size: int,
    seqlen: int,
    gen: torch.Generator,
    device: torch.device,
    bar: tqdm,
) -> torch.Tensor:
    """One batch of ``size`` rows, each ``start`` followed by ``seqlen - 1`` sampled tokens."""
    ids = torch.full((size, seqlen), start, dtype=torch.long, device=device)
    step_input = ids[:, :1]
    cache = None
    bar.update(size)
    for t in range(1, seqlen):
        with warnings.catch_warnings():  # transformers' rename notice of past_key_values: nothing a user can act on
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        ids[:, t] = sample_tokens(out.logits[:, -1, :], gen)
        step_input = ids[:, t : t + 1]
        bar.update(size)
    return ids


def cache_root() -> Path:
    """``$WEIGHTSMITH_CACHE`` or ``~/.cache/weightsmith`` (``$XDG_CACHE_HOME`` respected)."""
    root = os.environ.get("WEIGHTSMITH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weightsmith")
    return Path(root)


def cached_samples(fingerprint: dict, sample, nsamples: int, seqlen: int, seed: int, batch_size: int = BATCH) -> torch.Tensor:
    """``sample()`` (which must return what :func:`generate_samples` returns for these arguments), cached on
    disk (``$WEIGHTSMITH_CALIB_CACHE``, else ``calib/`` in :func:`cache_root`) by (model fingerprint, nsamples,
    seqlen, seed, batch size): a second run on the same model
    reads the rows instead of sampling them again. Stored as safetensors (no pickle), written to a
    temporary file and renamed; an unreadable or mismatching entry is sampled again and replaced."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = json.dumps({"model": fingerprint, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "batch_size": batch_size,
                      "sampler": "inverse-cdf multinomial T=1 v1"}, sort_keys=True)
    root = Path(os.environ["WEIGHTSMITH_CALIB_CACHE"]) if os.environ.get("WEIGHTSMITH_CALIB_CACHE") else cache_root() / "calib"
    path = root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            ids = load_file(str(path)).get("ids")
            if ids is not None and ids.dtype == torch.long and tuple(ids.shape) == (nsamples, seqlen):
                log.info("calibration: %d sampled rows of %d tokens read from the cache %s", nsamples, seqlen, path)
                return ids
        except (OSError, SafetensorError, ValueError):
            pass
        log.warning("calibration cache entry %s is unreadable or does not match; sampling again", path)
    ids = sample()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        save_file({"ids": ids.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache: the run goes on without it
        log.warning("could not cache the sampled calibration rows in %s: %s", path.parent, e)
    return ids
