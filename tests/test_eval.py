"""Evaluation: perplexity, KL / top-1 against a reference, encoder cosine similarity, and loading errors."""
from __future__ import annotations

import json
import random
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from weightsmith.errors import WeightsmithError
from conftest import make_tokenizer as _tokenizer, pico_config
from weightsmith.eval import evaluate, evaluate_many, load_for_eval, loading, model_kind

WORDS = [f"w{i}" for i in range(40)] + [".", ","]
SEQLEN = 16


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tokenizer(words: list[str] = WORDS, model_max_length: int = 32) -> PreTrainedTokenizerFast:
    return _tokenizer(words, model_max_length)


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturbed(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return model


def llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(pico_config("llama", hidden=32, inter=64, vocab_size=vocab_size, max_position_embeddings=64, tie_word_embeddings=False)).eval()


def bert(vocab_size: int) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(pico_config("bert", hidden=32, inter=64, vocab_size=vocab_size, max_position_embeddings=24)).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def text() -> str:
    return make_text(120)  # 120 tokens: 7 windows of 16


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    root = tmp_path_factory.mktemp("models")
    v = len(tokenizer)
    save(llama(v), tokenizer, root / "llama")
    save(perturbed(llama(v)), tokenizer, root / "llama_perturbed")
    save(bert(v), tokenizer, root / "bert")
    save(perturbed(bert(v)), tokenizer, root / "bert_perturbed")
    other = make_tokenizer(WORDS + ["extra"])
    save(llama(len(other)), other, root / "llama_bigger_vocab")
    shuffled = make_tokenizer(list(reversed(WORDS)))
    save(llama(len(shuffled)), shuffled, root / "llama_shuffled_vocab")
    return root


# --- causal ------------------------------------------------------------------------------------------


def test_perplexity_matches_model_loss(models_dir: Path, tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    out = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=5, batch_size=2, progress=False)
    model = LlamaForCausalLM.from_pretrained(models_dir / "llama", dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, verbose=False).input_ids)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids[: 5 * SEQLEN].view(5, SEQLEN)]
    assert out["kind"] == "causal"
    assert out["perplexity"] == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert (out["windows"], out["seqlen"], out["tokens"]) == (5, SEQLEN, 5 * SEQLEN)
    assert out["model"] == str(models_dir / "llama") and out["seconds"] > 0
    assert "kl" not in out


def test_perplexity_independent_of_batch_size(models_dir: Path, text: str) -> None:
    a = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=5, batch_size=1, progress=False)
    b = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=5, batch_size=4, progress=False)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_fewer_windows_than_requested(models_dir: Path, text: str) -> None:
    out = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=100, progress=False)
    assert out["windows"] == 120 // SEQLEN and out["tokens"] == out["windows"] * SEQLEN


def test_reference_itself(models_dir: Path, text: str) -> None:
    out = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=4, reference=models_dir / "llama", progress=False)
    assert out["kl"] < 1e-6
    assert out["top1"] == 1.0
    assert out["reference_perplexity"] == pytest.approx(out["perplexity"], rel=1e-6)


def test_reference_perturbed(models_dir: Path, text: str) -> None:
    out = evaluate(
        models_dir / "llama_perturbed", text=text, seqlen=SEQLEN, windows=4, reference=models_dir / "llama", progress=False
    )
    alone = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=4, progress=False)
    assert out["kl"] > 1e-4
    assert out["top1"] < 1.0
    assert out["reference_perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)
    assert out["perplexity"] != alone["perplexity"]


def test_evaluate_many_equals_one_by_one(models_dir: Path, text: str) -> None:
    """Several models in one pass (the reference run once per batch) give each one's own numbers."""
    paths = [models_dir / "llama_perturbed", models_dir / "llama"]
    many = evaluate_many(paths, text=text, seqlen=SEQLEN, windows=4, reference=models_dir / "llama", batch_size=3, progress=False)
    assert [r["model"] for r in many] == [str(p) for p in paths]
    for path, joint in zip(paths, many):
        alone = evaluate(path, text=text, seqlen=SEQLEN, windows=4, reference=models_dir / "llama", progress=False)
        for key in ("perplexity", "reference_perplexity", "kl", "top1"):
            assert joint[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-9), key
    assert many[0]["kl"] > 1e-4 and many[1]["kl"] < 1e-6
    with pytest.raises(WeightsmithError, match="tokenizer mismatch"):
        evaluate_many([models_dir / "llama", models_dir / "llama_bigger_vocab"], text=text, seqlen=SEQLEN, windows=2, progress=False)
    with pytest.raises(WeightsmithError, match="kinds differ"):
        evaluate_many([models_dir / "llama", models_dir / "bert"], text=text, seqlen=SEQLEN, windows=2, progress=False)


def test_text_path(models_dir: Path, text: str, tmp_path: Path) -> None:
    f = tmp_path / "eval.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n")
    a = evaluate(models_dir / "llama", text_path=f, seqlen=SEQLEN, windows=3, progress=False)
    b = evaluate(models_dir / "llama", text=text, seqlen=SEQLEN, windows=3, progress=False)
    assert a["perplexity"] == b["perplexity"]


# --- encoder -----------------------------------------------------------------------------------------


def test_encoder_without_reference(models_dir: Path, text: str) -> None:
    out = evaluate(models_dir / "bert", text=text, seqlen=SEQLEN, windows=3, progress=False)
    assert out["kind"] == "encoder" and out["windows"] == 3
    assert "perplexity" not in out and "--reference" in out["note"]


