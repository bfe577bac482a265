"""HLQ vs the uniform grid (issue 17): SmolLM2-135M quantized data-free at 2 and 3 bits by
round-to-nearest (clip search) and by HLQ (free per-plane scales, quant/hlq.py, started from that
same grid), perplexity / KL / top-1 by the protocol of bench/PROTOCOL.md (64 windows of 512 tokens
of the evaluation split, against the float model), bits per weight from each report. HLQ stores
``bits + 1`` 16-bit values per group instead of RTN's scale and zero, so it is also run at group
size 128, near RTN g64's bits per weight.

    .venv/bin/python bench/bench_hlq.py

Writes bench/results/hlq.json/md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, EVAL, eval_many, run_cli, smollm2_float_dir, write_results  # noqa: E402

CONFIGS = {  # name: CLI arguments after `quantize FLOAT OUT`
    "RTN W3 g64 asym": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym", "--clip-search"],
    "HLQ W3 g64": ["--method", "hlq", "--bits", "3", "--group-size", "64", "--asym", "--clip-search"],
    "HLQ W3 g128": ["--method", "hlq", "--bits", "3", "--group-size", "128", "--asym", "--clip-search"],
    "RTN W2 g64 asym": ["--method", "rtn", "--bits", "2", "--group-size", "64", "--asym", "--clip-search"],
    "HLQ W2 g64": ["--method", "hlq", "--bits", "2", "--group-size", "64", "--asym", "--clip-search"],
}


def main() -> None:
    load0 = os.getloadavg()[0]
    float_dir = smollm2_float_dir()
    work = CACHE / "hlq"
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name, args in CONFIGS.items():
        out = work / name.replace(" ", "_")
        if not (out / "report.json").is_file():
            t = run_cli(["quantize", str(float_dir), str(out), *args, "--overwrite", "--quiet"], work / f"{out.name}.log")["seconds"]
        else:
            t = None
        rep = json.loads((out / "report.json").read_text())
        rows[name] = {"path": str(out), "args": args, "quantize_s": t, "bits_per_weight": rep["summary"]["bits_per_weight"],
                      "mean_weight_error": rep["summary"]["mean_weight_error"]}
    ev = eval_many({n: Path(r["path"]) for n, r in rows.items()}, float_dir, EVAL)
    for n in rows:
        rows[n].update(ev[n])
    ref = next(iter(ev.values()))["reference_perplexity"]
    lines = ["# HLQ (free per-plane scales) vs the uniform grid, data-free, SmolLM2-135M", "",
             f"Protocol perplexity (64×512 tokens of wiki.eval), float model {ref:.2f}; KL(float‖model) and top-1 per token. "
             "Every run data-free from the same float32 model; HLQ starts from the asymmetric clip-searched grid of its row. "
             f"Machine: 2-core {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
             f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.", "",
             "| config | bits/weight | perplexity | KL | top-1 | mean weight error | quantize s |", "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        qs = f"{r['quantize_s']:.0f}" if r["quantize_s"] else "(cached)"
        lines.append(f"| {n} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | "
                     f"{r['mean_weight_error']:.4f} | {qs} |")
    table = "\n".join(lines + [""])
    write_results("hlq", {"float_perplexity": ref, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M")}, table)
    print(table)


if __name__ == "__main__":
    main()
