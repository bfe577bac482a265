"""Calibration data: text sources, tokenization, the window-sampling protocol, text sampled from a model."""
from __future__ import annotations

import json
import random
import logging
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM, PreTrainedTokenizerFast

from weightsmith.calib import (
    Calibration,
    build_calibration,
    check_vocab,
    generate_samples,
    read_calibration_text,
    sample_windows,
    tokenize_text,
)
from weightsmith.calib.generate import sample_tokens
from weightsmith.config import CalibConfig
from weightsmith.errors import WeightsmithError
from conftest import make_tokenizer as _tokenizer, pico_config

WORDS = [f"w{i}" for i in range(40)] + [".", ","]


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tokenizer(words: list[str] = WORDS, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    return _tokenizer(words, model_max_length)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = pico_config("llama", hidden=32, inter=64, vocab_size=len(tokenizer), max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# --- read_calibration_text -------------------------------------------------------------------------


def test_read_plain_text_keeps_content(tmp_path: Path) -> None:
    f = tmp_path / "calib.text"
    f.write_text("héllo\n\nworld  \n", encoding="utf-8")
    assert read_calibration_text(f) == "héllo\n\nworld  \n"
    assert read_calibration_text(str(f)) == "héllo\n\nworld  \n"


def test_read_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsmithError, match="does not exist") as e:
        read_calibration_text(tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_read_empty_file(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(WeightsmithError, match="no text") as e:
        read_calibration_text(f)
    assert "empty.txt" in str(e.value)


def test_read_invalid_utf8_gives_offset(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"abc\xe9def")
    with pytest.raises(WeightsmithError, match=r"not valid UTF-8.*byte offset 3") as e:
        read_calibration_text(f)
    assert "latin1.txt" in str(e.value)


def test_read_jsonl_joins_text_fields(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "first doc", "id": 1}), "", "   ", json.dumps({"text": "second\ndoc"})]
    f.write_text("\n".join(lines) + "\n")
    assert read_calibration_text(f) == "first doc\n\nsecond\ndoc"


def test_read_jsonl_bad_json_gives_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    with pytest.raises(WeightsmithError, match=r"bad.jsonl, line 3: not valid JSON"):
        read_calibration_text(f)


@pytest.mark.parametrize("record", [{"content": "x"}, {"text": 5}, ["text"], "text"])
def test_read_jsonl_missing_text_field_gives_line(tmp_path: Path, record: object) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(WeightsmithError, match=r'bad.jsonl, line 2: .*string "text" field'):
        read_calibration_text(f)


def test_read_jsonl_without_text_is_empty(tmp_path: Path) -> None:
    f = tmp_path / "blank.jsonl"
    f.write_text(json.dumps({"text": "  "}) + "\n\n")
    with pytest.raises(WeightsmithError, match="blank.jsonl contains no text"):
        read_calibration_text(f)


def test_read_directory_sorted_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("md text")
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "j1"}) + "\n" + json.dumps({"text": "j2"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    (tmp_path / "empty.txt").write_text("   ")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    assert read_calibration_text(tmp_path) == "plain\n\nmd text\n\nj1\n\nj2"


def test_read_directory_without_usable_files(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "empty.md").write_text("")
    with pytest.raises(WeightsmithError, match="no usable files") as e:
        read_calibration_text(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_read_directory_reports_bad_file(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(WeightsmithError, match=r"bad.txt is not valid UTF-8 .*byte offset 0"):
        read_calibration_text(tmp_path)


# --- tokenize_text / check_vocab ---------------------------------------------------------------------


def test_tokenize_text_is_1d_long_and_quiet(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    # an in-process `weightsmith` CLI test earlier in the session silences transformers globally
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    monkeypatch.setattr(logging.getLogger("transformers"), "level", logging.WARNING)
    try:
        _tokenize_checks(caplog)
    finally:
        hf_logging.set_verbosity(level)


def _tokenize_checks(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = make_tokenizer(model_max_length=64)
    text = make_text(500)
    with caplog.at_level(logging.WARNING):
        ids = tokenize_text(tokenizer, text)
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert ids.numel() > tokenizer.model_max_length
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # the check above can see the warning: a plain call gives it
        plain = tokenizer(text).input_ids
    assert [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]
    assert ids.tolist() == plain


def test_check_vocab() -> None:
    check_vocab(torch.tensor([0, 5, 9]), 10)
    check_vocab(torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(WeightsmithError, match="token id 10 >= vocab size 10"):
        check_vocab(torch.tensor([[1, 10]]), 10)


def test_check_vocab_accepts_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    check_vocab(tokenizer, len(tokenizer))
    with pytest.raises(WeightsmithError, match="tokenizer does not match the model"):
        check_vocab(tokenizer, len(tokenizer) - 1)


# --- sample_windows ------------------------------------------------------------------------------------


def reference_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(nsamples):
        i = torch.randint(0, ids.numel() - seqlen - 1, (1,), generator=g).item()
        out.append(ids[i : i + seqlen])
    return torch.stack(out)


def test_sample_windows_follows_protocol() -> None:
    ids = torch.arange(1000) * 7 % 911
    got = sample_windows(ids, 12, 50, seed=1234)
    assert got.shape == (12, 50) and got.dtype == torch.long
    assert torch.equal(got, reference_windows(ids, 12, 50, 1234))


def test_sample_windows_deterministic_and_seeded() -> None:
    ids = torch.arange(5000)
    a = sample_windows(ids, 8, 32, seed=0)
    assert torch.equal(a, sample_windows(ids, 8, 32, seed=0))
    assert not torch.equal(a, sample_windows(ids, 8, 32, seed=1))
    # each window is a run of consecutive tokens of the stream
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(8, 32))


def test_sample_windows_shortest_text() -> None:
    ids = torch.arange(12)
    assert sample_windows(ids, 3, 10, seed=0).shape == (3, 10)
    with pytest.raises(WeightsmithError, match="calibration text has 11 tokens, shorter than one window of 10"):
        sample_windows(ids[:11], 3, 10, seed=0)


# --- generate_samples ----------------------------------------------------------------------------------


def test_generate_samples_shape_and_start(tiny_llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = generate_samples(tiny_llama, tokenizer, nsamples=5, seqlen=12, seed=0, batch_size=2, progress=False)
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert int(ids.max()) < len(tokenizer) and int(ids.min()) >= 0
    assert len(set(ids[:, 1:].flatten().tolist())) > 5  # sampled, not greedy


def test_generate_samples_deterministic(tiny_llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    kw = dict(nsamples=3, seqlen=10, batch_size=2, progress=False)
    a = generate_samples(tiny_llama, tokenizer, seed=7, **kw)
    torch.manual_seed(999)  # the global RNG state plays no part
    b = generate_samples(tiny_llama, tokenizer, seed=7, **kw)
    c = generate_samples(tiny_llama, tokenizer, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not tiny_llama.training


def test_generate_samples_start_token_fallbacks(tiny_llama: LlamaForCausalLM) -> None:
    class NoBos:
        bos_token_id = None
        eos_token_id = 2

    class Nothing:
        pass

    assert (generate_samples(tiny_llama, NoBos(), 2, 4, 0, progress=False)[:, 0] == 2).all()
    assert (generate_samples(tiny_llama, Nothing(), 2, 4, 0, progress=False)[:, 0] == 0).all()


def test_sample_tokens_distribution() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    logits = probs.log().expand(40000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits, gen)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[3] == 0
    assert torch.allclose(freq, probs.double(), atol=0.01)


# --- build_calibration -----------------------------------------------------------------------------------


def never_load() -> None:
    raise AssertionError("load_model must not be called when a calibration file is given")


def test_build_calibration_from_file(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    f = tmp_path / "calib.txt"
    text = make_text(400)
    f.write_text(text)
    cfg = CalibConfig(path=str(f), nsamples=4, seqlen=16, seed=3)
    calib = build_calibration(cfg, tokenizer, never_load, progress=False, vocab_size=len(tokenizer))
    assert isinstance(calib, Calibration)
    ids = tokenize_text(tokenizer, text)
    assert torch.equal(calib.ids, reference_windows(ids, 4, 16, 3))
    assert calib.source == {"kind": "file", "path": str(f), "tokens": ids.numel(), "nsamples": 4, "seqlen": 16, "seed": 3}


def test_build_calibration_checks_vocab(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    f = tmp_path / "calib.txt"
    f.write_text(make_text(400))
    cfg = CalibConfig(path=str(f), nsamples=4, seqlen=16)
    with pytest.raises(WeightsmithError, match="tokenizer does not match the model"):
        build_calibration(cfg, tokenizer, never_load, progress=False, vocab_size=5)


def test_build_calibration_generated(tiny_llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    calls = []

    def load():
        calls.append(1)
        return tiny_llama

    cfg = CalibConfig(path=None, nsamples=3, seqlen=8, seed=5)
    calib = build_calibration(cfg, tokenizer, load, progress=False, vocab_size=len(tokenizer))
    assert calls == [1]
    assert calib.ids.shape == (3, 8)
    assert torch.equal(calib.ids, generate_samples(tiny_llama, tokenizer, 3, 8, 5, progress=False))
    assert calib.source["kind"] == "generated"
    assert "sampled from the model itself" in calib.source["note"]
    assert (calib.source["nsamples"], calib.source["seqlen"], calib.source["seed"]) == (3, 8, 5)


def test_build_calibration_encoder_cannot_generate(tokenizer: PreTrainedTokenizerFast) -> None:
    bert = BertForMaskedLM(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=len(tokenizer))
    )
    cfg = CalibConfig(path=None, nsamples=2, seqlen=8)
    with pytest.raises(WeightsmithError, match="cannot generate text; pass --calib FILE"):
        build_calibration(cfg, tokenizer, lambda: bert, progress=False)


def test_build_calibration_missing_file(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = CalibConfig(path=str(tmp_path / "missing.txt"), nsamples=2, seqlen=8)
    with pytest.raises(WeightsmithError, match="missing.txt does not exist"):
        build_calibration(cfg, tokenizer, never_load, progress=False)


def test_generated_calibration_is_cached_by_model_and_arguments(tiny_llama, tokenizer, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("WEIGHTSMITH_CALIB_CACHE", str(tmp_path / "cache"))
    calls = []

    def load():
        calls.append(1)
        return tiny_llama

    fp = {"origin": "/m", "files": {"model.safetensors": {"size": 1, "mtime_ns": 2}}}
    cfg = CalibConfig(path=None, nsamples=3, seqlen=8, seed=5)
    first = build_calibration(cfg, tokenizer, load, progress=False, fingerprint=fp).ids
    again = build_calibration(cfg, tokenizer, load, progress=False, fingerprint=fp).ids
    assert calls == [1] and torch.equal(first, again)  # read back: the model is not even loaded
    assert torch.equal(first, generate_samples(tiny_llama, tokenizer, 3, 8, 5, progress=False))
    entries = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 1 and not list((tmp_path / "cache").glob(".*"))  # no temporary file left
    other = build_calibration(CalibConfig(path=None, nsamples=3, seqlen=8, seed=6), tokenizer, load, progress=False, fingerprint=fp).ids
    changed = build_calibration(cfg, tokenizer, load, progress=False, fingerprint={**fp, "origin": "/other"}).ids
    assert calls == [1, 1, 1] and not torch.equal(other, first) and torch.equal(changed, first)  # new keys sample again
    entries[0].write_bytes(b"garbage")  # a corrupt entry is sampled again and replaced
    assert torch.equal(build_calibration(cfg, tokenizer, load, progress=False, fingerprint=fp).ids, first)
    assert len(calls) == 4 and "sampling again" in caplog.text
    assert torch.equal(build_calibration(cfg, tokenizer, load, progress=False, fingerprint=fp).ids, first) and len(calls) == 4


def test_a_short_calibration_text_stretched_into_overlapping_windows_is_warned(tokenizer, tmp_path, caplog) -> None:
    f = tmp_path / "short.txt"
    f.write_text(" ".join(["alpha beta gamma delta"] * 20), encoding="utf-8")  # 80 words
    calib = build_calibration(CalibConfig(path=str(f), nsamples=16, seqlen=16), tokenizer, never_load, progress=False)
    assert calib.ids.shape == (16, 16)
    msg = next(r.getMessage() for r in caplog.records if "overlap" in r.getMessage())
    n = calib.source["tokens"]
    assert f"holds {n} tokens, fewer than the 16×16 = 256 asked" in msg
    distinct = int(msg.split("cover only ")[1].split(" ")[0])
    assert 16 <= distinct <= n
    caplog.clear()
    build_calibration(CalibConfig(path=str(f), nsamples=2, seqlen=16), tokenizer, never_load, progress=False)
    assert "overlap" not in caplog.text


def test_sampling_shows_no_deprecation_notice_a_user_cannot_act_on(tiny_llama, tokenizer) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_samples(tiny_llama, tokenizer, 2, 6, 0, progress=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
