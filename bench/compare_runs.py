"""Compare two sets of bench_methods.py runs tensor by tensor — e.g. the code before Engine 2 and now, on
the same inputs — and table which outputs are bit-identical, beside each run's evaluation.

    # the old code, from a checkout of it (its own bench_methods.py; the same venv)
    PYTHONPATH=OLD OLD_PY OLD/bench/bench_methods.py --tag six_old --results-dir R ... ; .venv/bin/python bench/bench_methods.py --tag six_new --results-dir R ...
    .venv/bin/python bench/compare_runs.py six_old six_new --results-dir R --out engine2_repro

Every ``*.safetensors`` file of each run directory (shards and qparams) is read and each tensor
compared with ``torch.equal``; writes bench/results/<out>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS  # noqa: E402


def compare_dirs(a: Path, b: Path) -> dict:
    """``{"tensors": n, "equal": k, "differ": [first names]}`` over every safetensors file of two runs."""
    fa = {f.relative_to(a) for f in a.rglob("*.safetensors")}
    fb = {f.relative_to(b) for f in b.rglob("*.safetensors")}
    tot, eq, differ = 0, 0, []
    for rel in sorted(fa | fb):
        if rel not in fa or rel not in fb:
            differ.append(f"{rel} (only in {'the first' if rel in fa else 'the second'})")
            continue
        with safe_open(a / rel, "pt") as x, safe_open(b / rel, "pt") as y:
            kx, ky = set(x.keys()), set(y.keys())
            for k in sorted(kx | ky):
                tot += 1
                if k in kx and k in ky and torch.equal(x.get_tensor(k), y.get_tensor(k)):
                    eq += 1
                elif len(differ) < 5:
                    differ.append(f"{rel}:{k}")
    return {"tensors": tot, "equal": eq, "differ": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="bench tag of the first set (its runs under the bench cache, its results JSON)")
    ap.add_argument("second")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where both tags' JSON results are")
    ap.add_argument("--out", default="compare")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    res_dir = Path(a.results_dir)
    r1 = json.loads((res_dir / f"{a.first}.json").read_text())["runs"]
    r2 = json.loads((res_dir / f"{a.second}.json").read_text())["runs"]
    rows = {}
    for name in r1:
        if name not in r2:
            continue
        d1, d2 = Path(r1[name]["dir"]), Path(r2[name]["dir"])
        c = compare_dirs(d1, d2)
        rows[name] = {**c, **{f"{k}_{t}": r[name].get(k) for t, r in (("first", r1), ("second", r2)) for k in ("perplexity", "kl", "quantize_s")}}
        print(name, f"{c['equal']}/{c['tensors']}", file=sys.stderr)
    (RESULTS / f"{a.out}.json").write_text(json.dumps({"first": a.first, "second": a.second, "cache": str(CACHE), "runs": rows}, indent=2))
    lines = [f"# {a.first} vs {a.second}: tensor by tensor", "", a.note, "",
             f"| run | tensors equal | perplexity {a.first} / {a.second} | KL {a.first} / {a.second} | differing (first 5) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['equal']}/{r['tensors']} | {r['perplexity_first']:.4f} / {r['perplexity_second']:.4f} | "
                     f"{r['kl_first']:.5f} / {r['kl_second']:.5f} | {', '.join(r['differ']) or '—'} |")
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
