"""Perplexity against bits per weight, from bench/results/methods.json (written by bench_methods.py).

    python bench/plot_methods.py [methods.json] [out.png]

Reads runs as in the other bench results: ``{"float_perplexity": ..., "runs": {label: {...}}}`` (a list
of runs works too). A run needs ``perplexity`` and ``bits_per_weight`` (also read: ``bpw``, or the
report's ``summary.bits_per_weight``); runs of one recipe (``recipe``, else ``method``) form one series.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _bpw(run: dict) -> float | None:
    for k in ("bits_per_weight", "bpw"):
        if run.get(k) is not None:
            return float(run[k])
    s = run.get("summary") or {}
    return float(s["bits_per_weight"]) if s.get("bits_per_weight") is not None else None


def series(payload: dict) -> dict[str, list[tuple[float, float, str]]]:
    """``{recipe: [(bits per weight, perplexity, label), ...]}`` sorted by bits per weight."""
    runs = payload.get("runs", payload)
    items = runs.items() if isinstance(runs, dict) else ((r.get("label", str(i)), r) for i, r in enumerate(runs))
    out: dict[str, list] = {}
    for label, r in items:
        if not isinstance(r, dict) or r.get("perplexity") is None:
            continue
        b = _bpw(r)
        if b is None:
            continue
        out.setdefault(str(r.get("recipe") or r.get("method") or label), []).append((b, float(r["perplexity"]), str(label)))
    return {k: sorted(v) for k, v in out.items()}


def plot(src: Path = RESULTS / "methods.json", dst: Path = RESULTS / "methods_ppl_vs_bpw.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(Path(src).read_text())
    data = series(payload)
    if not data:
        raise SystemExit(f"{src}: no run has both perplexity and bits_per_weight")
    fp = payload.get("float_perplexity")
    top = 10 * float(fp) if fp else None  # a collapsed run (RTN at 2 bits: ~6e5) would flatten the rest: clip and label it
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>ph*X"
    stacked: dict[float, int] = {}  # clipped labels per bits-per-weight position
    for i, (name, pts) in enumerate(sorted(data.items())):
        ys = [min(p[1], top) if top else p[1] for p in pts]
        ax.plot([p[0] for p in pts], ys, marker=markers[i % len(markers)], ls="-", label=name, alpha=0.85)
        for p, y in zip(pts, ys):
            if y < p[1]:
                stacked[p[0]] = stacked.get(p[0], 0) + 1  # collapsed runs at one bits/weight share the clipped point
                ax.annotate(f"{name} {p[1]:.3g} (off scale)", (p[0], y), fontsize=7, textcoords="offset points", xytext=(4, -10 * stacked[p[0]]))
    if top:
        ax.set_ylim(top=top * 1.15)
    if fp:
        ax.axhline(float(fp), color="k", ls="--", lw=1, label=f"float32 ({float(fp):.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (weights + 16-bit scales + zeros + g_idx + low-rank factors)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("SmolLM2-135M, WikiText-2 protocol: perplexity vs storage", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    plt.close(fig)
    return Path(dst)


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    print(plot(*args))
