"""``evaluate``: perplexity of a causal model on text, and its agreement with a reference model.

The text is tokenized once with the model's tokenizer and cut into consecutive, non-overlapping
windows of ``seqlen`` tokens; the first ``windows`` of them are evaluated, ``batch_size`` at a time.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from tqdm import tqdm

from ..calib.sources import read_calibration_text, tokenize_text
from ..errors import WeightsmithError
from ..validate import check_seqlen
from .loading import CAUSAL, encoder_body, load_for_eval, parse_device
from .metrics import CausalStats, EncoderStats

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
ENCODER_NOTE = "perplexity is not defined for an encoder; pass --reference for cosine similarity"
UNBOUNDED_LENGTH = 1_000_000


def evaluate(
    model_path: PathLike,
    *,
    text: Optional[str] = None,
    text_path: Optional[PathLike] = None,
    seqlen: int = 512,
    windows: int = 64,
    reference: Optional[PathLike] = None,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Evaluate the model at ``model_path`` (HF directory or .gguf file) on ``text`` or the file at
    ``text_path``. Causal models: perplexity, and with ``reference`` the reference's perplexity,
    mean KL(reference ‖ model) and top-1 agreement. Encoders: with ``reference``, the mean cosine
    similarity of the final hidden states."""
    return evaluate_many([model_path], text=text, text_path=text_path, seqlen=seqlen, windows=windows, reference=reference,
                         device=device, batch_size=batch_size, progress=progress)[0]


def evaluate_many(
    model_paths: list[PathLike],
    *,
    text: Optional[str] = None,
    text_path: Optional[PathLike] = None,
    seqlen: int = 512,
    windows: int = 64,
    reference: Optional[PathLike] = None,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict]:
    """:func:`evaluate` for several models of one kind and tokenizer on the same windows, in one pass:
    the reference runs once per batch for all of them (not once per model), so comparing ``k``
    models costs ``k + 1`` forwards per window instead of ``2k``. One result per model, in order;
    each one's ``seconds`` is the shared wall time."""
    start = time.perf_counter()
    if seqlen < 2 or windows < 1 or batch_size < 1:
        raise WeightsmithError(f"need seqlen >= 2, windows >= 1 and batch_size >= 1 (got {seqlen}, {windows}, {batch_size})")
    if not model_paths:
        raise WeightsmithError("no model to evaluate")
    body = _load_text(text, text_path)
    dev = parse_device(device)
    loaded = [load_for_eval(p, dev, progress=progress) for p in model_paths]
    model, tokenizer, kind = loaded[0]
    for path, (_m, tok, k) in zip(model_paths[1:], loaded[1:]):
        if k != kind:
            raise WeightsmithError(f"model kinds differ: {path} is {k!r}, {model_paths[0]} is {kind!r}")
    ref_model, ref_tokenizer = _load_reference(reference, dev, kind, progress) if reference is not None else (None, None)
    ids = tokenize_text(tokenizer, body)
    for _m, tok, _k in loaded[1:]:
        _check_same_tokens(tokenizer, tok, body, ids)
    if ref_tokenizer is not None:
        _check_same_tokens(tokenizer, ref_tokenizer, body, ids)
    seqlen = _window_length(model, tokenizer, kind, seqlen)
    chunks = cut_windows(ids, seqlen, windows)
    models = [m for m, _t, _k in loaded]
    if kind == CAUSAL:
        measured = _run_causal(models, ref_model, chunks, dev, batch_size, progress)
    else:
        measured = [_measure(kind, m, ref_model, chunks, dev, batch_size, progress) for m in models]
    seconds = time.perf_counter() - start
    results = []
    for path, metrics in zip(model_paths, measured):
        result: dict = {"model": str(path), "kind": kind}
        if reference is not None:
            result["reference"] = str(reference)
        result.update(metrics)
        result.update({"windows": chunks.shape[0], "seqlen": seqlen, "tokens": chunks.numel(), "seconds": seconds})
        results.append(result)
    return results


def _measure(
    kind: str, model: Any, ref_model: Optional[Any], chunks: torch.Tensor, dev: torch.device, batch_size: int, progress: bool
) -> dict:
    """The metrics for ``kind``: perplexity (and agreement) for causal models, cosine for encoders."""
    if kind == CAUSAL:
        return _run_causal([model], ref_model, chunks, dev, batch_size, progress)[0]
    if ref_model is not None:
        return _run_encoder(model, ref_model, chunks, dev, batch_size, progress)
    return {"note": ENCODER_NOTE}


def _load_text(text: Optional[str], text_path: Optional[PathLike]) -> str:
    if (text is None) == (text_path is None):
        raise WeightsmithError("give exactly one of text and text_path to evaluate on")
    if text_path is not None:
        return read_calibration_text(text_path)
    if not text.strip():
        raise WeightsmithError("the evaluation text is empty")
    return text


