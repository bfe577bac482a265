"""weightsmith merge side by side with mergekit (``mergekit-yaml``, in its own venv) on the methods
both have: the largest difference between the merged tensors, wall time and peak RSS of each tool's
process (``/usr/bin/time -v``), on one synthetic Llama-style base and ``--models`` "fine-tunes"
(the base plus seeded N(0, σ²) noise, σ = 0.1 × the weights' scale, so the models are close as
fine-tunes are: cosines ~0.995, below SLERP's colinear threshold).

Run by hand (the merge runs are single-threaded, ``OMP_NUM_THREADS=1``, for both tools):

    python bench/bench_merge.py                                   # smoke size: 4 layers, hidden 768 (~410 MB a model)
    python bench/bench_merge.py --layers 36 --hidden 4096 --intermediate 11008 --heads 32 --name merge_30gb  # 30 GB a model

Writes ``bench/results/<name>.json`` and ``.md``. DARE draws random numbers (each tool its own),
so its tensors are not compared, only its time and memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from make_synthetic import llama_tensors, write_shard  # noqa: E402

METHODS = {
    "linear": "models:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n  - model: {m0}\n    parameters: {{weight: 0.6}}\n{rest_linear}",
    "slerp": "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {m0}\nparameters:\n  t: [0.1, 0.5, 0.9]\n",
    "task_arithmetic": "base_model: {base}\nmodels:\n{tvs}parameters:\n  lambda: 0.8\n",
    "ties": "base_model: {base}\nmodels:\n{tvs_density}parameters:\n  normalize: true\n",
    "dare_ties": "base_model: {base}\nmodels:\n{tvs_density}",
    "model_stock": "base_model: {base}\nmodels:\n{plain}",
}
RANDOM = {"dare_ties", "dare_linear"}


def make_base(d: Path, layers: int, hidden: int, inter: int, heads: int, vocab: int) -> None:
    d.mkdir(parents=True)
    tensors = llama_tensors(layers, hidden, inter, heads, heads, vocab)
    total = write_shard(d / "model-00001-of-00001.safetensors", tensors, torch.float32, seed=0)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {t[0]: "model-00001-of-00001.safetensors" for t in tensors}}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden // heads,
           "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def make_variant(base: Path, d: Path, seed: int, sigma: float = 0.002) -> None:
    """``base`` + N(0, σ²) per tensor, streamed tensor by tensor."""
    from weightsmith.model.saving import ShardWriter
    from weightsmith.model.source import CheckpointSource

    d.mkdir(parents=True)
    with CheckpointSource(base) as src:
        keys = src.keys()
        w = ShardWriter(d, 1)
        f = w.stream(0, [(k, src.dtype(k), src.shape(k)) for k in keys])
        for i, k in enumerate(keys):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            t = src.get(k).clone()
            f.write(k, t.add_(torch.randn(t.shape, generator=g), alpha=sigma))
        f.close()
        w.finish()
    shutil.copy2(base / "config.json", d / "config.json")


def config_text(method: str, base: Path, models: list[Path]) -> str:
    tvs = "".join(f"  - model: {m}\n    parameters: {{weight: {0.5 + 0.25 * i}}}\n" for i, m in enumerate(models))
    tvs_density = "".join(f"  - model: {m}\n    parameters: {{weight: {0.5 + 0.25 * i}, density: {0.3 + 0.2 * i}}}\n" for i, m in enumerate(models))
    plain = "".join(f"  - model: {m}\n" for m in models)
    rest = "".join(f"  - model: {m}\n    parameters: {{weight: 0.3}}\n" for m in models[1:])
    body = METHODS[method].format(base=base, m0=models[0], tvs=tvs, tvs_density=tvs_density, plain=plain, rest_linear=rest)
    return f"merge_method: {method}\ndtype: float32\n" + body


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: its wall time and the peak RSS of its process tree's largest process."""
    t0 = time.time()
    with open(log, "w") as fh:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"ok": p.returncode == 0, "returncode": p.returncode, "wall_s": round(wall, 2),
            "peak_rss_mb": round(int(m.group(1)) / 1024, 1) if m else None, "log": str(log)}


