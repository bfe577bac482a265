"""Our GGUF in the real llama.cpp (issue 19): SmolLM2-135M quantized by weightsmith (GPTQ W4 g32 by the
protocol of bench/PROTOCOL.md), exported with ``weightsmith export --format gguf`` and *no*
template, then loaded by llama.cpp (llama-cpp-python 0.3.36, built from source):

- token ids of the whole evaluation split from llama.cpp on our GGUF vs transformers' tokenizer;
- perplexity in llama.cpp (64 windows of 512 tokens, the protocol) vs the dequantized model in
  transformers (target: within 1 %);
- size on disk with the token embedding as F16 (default: what the report measured) and as Q8_0
  (``--gguf-embedding-type Q8_0``, the size of llama.cpp's own Q4_0 file), and llama.cpp's own Q4_0 of
  the same float model (``llama_model_quantize`` from the shipped Q4_1, which the float model is exactly) as the size/quality peer.

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python==0.3.36   # builds llama.cpp (minutes)
    .venv/bin/python bench/bench_llamacpp.py [--method gptq|rtn]

Writes bench/results/llamacpp.json/md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CALIB, EVAL, run_cli, smollm2_float_dir, write_results  # noqa: E402

SEQLEN, WINDOWS = 512, 64


def llama_ppl(gguf: Path, ids: list[int], threads: int = 2) -> tuple[float, float]:
    """Protocol perplexity of ``gguf`` in llama.cpp on the first WINDOWS windows of ``ids``; seconds."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=SEQLEN, n_batch=SEQLEN, n_ubatch=SEQLEN, logits_all=True, n_threads=threads,
                verbose=False, seed=0)
    t = time.time()
    losses = []
    for w in range(WINDOWS):
        win = ids[w * SEQLEN:(w + 1) * SEQLEN]
        llm.reset()
        llm.eval(win)
        logits = np.asarray(llm.scores[: SEQLEN - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll = lse - logits[np.arange(SEQLEN - 1), win[1:]]
        losses.append(float(nll.mean()))
    llm.close()
    return math.exp(sum(losses) / len(losses)), time.time() - t


def llama_tokens(gguf: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    out = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    llm.close()
    return out


def hf_ppl(model_dir: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor(ids[: WINDOWS * SEQLEN]).reshape(WINDOWS, SEQLEN)
    losses = []
    with torch.no_grad():
        for i in range(0, WINDOWS, 8):
            b = x[i:i + 8]
            lg = m(input_ids=b, use_cache=False).logits.float()
            ce = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), b[:, 1:], reduction="none").mean(dim=1)
            losses += ce.tolist()
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    a = ap.parse_args()
    import llama_cpp
    from transformers import AutoTokenizer

    from weightsmith.demo import smollm2_gguf
    from weightsmith.export import export
    from weightsmith.safety import from_pretrained

    float_dir = smollm2_float_dir()
    work = CACHE / "llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    q = work / f"{a.method}_w{a.bits}g{a.group_size}"
    t = time.time()
    if not (q / "report.json").is_file():
        run_cli(["quantize", str(float_dir), str(q), "--calib", str(CALIB), "--method", a.method, "--bits", str(a.bits),
                 "--group-size", str(a.group_size), "--overwrite", "--quiet"], work / f"{q.name}.log")
    quantize_s = time.time() - t
    text = EVAL.read_text(encoding="utf-8")
    tok = from_pretrained(AutoTokenizer, float_dir)
    hf_ids = tok(text)["input_ids"]
    rows: dict[str, dict] = {}
    ggufs = {"weightsmith GGUF (embedding F16)": (work / f"{q.name}.gguf", {}),
             "weightsmith GGUF (embedding Q8_0)": (work / f"{q.name}-embq8.gguf", {"gguf_embedding_type": "Q8_0"})}
    for name, (f, kw) in ggufs.items():
        t = time.time()
        info = export(q, f, "gguf", overwrite=True, **kw)
        rows[name] = {"path": str(f), "bytes": f.stat().st_size, "export_s": round(time.time() - t, 2), "pre_tokenizer": info["pre_tokenizer"]}
    peer = work / "llamacpp-q4_0.gguf"
    if not peer.is_file():  # llama.cpp's own Q4_0 of the float model: re-quantized from the shipped Q4_1 the float model is
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), str(peer).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed: {rc}")
    rows["llama.cpp Q4_0 (llama_model_quantize of the float model)"] = {"path": str(peer), "bytes": peer.stat().st_size}
    ref = hf_ppl(q, hf_ids)
    float_ppl = hf_ppl(float_dir, hf_ids)
    for name, r in rows.items():
        ids = llama_tokens(Path(r["path"]), text)
        r["tokens_llamacpp"], r["tokens_transformers"] = len(ids), len(hf_ids)
        r["token_ids_equal"] = ids == hf_ids
        if not r["token_ids_equal"]:
            r["first_difference"] = next((i for i, (x, y) in enumerate(zip(ids, hf_ids)) if x != y), min(len(ids), len(hf_ids)))
        r["perplexity_llamacpp"], r["llamacpp_eval_s"] = llama_ppl(Path(r["path"]), hf_ids)
        r["vs_dequantized_pct"] = 100 * (r["perplexity_llamacpp"] / ref - 1)
        print(f"{name}: {r}", file=sys.stderr, flush=True)
    lines = [f"SmolLM2-135M, weightsmith {a.method.upper()} W{a.bits} g{a.group_size} sym (protocol of bench/PROTOCOL.md: 128×512 "
             "wiki.calib), exported to GGUF with no template, evaluated in llama.cpp (llama-cpp-python "
             f"{llama_cpp.__version__}, built from source, 2 threads) on the first 64×512 tokens of wiki.eval. Perplexity of the same "
             f"weights dequantized in transformers: **{ref:.3f}** (float model {float_ppl:.3f}).", "",
             "| GGUF | pre-tokenizer | size MB | token ids = transformers' (whole eval split) | perplexity in llama.cpp | vs dequantized |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = f"yes ({r['tokens_llamacpp']:,} tokens)" if r["token_ids_equal"] else \
            f"no ({r['tokens_llamacpp']:,} vs {r['tokens_transformers']:,}; first difference at {r['first_difference']})"
        lines.append(f"| {name} | {r.get('pre_tokenizer', '(llama.cpp)')} | {r['bytes'] / 1e6:.1f} | {same} | {r['perplexity_llamacpp']:.3f} | "
                     f"{r['vs_dequantized_pct']:+.2f} % |")
    lines += ["", "The Q8_0-embedding row rounds the token embedding (tied head) to nearest on top of the measured weights; "
              "llama.cpp's own Q4_0 is round-to-nearest on every matrix, its 'vs dequantized' compares it with our GPTQ weights."]
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("llamacpp", {"quantized": str(q), "quantize_s": quantize_s, "dequantized_perplexity": ref,
                               "float_perplexity": float_ppl, "rows": rows}, table)


if __name__ == "__main__":
    main()