def _load_reference(reference: PathLike, dev: torch.device, kind: str, progress: bool) -> tuple[Any, Any]:
    model, tokenizer, ref_kind = load_for_eval(reference, dev, progress=progress)
    if ref_kind != kind:
        raise WeightsmithError(f"model kinds differ: the reference {reference} is {ref_kind!r}, the model is {kind!r}")
    return model, tokenizer


def _check_same_tokens(tokenizer: Any, ref_tokenizer: Any, text: str, ids: torch.Tensor) -> None:
    """The reference must see exactly the token ids the model sees."""
    if len(tokenizer) != len(ref_tokenizer):
        raise WeightsmithError(
            f"tokenizer mismatch: the model's vocabulary has {len(tokenizer)} tokens, the reference's {len(ref_tokenizer)}"
        )
    if not torch.equal(tokenize_text(ref_tokenizer, text), ids):
        raise WeightsmithError("tokenizer mismatch: the model's and the reference's tokenizers give different ids for the text")


def _window_length(model: Any, tokenizer: Any, kind: str, seqlen: int) -> int:
    """Causal models use ``seqlen`` as asked (past their position limit: refused with absolute
    positions, a warning with rotary ones); encoders
    have absolute positions, so their windows are no longer than the model (and tokenizer) allow."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if kind == CAUSAL:
        check_seqlen(model, seqlen)  # absolute positions (GPT-2, OPT): refused; rotary: a warning
        return seqlen
    limits = [seqlen, limit, getattr(tokenizer, "model_max_length", None)]
    usable = min(x for x in limits if isinstance(x, int) and 0 < x < UNBOUNDED_LENGTH)
    if usable < seqlen:
        logger.info("encoder: windows of %d tokens (the model's limit) instead of %d", usable, seqlen)
    return usable


def cut_windows(ids: torch.Tensor, seqlen: int, windows: int) -> torch.Tensor:
    """The first ``windows`` consecutive non-overlapping windows of ``seqlen`` tokens, (n, seqlen)."""
    full = ids.numel() // seqlen
    if full < 1:
        raise WeightsmithError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = min(full, windows)
    if n < windows:
        logger.warning("evaluation text holds only %d windows of %d tokens (%d requested)", n, seqlen, windows)
    return ids[: n * seqlen].view(n, seqlen)


def _batches(chunks: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    """``chunks`` in batches of ``batch_size`` windows, with a tqdm bar (windows, ETA) on stderr."""
    with tqdm(total=chunks.shape[0], unit="win", desc=desc, disable=not progress) as bar:
        for first in range(0, chunks.shape[0], batch_size):
            batch = chunks[first : first + batch_size]
            yield batch
            bar.update(batch.shape[0])


def _logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits


@torch.inference_mode()
def _run_causal(
    models: list[Any], ref_model: Optional[Any], chunks: torch.Tensor, dev: torch.device, batch_size: int, progress: bool
) -> list[dict]:
    """Perplexity (and agreement with ``ref_model``) of each of ``models``; the reference runs once per batch."""
    stats = [CausalStats() for _ in models]
    for batch in _batches(chunks, batch_size, progress, "evaluating"):
        batch = batch.to(dev)
        ref_logits = _logits(ref_model, batch) if ref_model is not None else None
        for model, st in zip(models, stats):
            logits = _logits(model, batch)
            if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
                raise WeightsmithError(
                    f"tokenizer mismatch: the model predicts {logits.shape[-1]} token ids, the reference {ref_logits.shape[-1]}"
                )
            for j in range(batch.shape[0]):
                st.add_window(logits[j], batch[j], None if ref_logits is None else ref_logits[j])
            del logits
        del ref_logits
    outs = []
    for st in stats:
        out = {"perplexity": st.perplexity()}
        if ref_model is not None:
            out.update({"reference_perplexity": st.reference_perplexity(), "kl": st.mean_kl(), "top1": st.top1_rate()})
        outs.append(out)
    return outs


def _hidden(model: Any, batch: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(batch)
    return encoder_body(model)(input_ids=batch, attention_mask=mask).last_hidden_state


@torch.inference_mode()
def _run_encoder(
    model: Any, ref_model: Any, chunks: torch.Tensor, dev: torch.device, batch_size: int, progress: bool
) -> dict:
    stats = EncoderStats()
    for batch in _batches(chunks, batch_size, progress, "evaluating"):
        batch = batch.to(dev)
        stats.add_batch(_hidden(model, batch), _hidden(ref_model, batch))
    return {"cosine": stats.mean_cosine()}
