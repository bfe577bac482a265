"""Re-plan a finished ``--target-bpw`` run from its stored measurements (``OUT/plan.json``) with other
planner settings — candidate subsets, the other objective — and run the second pass only (the recipe
with the new plan's per-layer rules), then evaluate by the protocol. Measurements are taken once.

    .venv/bin/python bench/bench_replan.py RUN_DIR --variant NAME:bits=3,4,8:objective=relative [...] --tag replan

``--recipe STEPS`` applies the plans with other steps than the run's (the step grammar, e.g. ``gptq``):
the measurements are the planner's (plain GPTQ with the recipe quantizer's options), so one first
pass serves the GPTQ family's recipes alike.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, RESULTS, eval_many, run_cli, smollm2_float_dir  # noqa: E402


def main() -> None:
    from weightsmith.quant.bitalloc import BitAllocConfig, plan

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--variant", action="append", required=True, help="NAME:bits=3,4,8:group_sizes=32,64,128:objective=relative")
    ap.add_argument("--tag", default="replan")
    ap.add_argument("--recipe", help="steps to apply the plans with (default: the run's own, less the planner)")
    a = ap.parse_args()
    run = Path(a.run)
    saved = json.loads((run / "plan.json").read_text())
    rep = json.loads((run / "report.json").read_text())
    planner = next(s for s in rep["config"]["steps"] if s["name"] == "bitalloc")
    rest = [s for s in rep["config"]["steps"] if s["name"] != "bitalloc"]
    if a.recipe:
        from weightsmith.config import parse_steps

        rest = parse_steps(a.recipe)
    work = CACHE / a.tag
    work.mkdir(parents=True, exist_ok=True)
    float_dir = smollm2_float_dir()
    outs, info = {}, {}
    for v in a.variant:
        name, *opts = v.split(":")
        kw = dict(planner)
        for o in opts:
            k, _, val = o.partition("=")
            kw[k] = [int(x) for x in val.split(",")] if k in ("bits", "group_sizes") else val
        cfg = BitAllocConfig(**{k: x for k, x in kw.items() if k != "name"})
        ms = [{**g, "measure": [o for o in g["measure"] if o["bits"] in cfg.bits and o["group_size"] in cfg.group_sizes]} for g in saved["measurements"]]
        rules, summary = plan(ms, cfg)
        out = work / name
        rfile = work / f"{name}.yaml"
        rfile.write_text(yaml.safe_dump({"method": rest, "grid": rep["config"]["grid"], "rules": rules}))
        run_cli(["quantize", str(float_dir), str(out), "--recipe", str(rfile), "--calib", str(CALIB), "--nsamples", "128", "--seqlen", "512",
                 "--overwrite", "--quiet"], work / f"{name}.log")
        r = json.loads((out / "report.json").read_text())
        outs[name] = out
        info[name] = {"planner": cfg.model_dump(), "recipe": rest, "planned_bpw": summary["planned_bpw"], "share_of_weights": summary["share_of_weights"],
                      "bits_per_weight": r["summary"]["bits_per_weight"], "quantize_s": r["wall_time_s"]}
    ev = eval_many(outs, float_dir, EVAL)
    for n in info:
        info[n].update(ev[n])
    (RESULTS / f"{a.tag}.json").write_text(json.dumps(info, indent=2))
    lines = ["| variant | candidates | objective | bits/weight | perplexity | KL | top-1 | shares of weights |", "|---|---|---|---|---|---|---|---|"]
    for n, r in info.items():
        p = r["planner"]
        lines.append(f"| {n} | bits {p['bits']} × g {p['group_sizes']} | {p['objective']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['kl']:.4f} | {r['top1']:.4f} | {', '.join(f'{k} {v:.1%}' for k, v in r['share_of_weights'].items())} |")
    (RESULTS / f"{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
