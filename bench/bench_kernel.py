"""Lookup-table kernel benchmark (issue 17): SmolLM2-135M quantized with RTN at W4/W3/W2 g64, greedy
batch-1 decoding (64-token prompt, 128 new tokens) through the dequantized float32 path in torch and
through the kernel (table passes 1 = int8 tables and 2 = int8 + residual), 1 and 2 threads, same
model, prompt and threads; plus perplexity and KL of the kernel against the dequantized model on
the protocol's evaluation windows.

    .venv/bin/python bench/bench_kernel.py                       # the full protocol
    .venv/bin/python bench/bench_kernel.py --smoke               # < 2 min: W4 and W2, 32 new tokens, 2 windows

Writes bench/results/kernel.json/md (``--out NAME`` for another name). Run on an idle machine: the
numbers are wall-clock tokens/s.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, run_cli, smollm2_float_dir, write_results  # noqa: E402


def _quantized(float_dir: Path, bits: int, gs: int) -> Path:
    out = CACHE / "kernel" / f"RTN_W{bits}_g{gs}"
    if not (out / "report.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_cli(["quantize", str(float_dir), str(out), "--calib", str(CALIB), "--method", "rtn", "--bits", str(bits),
                 "--group-size", str(gs), "--nsamples", "16", "--seqlen", "256", "--overwrite", "--quiet"], out.parent / f"W{bits}.log")
    return out


def _ppl(model, windows: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    nll, logits = 0.0, []
    with torch.inference_mode():
        for w in windows:
            lg = model(input_ids=w[None], use_cache=False).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(lg, w[1:], reduction="sum"))
            logits.append(lg)
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))), logits


def _kl(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    tot = 0.0
    for a, b in zip(ref, got):
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        tot += float((la.exp() * (la - lb)).sum(-1).mean())
    return tot / len(ref)


def bench_one(qdir: Path, threads: list[int], passes: list[int], prompt_tokens: int, new_tokens: int, ppl_windows: int, seqlen: int) -> dict:
    from weightsmith.calib import read_calibration_text, tokenize_text
    from weightsmith.export.common import QuantizedCheckpoint
    from weightsmith.kernels import lut, set_num_threads, set_table_passes
    from weightsmith.kernels.runtime import greedy, load_float, prompt_ids, swap_quantized_layers

    model, tok = load_float(qdir)
    ids = prompt_ids(tok, prompt_tokens, model.config.vocab_size)
    res: dict = {"model": qdir.name, "runs": []}

    def decode(tag, th, ps=None):
        torch.set_num_threads(th)
        set_num_threads(th)
        if ps:
            set_table_passes(ps)
        greedy(model, ids[:, :8], 4)  # warm-up
        toks, tp, td = greedy(model, ids, new_tokens)
        run = {"path": tag, "threads": th, "table_passes": ps, "decode_tokens_per_s": round((new_tokens - 1) / td, 2),
               "prompt_tokens_per_s": round(prompt_tokens / tp, 1)}
        res["runs"].append(run)
        print(json.dumps({"model": qdir.name, **run}), file=sys.stderr, flush=True)
        return toks

    windows = None
    if ppl_windows:
        text_ids = tokenize_text(tok, read_calibration_text(EVAL))
        windows = torch.stack([text_ids[i * seqlen : (i + 1) * seqlen] for i in range(ppl_windows)])
        torch.set_num_threads(max(threads))
        res["dequant_ppl"], ref_logits = _ppl(model, windows)
    ref_tokens = {th: decode("dequant", th) for th in threads}
    with QuantizedCheckpoint(qdir) as ckpt:
        res.update(swap_quantized_layers(model, ckpt))
    res["kernel"] = lut.isa()
    for ps in passes:
        for th in threads:
            got = decode("kernel", th, ps)
            diff = (got != ref_tokens[th]).nonzero()
            res["runs"][-1]["greedy_same_prefix"] = int(diff[0, 0]) if diff.numel() else new_tokens
        if windows is not None:
            set_table_passes(ps)
            torch.set_num_threads(max(threads))
            set_num_threads(max(threads))
            p, lg = _ppl(model, windows)
            res[f"kernel_p{ps}_ppl"], res[f"kernel_p{ps}_kl"] = p, _kl(ref_logits, lg)
    return res


def table(results: list[dict], meta: dict) -> str:
    lines = [f"# Lookup-table kernel: decode tokens/s, SmolLM2-135M RTN g{meta['group_size']}",
             "", f"{meta['cpu']}; {meta['prompt_tokens']}-token prompt, {meta['new_tokens']} new tokens, greedy, batch 1. "
             f"{meta.get('note', '')}", "",
             "| model | threads | dequant f32 tok/s | kernel p1 tok/s (×) | kernel p2 tok/s (×) | prompt tok/s dequant / p1 / p2 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        by = {(x["path"], x["threads"], x["table_passes"]): x for x in r["runs"]}
        for th in meta["threads"]:
            d = by[("dequant", th, None)]
            cells = []
            prompts = [f"{d['prompt_tokens_per_s']:.0f}"]
            for ps in (1, 2):
                k = by.get(("kernel", th, ps))
                cells.append(f"{k['decode_tokens_per_s']:.1f} ({k['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}×)" if k else "—")
                prompts.append(f"{k['prompt_tokens_per_s']:.0f}" if k else "—")
            lines.append(f"| {r['model']} | {th} | {d['decode_tokens_per_s']:.1f} | {cells[0]} | {cells[1]} | {' / '.join(prompts)} |")
    if any("dequant_ppl" in r for r in results):
        lines += ["", f"Perplexity on {meta['ppl_windows']}×{meta['seqlen']} tokens of wiki.eval.txt, kernel vs the dequantized model:", "",
                  "| model | dequant ppl | kernel p1 ppl (Δ %, KL) | kernel p2 ppl (Δ %, KL) |", "|---|---|---|---|"]
        for r in results:
            cells = []
            for ps in (1, 2):
                p = r.get(f"kernel_p{ps}_ppl")
                cells.append(f"{p:.3f} ({100 * (p / r['dequant_ppl'] - 1):+.3f} %, {r[f'kernel_p{ps}_kl']:.1e})" if p else "—")
            lines.append(f"| {r['model']} | {r['dequant_ppl']:.3f} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Packed size of the quantized layers vs their float32 weights: "
              + ", ".join(f"{r['model']} {r['packed_bytes'] / 2**20:.1f} / {r['float_bytes'] / 2**20:.1f} MiB" for r in results), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--passes", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="W4 and W2, 32 new tokens, 2 windows of 256: a quick check, not a measurement")
    ap.add_argument("--note", default="", help="a sentence for the table (e.g. that the machine was shared)")
    ap.add_argument("--out", default="kernel")
    a = ap.parse_args()
    if a.smoke:
        a.bits, a.new_tokens, a.ppl_windows, a.seqlen = "4,2", 32, 2, 256
    bits = [int(b) for b in a.bits.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    passes = [int(p) for p in a.passes.split(",")]
    float_dir = smollm2_float_dir()
    t0 = time.time()
    results = [bench_one(_quantized(float_dir, b, a.group_size), threads, passes, a.prompt_tokens, a.new_tokens, a.ppl_windows, a.seqlen)
               for b in bits]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {"cpu": cpu, "torch": torch.__version__, "group_size": a.group_size, "threads": threads, "passes": passes,
            "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "ppl_windows": a.ppl_windows, "seqlen": a.seqlen,
            "smoke": a.smoke, "note": a.note, "wall_s": round(time.time() - t0, 1)}
    write_results(a.out, {"meta": meta, "results": results}, table(results, meta))
    print(table(results, meta))


if __name__ == "__main__":
    main()
