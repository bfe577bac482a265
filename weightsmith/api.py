"""The Python API: ``quantize(model, config, calibration, out=...)`` and ``evaluate(...)``."""
from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .config import QuantizeConfig, build_config
from .errors import WeightsmithError
from .model.adapter import LazyModel
from .model.saving import AtomicDir
from .model.source import CheckpointSource
from .report import peak_rss_mb, summarize, versions, write_report

log = logging.getLogger(__name__)


def _release_freed_memory_promptly() -> None:
    """glibc keeps freed blocks below a dynamic threshold (up to 32 MB) in its heap, so activation
    buffers freed block after block stay resident. A fixed 128 KiB mmap threshold returns them to
    the system at once; it changes no result. No-op elsewhere than glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _as_config(config: QuantizeConfig | dict | None) -> QuantizeConfig:
    if isinstance(config, QuantizeConfig):
        return config
    return build_config(config or {})


def quantize(
    model: str | Path,
    config: QuantizeConfig | dict | None = None,
    calibration: str | Path | torch.Tensor | None = None,
    *,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Quantize the checkpoint at ``model`` (HF directory or .gguf) into the HF directory ``out``.

    ``calibration`` is a text file / .jsonl / directory (overrides ``config.calib.path``), a
    LongTensor of token windows (n, seqlen), or None (use ``config.calib``; with no path there,
    text sampled from the model). Returns the report, also written to ``out/report.json``.
    """
    t0 = time.time()
    _release_freed_memory_promptly()
    cfg = _as_config(config)
    if isinstance(calibration, (str, Path)):
        cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"path": str(calibration)})})
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsmithError(f"device {cfg.device} requested but no CUDA device is available")
    atomic = AtomicDir(out, overwrite)
    with CheckpointSource(model) as source:
        atomic.check_space(int(source.nbytes() * 1.05) + 2**20)
        lm = LazyModel(source, cfg.device)
        ids, calib_source = _calibration(cfg, source, lm, calibration, progress)
        with atomic as tmp:
            from .engine.streamer import stream_quantize

            res = stream_quantize(lm, cfg, ids, tmp, progress=progress)
            for f in source.aux_files():
                shutil.copy2(f, tmp / f.name)
            report = {
                "command": "quantize",
                "model": str(model),
                "output": str(out),
                "config": cfg.to_dict(),
                "versions": versions(),
                "calibration": calib_source,
                "blocks": res.blocks,
                "unquantized_layers": res.unreached,
                "wall_time_s": round(time.time() - t0, 2),
                "peak_rss_mb": peak_rss_mb(),
                "summary": summarize(res.layers),
                "layers": res.layers,
            }
            write_report(tmp, report)
    log.info("wrote %s in %.1f s (peak RSS %.0f MB)", out, report["wall_time_s"], report["peak_rss_mb"])
    return report


def _calibration(cfg: QuantizeConfig, source: CheckpointSource, lm: LazyModel, calibration: Any, progress: bool):
    vocab = getattr(lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config, "vocab_size", None)
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        if ids.ndim != 2 or ids.numel() == 0:
            raise WeightsmithError("calibration tensor must be (nsamples, seqlen) token ids")
        if vocab is not None and int(ids.max()) >= vocab:
            raise WeightsmithError(f"calibration token id {int(ids.max())} >= vocab size {vocab}")
        return ids, {"kind": "tensor", "nsamples": ids.shape[0], "seqlen": ids.shape[1]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calib import build_calibration

    try:
        tok = AutoTokenizer.from_pretrained(str(source.dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise WeightsmithError(f"cannot load the tokenizer of {source.origin}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def load_model():
        from .eval.loading import model_kind

        if model_kind(lm.config) != "causal":
            raise WeightsmithError(f"no calibration text given and {source.origin} is not a causal LM that can write its own; pass --calib FILE")
        return AutoModelForCausalLM.from_pretrained(str(source.dir), dtype=torch.float32).eval()

    calib = build_calibration(cfg.calib, tok, load_model, progress=progress, vocab_size=vocab)
    gc.collect()
    return calib.ids, calib.source
