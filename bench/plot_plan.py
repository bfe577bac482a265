"""Picture of a planner's per-layer plan: bits (and group size) of every layer group, block by block.

    MPLBACKEND=Agg .venv/bin/python bench/plot_plan.py REPORT_JSON OUT_PNG [RUN]

Reads the ``plan`` of a ``weightsmith quantize --target-bpw`` report (``report.json``), or with RUN
(``recipe@grid``) that run's plan in a bench results file (bench/results/NAME.json; runs since
bench_methods kept the plan's groups).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def plan_rows(report: dict) -> list[tuple[int, str, int, int]]:
    """(block, group label, bits, group size) per planned group, in layer order."""
    out = []
    for g in report["plan"]["groups"]:
        first = g["layers"][0]
        m = re.search(r"\.(\d+)\.", first)
        label = "+".join(n.rsplit(".", 1)[-1].replace("_proj", "") for n in g["layers"])
        out.append((int(m.group(1)) if m else -1, label, g["bits"], g["group_size"]))
    return out


def plot(report_path: Path, out: Path, run: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(Path(report_path).read_text())
    if run is not None:
        rep = rep["runs"][run]
    rows = plan_rows(rep)
    labels = sorted({r[1] for r in rows}, key=lambda l: [r[1] for r in rows].index(l))
    blocks = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, len(blocks) * 0.32), 3.2))
    width = 0.8 / len(labels)
    colors = {32: "tab:red", 64: "tab:blue", 128: "tab:green", -1: "tab:gray"}
    for k, lab in enumerate(labels):
        xs = [r[0] + (k - len(labels) / 2 + 0.5) * width for r in rows if r[1] == lab]
        ys = [r[2] for r in rows if r[1] == lab]
        cs = [colors.get(r[3], "black") for r in rows if r[1] == lab]
        ax.bar(xs, ys, width=width, color=cs, edgecolor="white", linewidth=0.3)
    p = rep["plan"]
    ax.set_title(f"bits per layer group (order per block: {', '.join(labels)}); target {p['target_bpw']} → {p['planned_bpw']:.3f} bits/weight",
                 fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("bits")
    ax.set_yticks(sorted({r[2] for r in rows}))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=f"group {g}") for g, c in colors.items() if any(r[3] == g for r in rows)], fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
