"""Wall time and peak RSS of ``weightsmith inspect --stats`` and ``weightsmith diff`` on synthetic checkpoints.

Two synthetic Llama-style checkpoints (``make_synthetic.py``, seeds 0 and 1) are written to a work
directory; ``inspect --stats --json`` runs on the first and ``diff --rank 8 --out`` on the pair, each
in its own process under ``/usr/bin/time -v``, single-threaded (``OMP_NUM_THREADS=1``). Run by hand:

    python bench/bench_spectra.py                                  # smoke: 4 layers, hidden 768 (~420 MB a model)
    python bench/bench_spectra.py --layers 36 --hidden 4096 --intermediate 11008 --heads 32 --name spectra_30gb

Writes ``bench/results/<name>.json`` and ``.md``; the work directory (``--work``, default a temporary
one) is removed unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_merge import timed  # noqa: E402
from make_synthetic import make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--name", default="spectra_smoke")
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-spectra-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        work.mkdir(parents=True, exist_ok=True)
        base, other = work / "base", work / "other"
        size = make(base, a.layers, a.hidden, a.intermediate, a.heads, a.heads, seed=0)
        make(other, a.layers, a.hidden, a.intermediate, a.heads, a.heads, seed=1)
        py = [sys.executable, "-m", "weightsmith"]
        stats = timed([*py, "inspect", str(base), "--stats", "--json", "-q"], work / "stats.log", env)
        diff = timed([*py, "diff", str(base), str(other), "--rank", "8", "--out", str(work / "diff"), "-q", "--json"],
                     work / "diff.log", env)
        log = (work / "stats.log").read_text(errors="replace")
        body = log[log.index("{"): log.rindex("}") + 1] if stats["ok"] else "{}"
        res_stats = json.loads(body) if stats["ok"] else {}
        methods = sorted({r["method"] for r in res_stats.get("matrices", [])})
        res = {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate, "model_bytes": size,
               "largest_tensor_bytes": 4 * 49152 * a.hidden, "stats": {k: stats[k] for k in ("ok", "wall_s", "peak_rss_mb")},
               "stats_methods": methods, "matrices": len(res_stats.get("matrices", [])),
               "diff": {k: diff[k] for k in ("ok", "wall_s", "peak_rss_mb")},
               "diff_output_bytes": sum(f.stat().st_size for f in (work / "diff").glob("*")) if diff["ok"] else None}
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "results"
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# inspect --stats and diff on a synthetic checkpoint ({a.name})", "",
          f"{a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, vocabulary 49152, float32, untied head: "
          f"{size / 1e6:.0f} MB a model (largest tensor {res['largest_tensor_bytes'] / 1e6:.0f} MB). One thread, "
          "`/usr/bin/time -v`, on the shared 2-core machine.", "",
          "| command | wall s | peak RSS MB |", "|---|---:|---:|",
          f"| `inspect --stats` ({res['matrices']} matrices, {', '.join(methods)}) | {stats['wall_s']} | {stats['peak_rss_mb']} |",
          f"| `diff --rank 8 --out` | {diff['wall_s']} | {diff['peak_rss_mb']} |"]
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
