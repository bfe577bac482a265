"""The run report: report.json (machine-readable), report.md (per-layer table) and a plot."""
from __future__ import annotations

import json
import logging
import platform
import resource
import sys
from pathlib import Path

from .validate import dumps

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


def bits_summary(layers: list[dict]) -> dict:
    """Storage over all quantized layers: total bits / total weights, and the parts (see ``quant.pipeline.bits_per_weight``)."""
    rows = [r for r in layers if "bits" in r]
    if not rows:
        return {}
    numel = sum(r["shape"][0] * r["shape"][1] for r in rows)
    parts: dict[str, int] = {}
    for r in rows:
        for k, v in r["bits"].items():
            parts[k] = parts.get(k, 0) + v
    return {"bits_per_weight": sum(parts.values()) / numel, "bits_per_weight_parts": {k: v / numel for k, v in parts.items()}}


def summarize(layers: list[dict]) -> dict:
    if not layers:
        return {"layers": 0}
    err = [r["error"] for r in layers]
    rtn = [r["rtn_error"] for r in layers]
    better = sum(e <= r for e, r in zip(err, rtn))
    awq = [r["awq"] for r in layers if isinstance(r.get("awq"), dict)]
    extra = {}
    if awq:
        extra["awq_scaled_layers"] = sum(1 for a in awq if "folded_into" in a)
        extra["awq_unscaled"] = [{"name": r["name"], "why": r["awq"].get("skipped") or r["awq"]["dropped"]}
                                 for r in layers if {"skipped", "dropped"} & set(r.get("awq") or {})]
    return {**bits_summary(layers), **extra,
        "layers": len(layers),
        "mean_error": sum(err) / len(err),
        "mean_rtn_error": sum(rtn) / len(rtn),
        "layers_at_or_below_rtn": better,
        "damping_escalated": [r["name"] for r in layers if r.get("damp_escalated")],
        "fallbacks": [{"name": r["name"], "why": r["fallback"]} for r in layers if r.get("fallback")],
    }


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(dumps(report, indent=2, default=str))  # valid JSON: NaN/Inf written as null
    (out / "report.md").write_text(markdown(report))
    try:
        plot_layers(report.get("layers", []), out / "report.png")
    except ImportError:
        log.info("matplotlib not installed: no report.png")


def markdown(report: dict) -> str:
    cfg = report.get("config", {})
    lines = [
        "# weightsmith quantize report",
        "",
        f"- model: `{report.get('model')}`",
        f"- method: `{json.dumps(cfg.get('method'))}`, grid: `{json.dumps(cfg.get('grid'))}`",
        f"- recipe steps: `{json.dumps([*cfg.get('transforms', []), cfg.get('method'), *cfg.get('corrections', [])])}`",
        f"- bits per weight: {report.get('summary', {}).get('bits_per_weight')}",
        f"- calibration: {report.get('calibration', {}).get('kind')} — {json.dumps(report.get('calibration'))}",
        f"- wall time: {report.get('wall_time_s')} s, peak RSS: {report.get('peak_rss_mb')} MB",
        "",
        "| layer | shape | error ‖ΔWX‖²/‖WX‖² | RTN error | ratio | damping | bits/weight | AWQ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.get("layers", []):
        ratio = r["error"] / r["rtn_error"] if r["rtn_error"] else float("nan")
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        lines.append(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['error']:.3e} | {r['rtn_error']:.3e} | {ratio:.2f} | {r.get('damp')} | {bpw} | {_awq_cell(r.get('awq'))} |")
    return "\n".join(lines) + "\n"


def _awq_cell(a) -> str:
    if not isinstance(a, dict):
        return ""
    if "skipped" in a or "dropped" in a:
        return "unscaled: " + str(a.get("skipped") or a["dropped"]).replace("|", "/")
    return f"α={a.get('alpha')} → {a.get('folded_into', '?')}"


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
