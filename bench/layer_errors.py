"""Per-layer errors of two or more quantize runs side by side, by layer kind and by block.

    .venv/bin/python bench/layer_errors.py RUN_A RUN_B [...] [--names A,B] [--out TAG]

Each RUN is a ``weightsmith quantize`` output directory (or its report.json). For every layer kind
(the last part of the layer's name: q_proj, down_proj, ...) and for every block the mean relative
output error ‖ΔW X‖²/‖W X‖² of each run is printed (and written to bench/results/TAG.md/.json with
``--out``), together with the ratio of each run to the first. The mean over all layers hides where
two recipes differ; this shows it (used for the joint-pruning gap, README "Joint pruning").
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def load(path: str) -> dict[str, dict]:
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise SystemExit(f"error: no report at {p}")
    rows = json.loads(p.read_text())["layers"]
    return {r["name"]: r for r in rows if "error" in r}


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def table(runs: list[dict[str, dict]], names: list[str], key) -> list[list]:
    common = set.intersection(*(set(r) for r in runs))
    if not common:
        raise SystemExit("error: the runs share no layer with an error")
    groups = defaultdict(list)
    for n in common:
        groups[key(runs[0][n])].append(n)
    out = []
    for g in sorted(groups, key=lambda g: (isinstance(g, str), g)):
        vals = [mean([r[n]["error"] for n in groups[g]]) for r in runs]
        out.append([g, len(groups[g])] + vals + [v / vals[0] for v in vals[1:]])
    vals = [mean([r[n]["error"] for n in common]) for r in runs]
    out.append(["all", len(common)] + vals + [v / vals[0] for v in vals[1:]])
    return out


def markdown(rows, names, first) -> str:
    head = [first, "layers"] + [f"{n} error" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[0]), str(r[1])] + [f"{v:.3e}" for v in r[2:2 + len(names)]] + [f"{v:.3f}" for v in r[2 + len(names):]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="quantize output directories or report.json files (the first is the reference)")
    ap.add_argument("--names", help="comma-separated labels, one per run")
    ap.add_argument("--out", help="write bench/results/OUT.md and OUT.json")
    a = ap.parse_args(argv)
    if len(a.runs) < 2:
        raise SystemExit("error: give at least two runs")
    names = a.names.split(",") if a.names else [Path(r).name for r in a.runs]
    if len(names) != len(a.runs):
        raise SystemExit("error: --names needs one label per run")
    runs = [load(r) for r in a.runs]
    by_kind = table(runs, names, lambda r: r["name"].rsplit(".", 1)[-1])
    by_block = table(runs, names, lambda r: r["block"])
    text = ("## By layer kind\n\n" + markdown(by_kind, names, "kind") + "\n\n## By block\n\n" + markdown(by_block, names, "block") + "\n")
    print(text)
    if a.out:
        write_results(a.out, {"names": names, "runs": a.runs, "by_kind": by_kind, "by_block": by_block},
                      f"# Per-layer errors: {', '.join(names)}\n\nRuns: {', '.join(a.runs)}\n"
                      f"(relative output error ‖ΔW X‖²/‖W X‖² on the quantized-path inputs; "
                      f"`python bench/layer_errors.py {' '.join(sys.argv[1:])}`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
