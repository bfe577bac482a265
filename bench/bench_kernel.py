"""Lookup-table kernel benchmark (issue 17): greedy batch-1 decoding (64-token prompt, 128 new tokens)
of SmolLM2-135M and of a synthetic ~1 B-parameter Llama-shaped checkpoint, quantized with RTN at
W4/W3/W2 g64, through the dequantized float32 path in torch, through the kernel (table passes 1 =
int8 tables and 2 = int8 + residual) and through llama.cpp (llama-cpp-python, built from source) on
a GGUF of the same model at the nearest type (Q4_0, Q3_K_S, Q2_K) — 1 and 2 threads, same prompt
ids and threads, all in one run; plus perplexity and KL of the kernel against the dequantized model
on the protocol's evaluation windows (SmolLM2), the memory of the kernel's packed layers against
the checkpoint's packed size (codes + fp16 scale + packed zero per group), and the bits per weight
of llama.cpp's block matrices read from its GGUF.

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python==0.3.36   # the peer (minutes)
    .venv/bin/python bench/bench_kernel.py                       # the full protocol
    .venv/bin/python bench/bench_kernel.py --smoke               # < 2 min: SmolLM2 W4 and W2, 32 new tokens, 2 windows

The output head is kept in bfloat16 on both torch paths (``--head-dtype``; llama.cpp keeps it at
Q6_K/Q8_0). Writes bench/results/kernel.json/md (``--out NAME`` for another name). Run on an idle
machine: the numbers are wall-clock tokens/s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, run_cli, smollm2_float_dir, write_results  # noqa: E402

from weightsmith.kernels import LutLinear  # noqa: E402
from weightsmith.kernels.lean import LeanDecoder, unsupported_reason  # noqa: E402
from weightsmith.kernels.lean import greedy as lean_greedy  # noqa: E402
from weightsmith.kernels.runtime import HEAD_CHOICES, head_on_kernel  # noqa: E402


LLAMA_TYPES = {4: "Q4_0", 3: "Q3_K_S", 2: "Q2_K"}  # the nearest llama.cpp file type at each width
LARGE = {"layers": 18, "hidden": 2048, "inter": 5632, "heads": 32, "kv_heads": 8}  # ~1.0 B parameters, untied head


def _quantized(float_dir: Path, bits: int, gs: int, tag: str = "", clip: bool = True) -> Path:
    out = CACHE / "kernel" / f"{tag}RTN_W{bits}_g{gs}"
    if not (out / "report.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_cli(["quantize", str(float_dir), str(out), "--method", "rtn", "--bits", str(bits), "--group-size", str(gs),
                 *([] if clip else ["--no-clip-search"]), "--overwrite", "--quiet"], out.parent / f"{tag}W{bits}.log")
    return out


def _large_float() -> Path:
    out = CACHE / "kernel" / "synthetic-1b-f32"
    if not (out / "config.json").is_file():
        from make_synthetic import make

        make(out, **LARGE)
    return out


def _llama_peers(src: Path, work: Path, bits: list[int]) -> dict[int, Path]:
    """llama.cpp's own files at the nearest type, re-quantized by ``llama_model_quantize`` from ``src``."""
    import llama_cpp

    peers = {}
    work.mkdir(parents=True, exist_ok=True)  # llama.cpp's writer fails with a bare iostream error on a missing directory
    for b in bits:
        t = LLAMA_TYPES[b]
        dst = work / f"{src.stem}.{t}.gguf"
        if not dst.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
            params.allow_requantize = True
            params.nthread = 2
            tmp = dst.with_suffix(".partial")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize {src} -> {t} failed")
            tmp.rename(dst)
        peers[b] = dst
    return peers


def _gguf_block_bpw(path: Path) -> float:
    """Bits per weight of the GGUF's block matrices (blk.*, 2-D): what our packed layers are compared with."""
    from gguf import GGUFReader

    nbytes = nel = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
            nbytes += int(t.n_bytes)
            nel += int(t.n_elements)
    return 8 * nbytes / nel


