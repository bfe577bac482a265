"""Export benchmark (issue 5): SmolLM2-135M GPTQ W4 g64 (protocol of bench/PROTOCOL.md) exported
to compressed-tensors, GPTQ format and GGUF Q4_0; size on disk, export time, load time (fresh process)
and perplexity of each as loaded back by its own loader.

    .venv/bin/python bench/bench_export.py

Reuses ~/.cache/weightsmith/bench/foundation/GPTQ_W4_g64 when its report shows the same protocol
(GPTQ, W4 g64 sym, wiki.calib.txt 128×512); quantizes it otherwise. Writes bench/results/export.json/md.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, ROOT, eval_many, run_cli, smollm2_float_dir, write_results  # noqa: E402

LOAD = """
import sys, time, torch
t = time.time()
from weightsmith.eval.loading import load_for_eval
t_import = time.time()
m, tok, kind = load_for_eval(sys.argv[1], progress=False)
print(time.time() - t_import)
"""


def _quantized(float_dir: Path, work: Path) -> Path:
    cached = CACHE / "foundation" / "GPTQ_W4_g64"
    if (cached / "report.json").is_file():
        c = json.loads((cached / "report.json").read_text())["config"]
        if (c["method"]["name"], c["grid"]["bits"], c["grid"]["group_size"], c["grid"]["sym"], Path(c["calib"]["path"]).name,
                c["calib"]["nsamples"], c["calib"]["seqlen"]) == ("gptq", 4, 64, True, CALIB.name, 128, 512):
            return cached
    out = work / "GPTQ_W4_g64"
    run_cli(["quantize", str(float_dir), str(out), "--calib", str(CALIB), "--method", "gptq", "--no-act-order",
             "--bits", "4", "--group-size", "64", "--overwrite", "--quiet"], work / "quantize.log")
    return out


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _load_seconds(p: Path) -> float:
    r = subprocess.run([sys.executable, "-c", LOAD, str(p)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from weightsmith.demo import smollm2_gguf
    from weightsmith.export import export

    float_dir = smollm2_float_dir()
    work = CACHE / "export"
    work.mkdir(parents=True, exist_ok=True)
    q = _quantized(float_dir, work)
    targets = {"compressed-tensors": (work / "w4g64-ct", {}), "gptq": (work / "w4g64-gptq", {}),
               "gguf": (work / "w4g64-q4_0.gguf", {"gguf_template": smollm2_gguf()})}
    rows = {"float32": {"path": str(float_dir), "bytes": _size(float_dir)},
            "dequantized (weightsmith)": {"path": str(q), "bytes": _size(q)}}
    for fmt, (out, kw) in targets.items():
        t = time.time()
        info = export(q, out, fmt, overwrite=True, **kw)
        rows[fmt] = {"path": str(out), "bytes": info["bytes"], "export_s": round(time.time() - t, 2),
                     **{k: v for k, v in info.items() if k in ("gguf_type", "group_size_written", "checkpoint_format")}}
        print(f"exported {fmt}: {info['bytes'] / 1e6:.1f} MB in {rows[fmt]['export_s']} s", file=sys.stderr, flush=True)
    shipped = smollm2_gguf()
    rows["llama.cpp Q4_1 (shipped, the float model's source)"] = {"path": str(shipped), "bytes": _size(shipped)}
    for name, r in rows.items():
        r["load_s"] = round(_load_seconds(Path(r["path"])), 2)
        print(f"loaded {name} in {r['load_s']} s", file=sys.stderr, flush=True)
    shipped_name = "llama.cpp Q4_1 (shipped, the float model's source)"
    # the shipped file's weights are the float model's (it was dequantized from it): not evaluated again
    models = {name: Path(r["path"]) for name, r in rows.items() if name not in ("float32", shipped_name)}
    ev = eval_many(models, float_dir, EVAL)
    for name, e in ev.items():
        rows[name].update({"perplexity": e["perplexity"], "kl_vs_float": e["kl"], "top1_vs_float": e["top1"]})
    rows["float32"]["perplexity"] = rows[shipped_name]["perplexity"] = next(iter(ev.values()))["reference_perplexity"]
    lines = ["SmolLM2-135M, GPTQ W4 g64 symmetric (128×512 wiki.calib), perplexity on the first 64×512 tokens of wiki.eval "
             "(protocol of bench/PROTOCOL.md), float32 on CPU, 2 cores. Load time: `load_for_eval` in a fresh process "
             "(compressed-tensors and GGUF through transformers; GPTQ through weightsmith's unpacker, GPTQModel not installed).", "",
             "| model | size on disk MB | export s | load s | perplexity | KL vs float | top-1 vs float |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        kl = "–" if r.get("kl_vs_float") is None else f"{r['kl_vs_float']:.4f}"
        top1 = "–" if r.get("top1_vs_float") is None else f"{r['top1_vs_float']:.4f}"
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r.get('export_s', '–')} | {r['load_s']} | {r['perplexity']:.3f} | {kl} | {top1} |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("export", {"quantized": str(q), "rows": rows}, table)


if __name__ == "__main__":
    main()
