"""Packed export of a ``weightsmith quantize`` output: ``export(quantized, out, fmt)``.

Formats: ``compressed-tensors`` (pack-quantized, llm-compressor / vLLM), ``gptq`` (AutoGPTQ /
GPTQModel / transformers), ``gguf`` (llama.cpp; ``out`` is the ``.gguf`` file). Each reads the
integer codes back from the dequantized weights and their qparams (``common.py``), packs them, and
writes ``out`` atomically: a temporary path renamed into place, nothing left behind on failure.

Layers may differ (every layer its own grid, some only pruned or left in float): each exporter
declares the encoding kinds it ``HOLDS`` and refuses, before writing anything, a checkpoint with an
encoding it cannot store or a grid it cannot pack, naming the kind or the grid and a layer.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import WeightsmithError
from ..model.saving import AtomicDir
from ..safety import OutputLock, check_output
from .common import QuantizedCheckpoint, check_holds

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq", "gguf")
ALIASES = {"ct": "compressed-tensors", "compressed_tensors": "compressed-tensors", "pack-quantized": "compressed-tensors"}


def normalize_format(fmt: str) -> str:
    f = ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise WeightsmithError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return f


def export(quantized: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False, gguf_type: str | None = None,
           gguf_template: str | Path | None = None, gptq_version: str = "v1", gguf_embedding_type: str | None = None,
           gguf_output_type: str | None = None, gguf_unverified_tokenizer: bool = False) -> dict:
    """Pack the weightsmith-quantized directory ``quantized`` into ``out`` in format ``fmt``."""
    t0 = time.time()
    fmt = normalize_format(fmt)
    out = Path(out)
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise WeightsmithError(f"for --format gguf, OUT is the file to write and must end in .gguf (got {out})")
    check_output(out, [quantized, gguf_template], overwrite=overwrite, kind="file" if fmt == "gguf" else "dir")
    if not out.parent.is_dir():
        raise WeightsmithError(f"output directory's parent {out.parent} does not exist")
    with OutputLock(out), QuantizedCheckpoint(quantized) as ckpt:  # OUT's lock, temporary file or directory included
        if fmt == "gguf":
            from .gguf_format import HOLDS, check_tokenizer, export_gguf, float_type, layer_types, write_atomically

            check_holds(ckpt, "GGUF", HOLDS)  # refuse before any work
            layer_types(ckpt, gguf_type)
            emb, head = float_type(gguf_embedding_type, "embedding") or "F16", float_type(gguf_output_type, "output")
            if gguf_template is None:
                check_tokenizer(ckpt.dir, gguf_unverified_tokenizer)
            info = write_atomically(out, overwrite, lambda tmp: export_gguf(ckpt, tmp, gguf_type, gguf_template, emb, head,
                                                                            gguf_unverified_tokenizer))
        else:
            if fmt == "compressed-tensors":
                from .compressed_tensors import HOLDS, check_compressed_tensors, export_compressed_tensors as run

                check_holds(ckpt, "compressed-tensors", HOLDS)
                check_compressed_tensors(ckpt)
            else:
                from .gptq import HOLDS, check_gptq, export_gptq

                check_holds(ckpt, "GPTQ", HOLDS)
                check_gptq(ckpt, gptq_version)

                def run(c, tmp):
                    return export_gptq(c, tmp, gptq_version)
            atomic = AtomicDir(out, overwrite)
            atomic.check_space(int(ckpt.source.nbytes() * 0.6) + 2**20)
            with atomic as tmp:
                info = run(ckpt, tmp)
        uniform = ckpt.uniform
        grid = uniform.as_dict() if uniform is not None else None
        grids = ckpt.grid_summary()
        n_layers = len(ckpt.layers)
        in_bytes = ckpt.source.nbytes()  # the dequantized weight files read
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    res = {"format": fmt, "output": str(out), "grid": grid, "layers": n_layers, "bytes": size,
           "input_weight_bytes": in_bytes, "size_vs_input": size / in_bytes if in_bytes else None,
           "seconds": round(time.time() - t0, 2), **info}
    if grid is None:  # mixed grids (or none): each grid in use and its number of layers
        res["grids"] = grids
    log.info("exported %s as %s (%.1f MB) in %.1f s", quantized, fmt, size / 1e6, res["seconds"])
    return res
