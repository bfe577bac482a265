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
    """Storage over all compressed layers: total bits / total weights, and the parts (see ``encodings.layer_bits``)."""
    rows = [r for r in layers if "bits" in r]
    if not rows:
        return {}
    numel = sum(r["shape"][0] * r["shape"][1] for r in rows)
    parts: dict[str, int] = {}
    for r in rows:
        for k, v in r["bits"].items():
            parts[k] = parts.get(k, 0) + v
    return {"bits_per_weight": sum(parts.values()) / numel, "bits_per_weight_parts": {k: v / numel for k, v in parts.items()}}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(layers: list[dict], steps: list | None = None) -> dict:
    """The report's summary; each step of the recipe may add entries of its own (``Step.summary``)."""
    done = [r for r in layers if not r.get("skipped")]
    if not done:
        return {"layers": 0, "skipped_layers": len(layers)}
    out: dict = {**bits_summary(done), "layers": len(done), "mean_weight_error": _mean([r["weight_error"] for r in done if "weight_error" in r])}
    err = [r for r in done if "error" in r]
    if err:
        out["mean_error"] = _mean([r["error"] for r in err])
    rtn = [r for r in done if "rtn_error" in r]
    if rtn:
        out["mean_rtn_error"] = _mean([r["rtn_error"] for r in rtn])
        out["layers_at_or_below_rtn"] = sum(r["error"] <= r["rtn_error"] for r in rtn)
    if len(done) < len(layers):
        out["skipped_layers"] = len(layers) - len(done)
    measured = [r for r in done if "measured_density" in r]
    if measured:  # from the weights written: overall density and the N:M patterns the layers satisfy
        from .prune.check import summarize as sparsity_summary

        out["sparsity"] = sparsity_summary([{"density": r["measured_density"], "nm": r["nm"], "shape": r["shape"]} for r in measured],
                                           lambda r: r["shape"][0] * r["shape"][1])
    out["damping_escalated"] = [r["name"] for r in done if r.get("damp_escalated")]
    out["fallbacks"] = [{"name": r["name"], "why": r["fallback"]} for r in done if r.get("fallback")]
    from .quant import registry

    for st in steps or []:
        spec = registry.get(st.name)
        if spec.summary is not None:
            out.update(spec.summary(done))
    return out


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(dumps(report, indent=2, default=str))  # valid JSON: NaN/Inf written as null
    (out / "report.md").write_text(markdown(report))
    try:
        plot_layers(report.get("layers", []), out / "report.png")
    except ImportError:
        log.info("matplotlib not installed: no report.png")


def _num(v, fmt: str = ".3e") -> str:
    return "" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    from .quant import registry

    cfg = report.get("config", {})
    steps = cfg.get("steps", [])
    cells = [(s["name"], registry.get(s["name"]).cell) for s in steps if registry.get(s["name"]).cell is not None]
    pruned = any("density" in r for r in report.get("layers", []))  # a pruner ran (its mask density)
    head = ["layer", "shape", "grid", "error ‖ΔWX‖²/‖WX‖²", "RTN error", "ratio", "weight error ‖ΔW‖²/‖W‖²", "damping", "bits/weight"] + \
        (["density", "N:M"] if pruned else []) + [n for n, _ in cells]
    lines = [
        "# weightsmith quantize report",
        "",
        f"- model: `{report.get('model')}`",
        f"- recipe: `{json.dumps(steps)}`, grid: `{json.dumps(cfg.get('grid'))}`" + (f", {len(cfg.get('rules', []))} per-layer rules" if cfg.get("rules") else ""),
        f"- bits per weight: {report.get('summary', {}).get('bits_per_weight')}",
        *([f"- measured density (nonzero share of the layers written): {sp['density']:.4f}; first N:M pattern satisfied, "
           f"matrices: {json.dumps(sp['nm'])}"] if (sp := report.get('summary', {}).get('sparsity')) and pruned else []),
        f"- calibration: {report.get('calibration', {}).get('kind')} — {json.dumps(report.get('calibration'))}",
        f"- wall time: {report.get('wall_time_s')} s, peak RSS: {report.get('peak_rss_mb')} MB",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report.get("layers", []):
        if r.get("skipped"):
            lines.append(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | float (rule: skip) |" + " |" * (len(head) - 3))
            continue
        ratio = r["error"] / r["rtn_error"] if r.get("rtn_error") and "error" in r else None
        g = r.get("grid")
        grid = f"W{g['bits']} g{g['group_size']} {'sym' if g['sym'] else 'asym'}" if g else "float"
        row = [r["name"], f"{r['shape'][0]}×{r['shape'][1]}", grid, _num(r.get("error")), _num(r.get("rtn_error")), _num(ratio, ".2f"),
               _num(r.get("weight_error")), str(r.get("damp", "")), _num(r.get("bits_per_weight"), ".3f")]
        if pruned:
            row += [_num(r.get("measured_density"), ".4f"), (r.get("nm") or ["none"])[0]]
        row += [cell(r).replace("|", "/") for _, cell in cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_layers(layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layers:
        return
    rows = [r for r in layers if "error" in r or "weight_error" in r]
    if not rows:
        return
    key = "error" if all("error" in r for r in rows) else "weight_error"
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.05), 3.5))
    x = range(len(rows))
    if all("rtn_error" in r for r in rows):
        ax.semilogy(x, [r["rtn_error"] for r in rows], ".", label="RTN", alpha=0.7)
    ax.semilogy(x, [max(r[key], 1e-12) for r in rows], ".", label="recipe", alpha=0.7)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("‖ΔW X‖² / ‖W X‖²" if key == "error" else "‖ΔW‖² / ‖W‖²")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
