"""The run report: report.json (machine-readable), report.md (per-layer table) and a plot."""
from __future__ import annotations

import json
import logging
import platform
import resource
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def versions() -> dict:
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "weightsmith": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (2**20 if sys.platform == "darwin" else 1024), 1)


def summarize(layers: list[dict]) -> dict:
    if not layers:
        return {"layers": 0}
    err = [r["error"] for r in layers]
    rtn = [r["rtn_error"] for r in layers]
    better = sum(e <= r for e, r in zip(err, rtn))
    return {
        "layers": len(layers),
        "mean_error": sum(err) / len(err),
        "mean_rtn_error": sum(rtn) / len(rtn),
        "layers_at_or_below_rtn": better,
        "damping_escalated": [r["name"] for r in layers if r.get("damp_escalated")],
        "fallbacks": [{"name": r["name"], "why": r["fallback"]} for r in layers if r.get("fallback")],
    }


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    try:
        plot_layers(report.get("layers", []), out / "report.png")
    except ImportError:
        log.info("matplotlib not installed: no report.png")


def markdown(report: dict) -> str:
    cfg = report.get("config", {})
    lines = [
        f"# weightsmith quantize report",
        "",
        f"- model: `{report.get('model')}`",
        f"- method: `{json.dumps(cfg.get('method'))}`, grid: `{json.dumps(cfg.get('grid'))}`",
        f"- calibration: {report.get('calibration', {}).get('kind')} — {json.dumps(report.get('calibration'))}",
        f"- wall time: {report.get('wall_time_s')} s, peak RSS: {report.get('peak_rss_mb')} MB",
        "",
        "| layer | shape | error ‖ΔWX‖²/‖WX‖² | RTN error | ratio | damping |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.get("layers", []):
        ratio = r["error"] / r["rtn_error"] if r["rtn_error"] else float("nan")
        lines.append(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['error']:.3e} | {r['rtn_error']:.3e} | {ratio:.2f} | {r.get('damp')} |")
    return "\n".join(lines) + "\n"


def plot_layers(layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layers:
        return
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.05), 3.5))
    x = range(len(layers))
    ax.semilogy(x, [r["rtn_error"] for r in layers], ".", label="RTN", alpha=0.7)
    ax.semilogy(x, [r["error"] for r in layers], ".", label="method", alpha=0.7)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("‖ΔW X‖² / ‖W X‖²")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
