"""Data-free recipes (issue 15): `quantize --method rtn` with no calibration, beside the plain read +
write of the same checkpoint, in one run on one machine (ratios, not absolute times, are the result).

    .venv/bin/python bench/bench_datafree.py [--model DIR] [--repeats 3]

Each figure is one fresh process: (a) read every tensor of the checkpoint with weightsmith's reader
and write them back as safetensors shards (no model, no compute); (b) `weightsmith quantize MODEL OUT
--method rtn` (W4 g64 sym) and (c) `--method magnitude` (50 %), neither given calibration data. Writes
bench/results/datafree.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, smollm2_float_dir  # noqa: E402

COPY = """
import sys, time
from pathlib import Path
from weightsmith.model.source import CheckpointSource
from weightsmith.model.saving import ShardWriter
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
with CheckpointSource(src) as s:
    keys = s.keys()
    w = ShardWriter(out, 1)
    w.write(0, {k: s.get(k) for k in keys})
    w.finish()
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = Path(a.model) if a.model else smollm2_float_dir()
    work = CACHE / "datafree"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[float]] = {"read + write": [], "quantize --method rtn": [], "quantize --method magnitude": []}
    for _ in range(a.repeats):
        for name, cmd, out in (
            ("read + write", [sys.executable, "-c", COPY, str(model), str(work / "copy")], work / "copy"),
            ("quantize --method rtn", [sys.executable, "-m", "weightsmith", "quantize", str(model), str(work / "rtn"), "--method", "rtn",
                                       "--bits", "4", "--group-size", "64", "--quiet"], work / "rtn"),
            ("quantize --method magnitude", [sys.executable, "-m", "weightsmith", "quantize", str(model), str(work / "mag"),
                                             "--method", "magnitude:sparsity=0.5", "--quiet"], work / "mag")):
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(timed(cmd))
    rep = json.loads((work / "rtn" / "report.json").read_text())
    res = {"model": str(model), "repeats": a.repeats, "seconds": runs, "min_seconds": {k: min(v) for k, v in runs.items()},
           "rtn_calibration": rep["calibration"], "rtn_bits_per_weight": rep["summary"]["bits_per_weight"]}
    base = res["min_seconds"]["read + write"]
    lines = ["# Data-free recipes: no calibration, about the cost of reading and writing the checkpoint", "",
             f"Model: SmolLM2-135M float32 ({model}); each figure one fresh process (Python start and imports included), "
             f"minimum of {a.repeats}.", "", "| command | seconds (min) | × read + write |", "|---|---|---|"]
    for k, v in res["min_seconds"].items():
        lines.append(f"| {k} | {v:.1f} | {v / base:.2f} |")
    lines += ["", f"RTN's report: calibration `{json.dumps(rep['calibration'])}`, {rep['summary']['bits_per_weight']:.3f} bits per weight."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "datafree.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "datafree.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