def llama_decode(gguf: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    """Greedy decoding in llama.cpp: the prompt in one batch, then ``new_tokens - 1`` single-token steps."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + new_tokens + 8, n_batch=len(ids), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    nv = llm.n_vocab()

    def last():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))))

    llm.eval(ids[:8])  # warm-up
    for _ in range(3):
        llm.eval([last()])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    toks = [last()]
    for _ in range(new_tokens - 1):
        llm.eval([toks[-1]])
        toks.append(last())
    t2 = time.perf_counter()
    llm.close()
    return {"prompt_tokens_per_s": round(len(ids) / (t1 - t0), 1), "decode_tokens_per_s": round((new_tokens - 1) / (t2 - t1), 2),
            "tokens": toks}


def _ideal_packed_bytes(model) -> int:
    """The checkpoint's packed size of the layers on the kernel: codes at ``bits`` bits, an fp16 scale and a
    ``bits``-bit zero per row and group (GPTQ's storage), biases in float32."""
    tot = 0
    for m in model.modules():
        if isinstance(m, LutLinear):
            ng = m.w_scale.shape[1]
            tot += m.out_features * m.in_features * m.bits // 8 + m.out_features * ng * (16 + m.bits) // 8
            tot += 0 if m.bias is None else m.bias.numel() * 4
    return tot


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


def bench_one(qdir: Path, threads: list[int], passes: list[int], prompt_tokens: int, new_tokens: int, ppl_windows: int, seqlen: int,
              head_dtype: str, peer: Path | None) -> dict:
    from weightsmith.calib import read_calibration_text, tokenize_text
    from weightsmith.export.common import QuantizedCheckpoint
    from weightsmith.kernels import lut, set_num_threads, set_table_passes
    from weightsmith.kernels.runtime import greedy, load_float, prompt_ids, set_head_dtype, swap_quantized_layers

    model, tok = load_float(qdir)
    ids = prompt_ids(tok, prompt_tokens, model.config.vocab_size)
    res: dict = {"model": qdir.name, "runs": [], "head_dtype": head_dtype}
    if peer is not None:  # llama.cpp first, while the torch model is only loaded (same prompt ids, same threads)
        res["llama_type"], res["llama_block_bpw"] = peer.name.split(".")[-2], round(_gguf_block_bpw(peer), 4)
        for th in threads:
            r = llama_decode(peer, ids[0].tolist(), new_tokens, th)
            r.pop("tokens")
            run = {"path": "llama.cpp", "threads": th, "table_passes": None, **r}
            res["runs"].append(run)
            print(json.dumps({"model": qdir.name, **run}), file=sys.stderr, flush=True)

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

    def decode_lean(tag, th, ps=None):
        """The same greedy run on the lean loop (weightsmith/kernels/lean.py): torch ops per layer on the
        dequantized path, one library call per token when every projection is on the kernel."""
        torch.set_num_threads(th)
        set_num_threads(th)
        if ps:
            set_table_passes(ps)
        dec = LeanDecoder(model, prompt_tokens + new_tokens + 8)
        lean_greedy(dec, ids[:, :8], 4)  # warm-up
        toks, tp, td = lean_greedy(dec, ids, new_tokens)
        run = {"path": tag, "threads": th, "table_passes": ps, "decode_tokens_per_s": round((new_tokens - 1) / td, 2),
               "prompt_tokens_per_s": round(prompt_tokens / tp, 1), "native_step": dec.native is not None}
        res["runs"].append(run)
        print(json.dumps({"model": qdir.name, **run}), file=sys.stderr, flush=True)
        return toks

    windows = None
    if ppl_windows:
        text_ids = tokenize_text(tok, read_calibration_text(EVAL))
        windows = torch.stack([text_ids[i * seqlen : (i + 1) * seqlen] for i in range(ppl_windows)])
        torch.set_num_threads(max(threads))
        res["dequant_ppl"], ref_logits = _ppl(model, windows)  # float32 head: the model as the checkpoint has it
    f32_head = model.get_output_embeddings()
    set_head_dtype(model, head_dtype, use_kernel=False)  # a rounded head (int8, int4): dequantized on the torch path, on its kernel on the kernel's
    fast_head = model.get_output_embeddings()
    ref_tokens = {th: decode("dequant", th) for th in threads}
    lean_ok = unsupported_reason(model) is None
    if lean_ok:
        for th in threads:
            decode_lean("lean dequant", th)
    with QuantizedCheckpoint(qdir) as ckpt:
        res.update(swap_quantized_layers(model, ckpt))
    head_on_kernel(fast_head)  # a rounded head on its kernel from here
    res["kernel"] = lut.isa()
    res["ideal_packed_bytes"] = _ideal_packed_bytes(model)
    res["block_bpw"] = round(8 * res["ideal_packed_bytes"] / sum(m.in_features * m.out_features for m in model.modules()
                                                                  if type(m).__name__ == "LutLinear"), 4)
    for ps in passes:
        for th in threads:
            got = decode("kernel", th, ps)
            diff = (got != ref_tokens[th]).nonzero()
            res["runs"][-1]["greedy_same_prefix"] = int(diff[0, 0]) if diff.numel() else new_tokens
            if lean_ok:
                got = decode_lean("lean kernel", th, ps)
                diff = (got != ref_tokens[th]).nonzero()
                res["runs"][-1]["greedy_same_prefix"] = int(diff[0, 0]) if diff.numel() else new_tokens
        if windows is not None:
            set_table_passes(ps)
            torch.set_num_threads(max(threads))
            set_num_threads(max(threads))
            model.set_output_embeddings(f32_head)  # perplexity with the head as the checkpoint has it, on both paths
            p, lg = _ppl(model, windows)
            model.set_output_embeddings(fast_head)
            res[f"kernel_p{ps}_ppl"], res[f"kernel_p{ps}_kl"] = p, _kl(ref_logits, lg)
            if head_dtype in ("int4", "int8"):  # what the opted-in rounded head costs, on its kernel
                p, lg = _ppl(model, windows)
                res[f"kernel_p{ps}_{head_dtype}_head_ppl"], res[f"kernel_p{ps}_{head_dtype}_head_kl"] = p, _kl(ref_logits, lg)
    # the floor of any runtime that keeps the transformers model around its linear layers: every linear
    # layer and the head replaced by a module that only allocates its output (no weights read at all)
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "LutLinear":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _NoMatmul(m.out_features))
    model.set_output_embeddings(_NoMatmul(model.config.vocab_size))
    for th in threads:
        decode("no-matmul floor", th)
    return res


class _NoMatmul(torch.nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def table(results: list[dict], meta: dict) -> str:
    lines = [f"# Lookup-table kernel: decode tokens/s, RTN g{meta['group_size']}, kernel vs dequantized torch vs llama.cpp",
             "", f"{meta['cpu']} ({meta['isa']}), {meta['load']}; {meta['prompt_tokens']}-token prompt, {meta['new_tokens']} new tokens "
             f"({meta['large_new_tokens']} on the 1 B model), greedy, batch 1; output head in {meta['head_dtype']} on both torch paths. "
             f"{meta.get('note', '')}", "",
             "Two runtimes around the same layers: transformers (the model's own forward) and the lean loop "
             "(weightsmith/kernels/lean.py: torch ops per layer on the dequantized path, one library call per decoded token on the kernel). "
             "× = speed over the dequantized path of the same runtime. "
             "p1 / p2: one or two int8 passes (tables on the bit planes; activations on the DOT4 layout).", "",
             "Kernel layouts: " + "; ".join(f"{r['model']} " + ", ".join(f"{n} {k}" for k, n in sorted(r.get("kernel_layouts", {}).items()))
                                            for r in results) + " (dot4: 4-bit nibbles on AVX-512 VNNI dot products; planes: table lookups).", "",
             "| model | bpw ours / llama.cpp | threads | dequant f32 tok/s | kernel p1 tok/s (×) | kernel p2 tok/s (×) | lean dequant tok/s | lean kernel p1 tok/s (×) | lean kernel p2 tok/s (×) | llama.cpp tok/s (type) | best kernel / llama.cpp | prompt tok/s dequant / p2 / lean p2 / llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floors: list[str] = []
    for r in results:
        by = {(x["path"], x["threads"], x["table_passes"]): x for x in r["runs"]}
        for th in meta["threads"]:
            d = by[("dequant", th, None)]
            ld = by.get(("lean dequant", th, None))
            cells, best = [], 0.0
            for path, ref in (("kernel", d), ("lean kernel", ld)):
                if path == "lean kernel":
                    cells.append(f"{ld['decode_tokens_per_s']:.1f}" if ld else "—")
                for ps in (1, 2):
                    k = by.get((path, th, ps))
                    cells.append(f"{k['decode_tokens_per_s']:.1f} ({k['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}×)" if k and ref else "—")
                    best = max(best, k["decode_tokens_per_s"] if k else 0.0)
            prompts = [f"{d['prompt_tokens_per_s']:.0f}"] + [f"{k['prompt_tokens_per_s']:.0f}" if (k := by.get((path, th, 2))) else "—"
                                                             for path in ("kernel", "lean kernel")]
            ll = by.get(("llama.cpp", th, None))
            prompts.append(f"{ll['prompt_tokens_per_s']:.0f}" if ll else "—")
            llc = f"{ll['decode_tokens_per_s']:.1f} ({r['llama_type']})" if ll else "—"
            ratio = f"{best / ll['decode_tokens_per_s']:.2f}" if ll else "—"
            bpw = f"{r['block_bpw']:.3f} / {r['llama_block_bpw']:.3f}" if ll else f"{r['block_bpw']:.3f}"
            fl = by.get(("no-matmul floor", th, None))
            floors.append(f"{r['model']} {th} thread{'s' if th > 1 else ''} {fl['decode_tokens_per_s']:.1f}" if fl else "")
            lines.append(f"| {r['model']} | {bpw} | {th} | {d['decode_tokens_per_s']:.1f} | {' | '.join(cells)} | {llc} | {ratio} | {' / '.join(prompts)} |")
    lines += ["", "The floor of the torch runtime — the same transformers model with every linear layer and the head replaced by a "
              "module that reads no weights (attention, norms, rotary, the KV cache and Python dispatch only), decode tok/s: "
              + "; ".join(f for f in floors if f) + ". No kernel, however fast, makes the transformers path decode faster than this; "
              "the lean loop's native step does not pay it."]
    if any("dequant_ppl" in r for r in results):
        lines += ["", f"Perplexity on {meta['ppl_windows']}×{meta['seqlen']} tokens of wiki.eval.txt, kernel vs the dequantized model "
                  "(float32 head on both):", "",
                  "| model | dequant ppl | kernel p1 ppl (Δ %, KL) | kernel p2 ppl (Δ %, KL) |", "|---|---|---|---|"]
        for r in results:
            if "dequant_ppl" not in r:
                continue
            cells = []
            for ps in (1, 2):
                p = r.get(f"kernel_p{ps}_ppl")
                cells.append(f"{p:.3f} ({100 * (p / r['dequant_ppl'] - 1):+.3f} %, {r[f'kernel_p{ps}_kl']:.1e})" if p else "—")
            lines.append(f"| {r['model']} | {r['dequant_ppl']:.3f} | {cells[0]} | {cells[1]} |")
        hd = meta["head_dtype"]
        rounded = [(r, ps, r[f"kernel_p{ps}_{hd}_head_ppl"], r[f"kernel_p{ps}_{hd}_head_kl"]) for r in results for ps in (1, 2)
                   if f"kernel_p{ps}_{hd}_head_ppl" in r]
        if rounded:
            lines += ["", f"With the {hd} head on its kernel (`--head-dtype {hd}`: what the opted-in rounded head costs), against the "
                      "dequantized model with its float32 head: " + "; ".join(
                          f"{r['model']} p{ps} {p:.3f} ({100 * (p / r['dequant_ppl'] - 1):+.3f} %, KL {kl:.1e})" for r, ps, p, kl in rounded) + "."]
    lines += ["", "Memory of the layers on the kernel (its buffers: codes, fp16 scales, int8 zero points, column permutation) "
              "vs the checkpoint's packed size (codes, fp16 scale and packed zero per group) and vs their float32 weights:", "",
              "| model | kernel buffers MiB | packed size MiB | kernel / packed | float32 MiB |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['packed_bytes'] / 2**20:.2f} | {r['ideal_packed_bytes'] / 2**20:.2f} | "
                     f"{r['packed_bytes'] / r['ideal_packed_bytes']:.3f} | {r['float_bytes'] / 2**20:.1f} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--passes", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--large-new-tokens", type=int, default=64, help="new tokens on the 1 B model (its float32 path is slow)")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--head-dtype", default="bfloat16", choices=HEAD_CHOICES)
    ap.add_argument("--no-large", action="store_true", help="SmolLM2 only")
    ap.add_argument("--no-llama", action="store_true", help="without the llama.cpp peer")
    ap.add_argument("--smoke", action="store_true", help="SmolLM2 W4 and W2, 32 new tokens, 2 windows of 256: a quick check, not a measurement")
    ap.add_argument("--note", default="", help="a sentence for the table (e.g. that the machine was shared)")
    ap.add_argument("--out", default="kernel")
    a = ap.parse_args()
    if a.smoke:
        a.bits, a.new_tokens, a.ppl_windows, a.seqlen, a.no_large = "4,2", 32, 2, 256, True
    bits = [int(b) for b in a.bits.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    passes = [int(p) for p in a.passes.split(",")]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    from weightsmith.demo import smollm2_gguf
    from weightsmith.kernels import lut

    float_dir = smollm2_float_dir()
    peers = {} if a.no_llama else _llama_peers(smollm2_gguf(), CACHE / "kernel", bits)  # the shipped Q4_1 = our float model
    results = [bench_one(_quantized(float_dir, b, a.group_size), threads, passes, a.prompt_tokens, a.new_tokens, a.ppl_windows, a.seqlen,
                         a.head_dtype, peers.get(b)) for b in bits]
    if not a.no_large:
        big = _large_float()
        lpeers = {}
        if not a.no_llama:  # llama.cpp's files of the 1 B model: from our exact Q4_0 export of its RTN W4 g32 (sym)
            q40 = CACHE / "kernel" / "synthetic-1b.Q4_0.gguf"
            if not q40.is_file():
                run_cli(["export", str(_quantized(big, 4, 32, "synth1b-", clip=False)), str(q40), "--format", "gguf", "--gguf-type", "Q4_0",
                         "--gguf-embedding-type", "Q8_0", "--quiet"], CACHE / "kernel" / "synth1b-export.log")
            lpeers = _llama_peers(q40, CACHE / "kernel", bits)
        results += [bench_one(_quantized(big, b, a.group_size, "synth1b-", clip=False), threads, passes, a.prompt_tokens, a.large_new_tokens,
                              0, a.seqlen, a.head_dtype, lpeers.get(b)) for b in bits]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    llama_version = None if a.no_llama else __import__("llama_cpp").__version__
    meta = {"cpu": cpu, "isa": lut.isa(), "torch": torch.__version__, "llama_cpp_python": llama_version,
            "group_size": a.group_size, "threads": threads, "passes": passes, "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens, "large_new_tokens": a.large_new_tokens, "large": None if a.no_large else LARGE,
            "ppl_windows": a.ppl_windows, "seqlen": a.seqlen, "head_dtype": a.head_dtype, "smoke": a.smoke, "note": a.note,
            "load": f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end", "wall_s": round(time.time() - t0, 1)}
    write_results(a.out, {"meta": meta, "results": results}, table(results, meta))
    print(table(results, meta))


if __name__ == "__main__":
    main()