def test_encoder_cosine(models_dir: Path, text: str) -> None:
    same = evaluate(models_dir / "bert", text=text, seqlen=SEQLEN, windows=3, reference=models_dir / "bert", progress=False)
    other = evaluate(
        models_dir / "bert_perturbed", text=text, seqlen=SEQLEN, windows=3, reference=models_dir / "bert", progress=False
    )
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert other["cosine"] < 0.999


def test_encoder_windows_capped_by_positions(models_dir: Path, text: str) -> None:
    out = evaluate(models_dir / "bert", text=text, seqlen=100, windows=2, reference=models_dir / "bert", progress=False)
    assert out["seqlen"] == 24 and out["windows"] == 2


def test_load_for_eval_kinds(models_dir: Path) -> None:
    model, tok, kind = load_for_eval(models_dir / "llama", "cpu")
    assert kind == "causal" and not model.training and next(model.parameters()).dtype == torch.float32
    assert len(tok) == model.config.vocab_size
    assert load_for_eval(models_dir / "bert", "cpu")[2] == "encoder"


def test_model_kind_rules() -> None:
    assert model_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert model_kind(LlamaConfig()) == "causal"  # no architectures: llama has only a causal head
    assert model_kind(BertConfig(architectures=["BertForMaskedLM"])) == "encoder"
    assert model_kind(BertConfig()) == "encoder"
    assert model_kind(BertConfig(is_decoder=True)) == "causal"
    assert model_kind(BertConfig(architectures=["BertLMHeadModel"])) == "causal"


# --- errors ------------------------------------------------------------------------------------------


def one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(WeightsmithError, match=match) as e:
        evaluate(progress=False, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_error_missing_model(tmp_path: Path, text: str) -> None:
    msg = one_line_error("does not exist", model_path=tmp_path / "nope", text=text)
    assert "nope" in msg


def test_error_not_a_model(tmp_path: Path, text: str) -> None:
    one_line_error("not a Hugging Face model directory", model_path=tmp_path, text=text)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    one_line_error("neither a model directory nor a .gguf file", model_path=f, text=text)


def test_error_unknown_architecture(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]}))
    one_line_error("unknown architecture.*no_such_arch", model_path=tmp_path, text=text)


def test_error_config_without_model_type(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    one_line_error("no model_type", model_path=tmp_path, text=text)


def test_error_bad_config_json(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text("{oops")
    one_line_error("config.json is not a readable JSON file", model_path=tmp_path, text=text)


def with_quantization_config(src: Path, dst: Path, quant: dict) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_error_compressed_tensors_missing(
    models_dir: Path, tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "package_available", lambda name: False)
    d = with_quantization_config(models_dir / "llama", tmp_path / "ct", {"quant_method": "compressed-tensors"})
    one_line_error("pip install compressed-tensors", model_path=d, text=text)


def fake_quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per-group grid: (dequantized weight, scale)."""
    g = w.view(w.shape[0], -1, group)
    scale = g.abs().amax(-1) / 7.5
    q = torch.round(g / scale.unsqueeze(-1)).clamp(-8, 7)
    return (q * scale.unsqueeze(-1)).view_as(w), scale


def test_compressed_tensors_checkpoint_loads(models_dir: Path, tmp_path: Path, text: str) -> None:
    """A pack-quantized compressed-tensors directory (the llm-compressor format) evaluates like the
    float model holding the same dequantized weights."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    group = 16
    tokenizer = make_tokenizer()
    model = LlamaForCausalLM.from_pretrained(models_dir / "llama", dtype=torch.float32)
    dequantized = LlamaForCausalLM.from_pretrained(models_dir / "llama", dtype=torch.float32)
    with torch.no_grad():
        for name, mod in dequantized.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(fake_quantize_int4(mod.weight, group)[0])
    save(dequantized, tokenizer, tmp_path / "dequantized")

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="calibration")
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "weight_scale"):
                mod.weight_scale.copy_(fake_quantize_int4(mod.weight, group)[1])
                mod.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    ct = tmp_path / "ct"
    save(model, tokenizer, ct)
    compressor.update_config(str(ct))
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"

    got = evaluate(ct, text=text, seqlen=SEQLEN, windows=4, reference=tmp_path / "dequantized", progress=False)
    assert got["kind"] == "causal"
    assert got["perplexity"] == pytest.approx(got["reference_perplexity"], rel=1e-4)
    assert got["kl"] < 1e-5 and got["top1"] == 1.0


def test_error_text_arguments(models_dir: Path, text: str, tmp_path: Path) -> None:
    one_line_error("exactly one of text and text_path", model_path=models_dir / "llama")
    one_line_error("exactly one of text and text_path", model_path=models_dir / "llama", text=text, text_path="x.txt")
    one_line_error("does not exist", model_path=models_dir / "llama", text_path=tmp_path / "missing.txt")
    one_line_error("evaluation text is empty", model_path=models_dir / "llama", text=" \n")


def test_error_text_too_short(models_dir: Path) -> None:
    one_line_error("has 10 tokens, fewer than one window of 16", model_path=models_dir / "llama", text=make_text(10), seqlen=16)


def test_error_tokenizer_mismatch(models_dir: Path, text: str) -> None:
    base = models_dir / "llama"
    one_line_error("tokenizer mismatch", model_path=base, text=text, seqlen=SEQLEN, reference=models_dir / "llama_bigger_vocab")
    one_line_error("tokenizer mismatch.*different ids", model_path=base, text=text, seqlen=SEQLEN, reference=models_dir / "llama_shuffled_vocab")


def test_error_reference_kind_mismatch(models_dir: Path, text: str) -> None:
    one_line_error("reference", model_path=models_dir / "llama", text=text, seqlen=SEQLEN, reference=models_dir / "bert")


def test_error_bad_device(models_dir: Path, text: str) -> None:
    one_line_error("device", model_path=models_dir / "llama", text=text, device="nonsense")