def max_diff(a: Path, b: Path) -> dict:
    from weightsmith.model.source import CheckpointSource

    with CheckpointSource(a) as x, CheckpointSource(b) as y:
        ka, kb = set(x.keys()), set(y.keys())
        worst, where = 0.0, None
        for k in sorted(ka & kb):
            d = (x.get(k).double() - y.get(k).double()).abs().max().item() if x.get(k).numel() else 0.0
            if d > worst:
                worst, where = d, k
        return {"max_abs_diff": worst, "at": where, "only_ours": sorted(ka - kb)[:5], "only_mergekit": sorted(kb - ka)[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--models", type=int, default=3, help="fine-tunes besides the base (default 3)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit", default=os.environ.get("WEIGHTSMITH_MERGEKIT_YAML", "/work/venvs/mergekit/bin/mergekit-yaml"))
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("WEIGHTSMITH_BENCH_CACHE", Path.home() / ".cache/weightsmith/bench")) / "merge")
    ap.add_argument("--name", default="merge_smoke")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models and outputs")
    a = ap.parse_args()

    tag = f"l{a.layers}-h{a.hidden}-i{a.intermediate}-v{a.vocab}"
    work = a.workdir / tag
    base = work / "base"
    if not (base / "config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        make_base(base, a.layers, a.hidden, a.intermediate, a.heads, a.vocab)
    models = []
    for i in range(a.models):
        m = work / f"ft{i}"
        if not (m / "config.json").is_file():
            shutil.rmtree(m, ignore_errors=True)
            make_variant(base, m, seed=i + 1)
        models.append(m)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    have_mk = Path(a.mergekit).is_file()
    rows = []
    for method in a.methods.split(","):
        cfg = work / f"{method}.yaml"
        cfg.write_text(config_text(method, base, models))
        ours_out, mk_out = work / f"out-{method}-ours", work / f"out-{method}-mergekit"
        for o in (ours_out, mk_out):
            shutil.rmtree(o, ignore_errors=True)
        ours = timed([sys.executable, "-m", "weightsmith", "merge", str(cfg), str(ours_out), "--quiet", "--seed", "0"], work / f"{method}-ours.log", env)
        row = {"method": method, "ours": ours}
        if have_mk:
            mk = timed([a.mergekit, str(cfg), str(mk_out), "--quiet", "--random-seed", "0"], work / f"{method}-mergekit.log", env)
            row["mergekit"] = mk
            if ours["ok"] and mk["ok"] and method not in RANDOM:
                row["compare"] = max_diff(ours_out, mk_out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if not a.keep:
            for o in (ours_out, mk_out):
                shutil.rmtree(o, ignore_errors=True)
    import platform

    payload = {"size": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate, "vocab": a.vocab,
                        "bytes_per_model": model_bytes, "fine_tunes": a.models},
               "threads": 1, "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows,
               "mergekit": a.mergekit if have_mk else None}
    lines = [f"# weightsmith merge vs mergekit ({a.name})", "",
             f"Synthetic Llama ({a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, vocab {a.vocab}, float32): "
             f"{model_bytes / 1e6:.0f} MB a model; base + {a.models} fine-tunes (base + N(0, 0.002²)); `dtype: float32`; "
             "one thread each (`OMP_NUM_THREADS=1`); wall time and peak RSS of each process from `/usr/bin/time -v`.", "",
             "| method | max abs diff | ours s | mergekit s | ours peak RSS MB | mergekit peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mk = r.get("mergekit", {})
        diff = ("random (not compared)" if r["method"] in RANDOM else
                f"{r['compare']['max_abs_diff']:.2e}" if "compare" in r else "—")
        ok = lambda x: "" if x.get("ok", True) else " (failed)"  # noqa: E731
        lines.append(f"| {r['method']} | {diff} | {r['ours']['wall_s']}{ok(r['ours'])} | {mk.get('wall_s', '—')}{ok(mk)} | "
                     f"{r['ours']['peak_rss_mb']} | {mk.get('peak_rss_mb', '—')} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
