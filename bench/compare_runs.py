"""Compare two sets of bench_methods.py runs tensor by tensor — e.g. the code before Engine 2 and now, on
the same inputs — and table which outputs are bit-identical, beside each run's evaluation.

    # the old code, from a checkout of it (its own bench_methods.py; the same venv)
    PYTHONPATH=OLD OLD_PY OLD/bench/bench_methods.py --tag six_old --results-dir R ... ; .venv/bin/python bench/bench_methods.py --tag six_new --results-dir R ...
    .venv/bin/python bench/compare_runs.py six_old six_new --results-dir R --out engine2_repro

Every ``*.safetensors`` file of each run directory (shards and qparams) is read and each tensor
compared with ``torch.equal`` (dtype and values); ``--rename OLD=NEW`` (repeatable) maps a substring
of the first set's tensor names to the second's, for a tensor that only changed its name (Engine 2's
low-rank encoding: LoRC's ``.lorc_a`` became ``.lowrank_a``). Writes bench/results/<out>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, write_results  # noqa: E402


def compare_dirs(a: Path, b: Path, rename: dict[str, str] | None = None) -> dict:
    """``{"tensors": n, "equal": k, "renamed": r, "differ": [first names]}`` over every safetensors file of
    two runs; ``rename`` maps substrings of the first run's tensor names to the second's."""
    fa = {f.relative_to(a) for f in a.rglob("*.safetensors")}
    fb = {f.relative_to(b) for f in b.rglob("*.safetensors")}
    tot, eq, renamed, differ = 0, 0, 0, []
    for rel in sorted(fa | fb):
        if rel not in fa or rel not in fb:
            differ.append(f"{rel} (only in {'the first' if rel in fa else 'the second'})")
            continue
        with safe_open(a / rel, "pt") as x, safe_open(b / rel, "pt") as y:
            kx, ky = set(x.keys()), set(y.keys())
            names = {}
            for k in kx:  # first name -> second name
                n = k
                for old, new in (rename or {}).items():
                    n = n.replace(old, new)
                names[k] = n
            unmatched = ky - set(names.values())
            for k in sorted(kx) + sorted(unmatched):
                tot += 1
                n = names.get(k)
                if n is not None and n in ky:
                    tx, ty = x.get_tensor(k), y.get_tensor(n)
                    if tx.dtype == ty.dtype and torch.equal(tx, ty):
                        eq += 1
                        renamed += n != k
                        continue
                if len(differ) < 5:
                    differ.append(f"{rel}:{k}" + ("" if n is not None else " (only in the second)"))
    return {"tensors": tot, "equal": eq, "renamed": renamed, "differ": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="bench tag of the first set (its runs under the bench cache, its results JSON)")
    ap.add_argument("second")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where both tags' JSON results are")
    ap.add_argument("--out", default="compare")
    ap.add_argument("--note", default="")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="a substring of the first set's tensor names and its replacement")
    a = ap.parse_args()
    res_dir = Path(a.results_dir)
    rename = dict(r.split("=", 1) for r in a.rename)
    r1 = json.loads((res_dir / f"{a.first}.json").read_text())["runs"]
    r2 = json.loads((res_dir / f"{a.second}.json").read_text())["runs"]
    rows = {}
    for name in r1:
        if name not in r2:
            continue
        d1, d2 = Path(r1[name]["dir"]), Path(r2[name]["dir"])
        c = compare_dirs(d1, d2, rename)
        rows[name] = {**c, **{f"{k}_{t}": r[name].get(k) for t, r in (("first", r1), ("second", r2)) for k in ("perplexity", "kl", "quantize_s")}}
        print(name, f"{c['equal']}/{c['tensors']}", file=sys.stderr)
    lines = [f"# {a.first} vs {a.second}: tensor by tensor", "", a.note, "",
             f"| run | tensors equal | perplexity {a.first} / {a.second} | KL {a.first} / {a.second} | differing (first 5) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        eqs = f"{r['equal']}/{r['tensors']}" + (f" ({r['renamed']} renamed)" if r["renamed"] else "")
        lines.append(f"| {name} | {eqs} | {r['perplexity_first']:.4f} / {r['perplexity_second']:.4f} | "
                     f"{r['kl_first']:.5f} / {r['kl_second']:.5f} | {', '.join(r['differ']) or '—'} |")
    write_results(a.out, {"first": a.first, "second": a.second, "cache": str(CACHE), "rename": rename, "runs": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
