"""Trust (issue 19): nothing from a checkpoint executes, no pickle is unpickled, no output replaces an
input or another run's work, every malformed input is one line and exit 2 before any work, and no
garbage number is written with exit 0. Pico models; every test takes seconds."""
from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightsmith
from weightsmith.cli import main
from conftest import make_text, save_pico

FAST = ["--quiet", "--method", "gptq", "--group-size", "16", "--nsamples", "4", "--seqlen", "16"]
REPO = Path(weightsmith.__file__).resolve().parents[1]


def run(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == "", out  # nothing on stdout: eval's and inspect's JSON stay clean
    for n in needles:
        assert n in err, (n, err)


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def text(tmp_path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(make_text(2000, seed=1))
    return p


def strict_json(s: str):
    """json.loads that refuses NaN / Infinity (what other JSON parsers do)."""
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(s, parse_constant=bad)


# ---- nothing from a checkpoint executes ----------------------------------------------------------
def _evil_model_dir(tmp_path: Path, via: str) -> tuple[Path, Path, str]:
    """A pico model asking to run its own code, through config.json (unknown model_type + auto_map)
    or tokenizer_config.json (a tokenizer class transformers lacks + auto_map). The code writes a marker."""
    d = save_pico(tmp_path / f"evil-{via}", "llama")
    marker = tmp_path / f"ran-{via}"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    if via == "config":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
        (d / "modeling_evil.py").write_text(payload)
        needle = "configuration_evil.py"
    else:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "tokenization_evil.py").write_text(payload + "from transformers import PreTrainedTokenizerFast\n"
                                                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
        needle = "tokenization_evil.py"
    return d, marker, needle


@pytest.mark.parametrize("via", ["config", "tokenizer"])
@pytest.mark.parametrize("command", ["quantize", "eval", "eval-reference", "inspect"])
def test_checkpoint_code_never_runs(tmp_path, text, capsys, monkeypatch, via, command):
    d, marker, needle = _evil_model_dir(tmp_path, via)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))  # a user who would say yes to transformers' prompt
    good = save_pico(tmp_path / "good", "llama")
    argv = {"quantize": ["quantize", str(d), str(tmp_path / "o"), "--quiet"],  # no --calib: the tokenizer is needed too
            "eval": ["eval", str(d), "--text", str(text), "--quiet"],
            "eval-reference": ["eval", str(good), "--reference", str(d), "--text", str(text), "--quiet"],
            "inspect": ["inspect", str(d), "--json"]}[command]
    one_line_error(*run(argv, capsys), needle)
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_eval_with_yes_on_stdin_keeps_stdout_clean(tmp_path, text):
    """The issue's probe as a user runs it: a real process, ``y`` on its standard input."""
    d, marker, needle = _evil_model_dir(tmp_path, "config")
    p = subprocess.run([sys.executable, "-m", "weightsmith", "eval", str(d), "--text", str(text), "--quiet"], input="y\n",
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr
    assert not marker.exists()


def test_auto_map_of_a_built_in_architecture_is_ignored_not_run(tmp_path):
    """A config.json with an ``auto_map`` but a model_type transformers has: loaded with the built-in
    class (trust_remote_code=False), the shipped code never imported."""
    from weightsmith.eval.loading import load_config, load_tokenizer, locate_model

    d = save_pico(tmp_path / "m", "llama")
    marker = tmp_path / "ran"
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert type(load_config(locate_model(d))).__name__ == "LlamaConfig"
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", "tokenization_x.XTokenizer"]}  # a built-in tokenizer_class
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "tokenization_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert load_tokenizer(locate_model(d))("w1 w2").input_ids
    assert not marker.exists()


def test_every_from_pretrained_goes_through_the_safety_check():
    """One check in front of transformers: no ``.from_pretrained(`` call outside weightsmith/safety.py."""
    calls = []
    for f in sorted((REPO / "weightsmith").rglob("*.py")):
        if f.name == "safety.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\.from_pretrained\(", line) and not line.lstrip().startswith("#"):
                calls.append(f"{f.relative_to(REPO)}:{i}")
    assert calls == []


# ---- no pickles anywhere -------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker


def _pickle_dir(tmp_path: Path) -> tuple[Path, Path]:
    d = save_pico(tmp_path / "pkl", "llama")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    return d, marker


@pytest.mark.parametrize("command", ["quantize", "inspect", "eval", "eval-reference", "inspect-reference"])
def test_pickle_checkpoints_are_refused_everywhere(tmp_path, text, capsys, command):
    d, marker = _pickle_dir(tmp_path)
    good = save_pico(tmp_path / "good", "llama")
    argv = {"quantize": ["quantize", str(d), str(tmp_path / "o"), "--calib", str(text), *FAST],
            "inspect": ["inspect", str(d)],
            "eval": ["eval", str(d), "--text", str(text), "--quiet"],
            "eval-reference": ["eval", str(good), "--reference", str(d), "--text", str(text), "--quiet"],
            "inspect-reference": ["inspect", str(good), "--reference", str(d)]}[command]
    one_line_error(*run(argv, capsys), "pickle", "pytorch_model.bin")
    assert not marker.exists()


def test_config_pointing_at_a_pickle_is_refused(tmp_path, text, capsys):
    d = save_pico(tmp_path / "m", "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["transformers_weights"] = "adapter_model.bin"
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run(["eval", str(d), "--text", str(text), "--quiet"], capsys), "adapter_model.bin", "safetensors only")


# ---- nothing the user owns is lost ---------------------------------------------------------------
def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*")}


@pytest.fixture
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    src = save_pico(d / "src", "llama")
    weightsmith.quantize(src, {"method": "rtn", "grid": {"group_size": 32}}, torch.zeros(2, 8, dtype=torch.long), out=d / "q", progress=False)
    return d / "q"


def test_output_that_is_contains_or_lies_inside_an_input_is_refused(pico, tmp_path, text, capsys, monkeypatch, quantized):
    src = pico()
    before, qbefore = _snapshot(src), _snapshot(quantized)
    calib_dir = tmp_path / "calibdir"
    calib_dir.mkdir()
    (calib_dir / "a.txt").write_text(make_text(2000))
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    cases = [
        (["quantize", str(src), str(src), "--overwrite", *FAST, "--calib", str(text)], "is the input"),
        (["quantize", str(src), str(src / "inside"), *FAST, "--calib", str(text)], "lies inside the input"),
        (["quantize", str(link), str(src), "--overwrite", *FAST, "--calib", str(text)], "is the input"),  # symlinks resolved
        (["quantize", str(src), str(tmp_path), "--overwrite", *FAST, "--calib", str(text)], "contains the input"),
        (["quantize", str(src), str(calib_dir / "o"), *FAST, "--calib", str(calib_dir)], "lies inside the input"),
        (["quantize", str(src), str(tmp_path / "x.gguf"), "--format", "gguf", *FAST, "--calib", str(text),
          "--gguf-template", str(tmp_path / "x.gguf")], "is the input"),
        (["export", str(quantized), str(quantized), "--format", "gptq", "--overwrite", "--quiet"], "is the input"),
        (["export", str(quantized), str(quantized / "packed"), "--format", "compressed-tensors", "--quiet"], "lies inside the input"),
    ]
    for argv, needle in cases:
        one_line_error(*run(argv, capsys), needle)
    monkeypatch.chdir(tmp_path / "calibdir")
    one_line_error(*run(["quantize", str(src), ".", "--overwrite", *FAST, "--calib", str(text)], capsys), "current directory")
    assert _snapshot(src) == before and _snapshot(quantized) == qbefore
    assert entries(tmp_path) == ["calibdir", "link-to-src", "pico-llama", "text.txt"]


def test_a_second_run_is_refused_while_the_first_holds_out(pico, tmp_path, text, capsys):
    """The first run's lock (taken here as another process would hold it) protects its OUT.partial
    from a second run, ``--overwrite`` or not; once it is released, the second run works."""
    out = tmp_path / "o"
    partial = tmp_path / "o.partial"
    partial.mkdir()
    (partial / "first-run-shard").write_text("live")
    fd = os.open(tmp_path / ".o.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            one_line_error(*run(["quantize", str(pico()), str(out), "--calib", str(text), *FAST, *extra], capsys),
                           "another weightsmith process is writing")
            assert (partial / "first-run-shard").read_text() == "live"
    finally:
        os.close(fd)
    (tmp_path / ".o.lock").unlink()
    fd = os.open(tmp_path / ".p.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:  # quantize --format holds its final OUT's lock from the start, as export does
        one_line_error(*run(["quantize", str(pico()), str(tmp_path / "p"), "--format", "gptq", "--calib", str(text), *FAST], capsys),
                       "another weightsmith process is writing")
    finally:
        os.close(fd)
    (tmp_path / ".p.lock").unlink()
    partial.rename(tmp_path / "first-run")
    code, out_json, err = run(["quantize", str(pico()), str(out), "--calib", str(text), *FAST, "--overwrite"], capsys)
    assert code == 0, err
    assert entries(tmp_path) == ["first-run", "o", "pico-llama", "text.txt"]  # no lock file, no partial, no .old-<pid>


def test_a_directory_appearing_at_out_during_the_run_is_never_removed(pico, tmp_path, text, capsys, monkeypatch, quantized):
    import weightsmith.api as api

    out = tmp_path / "o"
    real = api.write_report

    def someone_else_creates_out(*a, **k):
        real(*a, **k)
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")

    monkeypatch.setattr(api, "write_report", someone_else_creates_out)
    src = pico()
    one_line_error(*run(["quantize", str(src), str(out), "--calib", str(text), *FAST], capsys), "appeared", "not replaced", "--resume")
    assert entries(out) == ["theirs.txt"]
    assert (tmp_path / "o.partial" / "report.json").is_file()  # the finished run is kept, not lost
    assert not any(p.name.startswith((".o.old", ".o.lock")) for p in tmp_path.iterdir())
    monkeypatch.setattr(api, "write_report", real)
    (out / "theirs.txt").rename(tmp_path / "theirs.txt")
    out.rmdir()
    code, _, err = run(["quantize", str(src), str(out), "--calib", str(text), *FAST, "--resume"], capsys)
    assert code == 0, err
    assert (out / "report.json").is_file() and not (tmp_path / "o.partial").exists()

    import weightsmith.export.gptq as gptq

    real_export = gptq.export_gptq
    packed = tmp_path / "packed"

    def export_and_collide(*a, **k):
        info = real_export(*a, **k)
        packed.mkdir()
        (packed / "theirs.txt").write_text("keep me")
        return info

    monkeypatch.setattr(gptq, "export_gptq", export_and_collide)
    one_line_error(*run(["export", str(quantized), str(packed), "--format", "gptq", "--quiet"], capsys), "appeared", "not replaced")
    assert entries(packed) == ["theirs.txt"]
    assert not any(p.name.startswith(".packed") for p in tmp_path.iterdir())


def test_symlink_or_file_at_out_is_refused_up_front(pico, tmp_path, text, capsys):
    src = pico()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, extra, needle in [(dangling, [], "dangling symbolic link"), (link, ["--overwrite"], "symbolic link"),
                               (afile, ["--overwrite"], "not a directory")]:
        one_line_error(*run(["quantize", str(src), str(out), "--calib", str(text), *FAST, *extra], capsys), needle)
    one_line_error(*run(["export", str(src), str(afile), "--format", "gptq", "--overwrite", "--quiet"], capsys), "not a directory")
    assert entries(tmp_path) == ["afile", "dangling", "link", "pico-llama", "target", "text.txt"]
    assert entries(target) == ["mine.txt"] and afile.read_text() == "mine"


def test_overwrite_leaves_no_old_directory_behind(pico, tmp_path, text, capsys):
    out = tmp_path / "o"
    for _ in range(2):
        code, _, err = run(["quantize", str(pico()), str(out), "--calib", str(text), *FAST, "--overwrite"], capsys)
        assert code == 0, err
    assert entries(tmp_path) == ["o", "pico-llama", "text.txt"]


def test_format_intermediate_is_kept_and_resumed_consistently(pico, tmp_path, text, capsys, monkeypatch):
    """quantize --format: an interrupted run says where its blocks are kept (the intermediate's
    .partial), a rerun without --resume/--overwrite refuses to throw them away, --resume uses them."""
    from weightsmith.engine import checkpoint

    real = checkpoint.Checkpointer.commit

    def interrupt_after_block_0(self, i, *a, **k):
        real(self, i, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "commit", interrupt_after_block_0)
    out = tmp_path / "o"
    argv = ["quantize", str(pico()), str(out), "--format", "gptq", "--calib", str(text), *FAST]
    code, _, err = run(argv, capsys)
    kept = tmp_path / ".o.dequantized.partial"
    assert code == 130 and err == f"error: interrupted; the committed blocks are kept in {kept} (rerun the same command with --resume)\n"
    monkeypatch.setattr(checkpoint.Checkpointer, "commit", real)
    one_line_error(*run(argv, capsys), "interrupted run", "--resume")
    assert kept.is_dir()
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert entries(tmp_path) == ["o", "pico-llama", "text.txt"]


# ---- every malformed input: one line, exit 2, before any work ------------------------------------
def _rewrite_header(f: Path, edit) -> None:
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header, data = edit(header, data)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + data)


def _last(h: dict) -> str:
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _shift_last(h, data):
    k = _last(h)
    h[k]["data_offsets"] = [o + 8 for o in h[k]["data_offsets"]]
    return h, data + b"\0" * 8


def _extra_tensor(h, data):
    end = h[_last(h)]["data_offsets"][1]
    h["ghost"] = {"dtype": "F32", "shape": [4], "data_offsets": [end, end + 16]}
    return h, data


def _shape(new):
    def edit(h, data):
        h[_last(h)]["shape"] = new
        return h, data
    return edit


def _overlap(h, data):
    ks = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[ks[1]]["data_offsets"] = list(h[ks[0]]["data_offsets"])
    h[ks[1]]["shape"], h[ks[1]]["dtype"] = h[ks[0]]["shape"], h[ks[0]]["dtype"]
    return h, data


CORRUPTIONS = {
    "not-an-object": (lambda h, data: ([h], data), "not an object"),
    "gap": (_shift_last, "not contiguous"),
    "outside-the-file": (_extra_tensor, "truncated"),
    "size-not-dtype-x-shape": (_shape([3, 5]), "needs"),
    "negative-shape": (_shape([-1, 64]), "invalid shape"),
    "huge-shape": (_shape([2**40, 2**40]), "needs"),
    "overlap": (_overlap, "not contiguous"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_malformed_safetensors_header_is_one_line_for_every_command(pico, tmp_path, text, capsys, corruption):
    src = pico()
    edit, needle = CORRUPTIONS[corruption]
    _rewrite_header(src / "model.safetensors", edit)
    for argv in (["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST], ["inspect", str(src)],
                 ["eval", str(src), "--text", str(text), "--quiet"]):
        one_line_error(*run(argv, capsys), "corrupt safetensors file", "model.safetensors", needle)
    assert entries(tmp_path) == ["pico-llama", "text.txt"]


def test_inspect_on_malformed_configs_and_reports(pico, tmp_path, capsys, quantized):
    import shutil

    src = pico()
    (src / "config.json").write_text("[1, 2]")
    one_line_error(*run(["inspect", str(src)], capsys), "config.json", "not a JSON object")
    gq = tmp_path / "gq"
    assert main(["export", str(quantized), str(gq), "--format", "gptq", "--quiet"]) == 0
    cfg = json.loads((gq / "config.json").read_text())
    for qc, needle in [("gptq", "quantization_config is a str"), ({**cfg["quantization_config"], "bits": "four"}, "bits is 'four'")]:
        (gq / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        one_line_error(*run(["inspect", str(gq)], capsys), needle)
    wq = tmp_path / "wq"
    shutil.copytree(quantized, wq)
    (wq / "report.json").write_text("{not json")
    one_line_error(*run(["inspect", str(wq)], capsys), "report.json", "not valid JSON")


def test_bad_regex_and_bad_device_are_one_line(pico, tmp_path, text, capsys):
    src = pico()
    one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST, "--ignore", "("], capsys),
                   "--ignore", "not a valid regular expression")
    one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST, "--device", "bogus"], capsys),
                   "device 'bogus'")
    one_line_error(*run(["eval", str(src), "--text", str(text), "--device", "bogus", "--quiet"], capsys), "device 'bogus'")
    assert entries(tmp_path) == ["pico-llama", "text.txt"]


def _interrupt_after_block(monkeypatch, block: int, how):
    from weightsmith.engine import checkpoint

    real = checkpoint.Checkpointer.commit

    def commit(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == block:
            how()

    monkeypatch.setattr(checkpoint.Checkpointer, "commit", commit)
    return real


def test_truncated_resume_state_is_one_line(pico, tmp_path, text, capsys, monkeypatch):
    from weightsmith.engine import checkpoint

    def interrupt():
        raise KeyboardInterrupt

    real = _interrupt_after_block(monkeypatch, 0, interrupt)
    out = tmp_path / "o"
    argv = ["quantize", str(pico()), str(out), "--calib", str(text), *FAST]
    assert run(argv, capsys)[0] == 130
    monkeypatch.setattr(checkpoint.Checkpointer, "commit", real)
    state = next((tmp_path / "o.partial" / checkpoint.STATE).glob("acts-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-100])
    one_line_error(*run([*argv, "--resume"], capsys), "cannot resume", "--overwrite")
    assert (tmp_path / "o.partial").is_dir()


def test_sigterm_ends_like_ctrl_c(pico, tmp_path, text, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    _interrupt_after_block(monkeypatch, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, out, err = run(["quantize", str(pico()), str(tmp_path / "o"), "--calib", str(text), *FAST], capsys)
    assert code == 130 and out == ""
    assert err == f"error: interrupted; the committed blocks are kept in {tmp_path / 'o.partial'} (rerun the same command with --resume)\n"
    assert signal.getsignal(signal.SIGTERM) is before  # main() puts the previous handler back


def test_seqlen_past_the_positions(tmp_path, text, capsys, caplog):
    gpt2 = save_pico(tmp_path / "gpt2", "gpt2")  # 512 absolute positions
    one_line_error(*run(["quantize", str(gpt2), str(tmp_path / "o"), "--calib", str(text), *FAST, "--seqlen", "600"], capsys),
                   "--seqlen 600", "512 positions")
    one_line_error(*run(["eval", str(gpt2), "--text", str(text), "--seqlen", "600", "--windows", "1", "--quiet"], capsys),
                   "--seqlen 600", "512 positions")
    opt = save_pico(tmp_path / "opt", "opt")
    one_line_error(*run(["quantize", str(opt), str(tmp_path / "o"), "--calib", str(text), *FAST, "--seqlen", "600"], capsys),
                   "512 positions")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "opt", "text.txt"]
    llama = save_pico(tmp_path / "llama", "llama")  # rotary: runs, with a warning
    code, out, err = run(["quantize", str(llama), str(tmp_path / "o"), "--calib", str(text), "--method", "gptq", "--nsamples", "1",
                          "--seqlen", "600"], capsys)
    assert code == 0, err
    assert "600 is longer than the model's max_position_embeddings 512" in err + caplog.text


# ---- numbers: never garbage with exit 0 ----------------------------------------------------------
def _set_weight(src: Path, key_part: str, fn) -> str:
    f = src / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if key_part in k)
    fn(sd[key])
    save_file(sd, f, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [1e30, math.inf, math.nan])
def test_absurd_or_non_finite_weight_stops_before_quantizing(pico, tmp_path, text, capsys, value):
    src = pico()
    key = _set_weight(src, "layers.1.self_attn.q_proj", lambda t: t.__setitem__((0, 0), value))
    one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST], capsys), key,
                   "NaN/Inf" if not math.isfinite(value) else "magnitude 1e+30")
    assert entries(tmp_path) == ["pico-llama", "text.txt"]


def test_large_weights_pass_with_the_explicit_flag(pico, tmp_path, text, capsys):
    src = pico()
    key = _set_weight(src, "layers.0.mlp.up_proj", lambda t: t.__setitem__((0, 0), 1e7))
    one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST], capsys), key, "--allow-large-weights")
    code, out, err = run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(text), *FAST, "--allow-large-weights"], capsys)
    assert code == 0, err
    strict_json(out)


def test_all_zero_layer_has_error_zero_and_every_json_is_valid(pico, tmp_path, text, capsys):
    src = pico()
    _set_weight(src, "layers.0.self_attn.o_proj", lambda t: t.zero_())
    out = tmp_path / "o"
    code, stdout, err = run(["quantize", str(src), str(out), "--calib", str(text), *FAST], capsys)
    assert code == 0, err
    line = strict_json(stdout)
    assert line["mean_error"] is not None and math.isfinite(line["mean_error"])
    rep = strict_json((out / "report.json").read_text())
    row = next(r for r in rep["layers"] if r["name"].endswith("layers.0.self_attn.o_proj"))
    assert row["error"] == 0.0 and row["rtn_error"] == 0.0
    code, stdout, err = run(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    strict_json(stdout)


def test_json_output_maps_non_finite_numbers_to_null():
    from weightsmith.quant.grid import relative_error
    from weightsmith.validate import dumps

    z = torch.zeros(4, 8)
    assert relative_error(z, z, torch.eye(8)) == 0.0
    assert relative_error(z, torch.ones(4, 8), torch.zeros(8, 8)) == 0.0
    assert strict_json(dumps({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_truncated_gguf_is_one_line_for_every_command(tmp_path, text, capsys, quantized):
    gguf = tmp_path / "x.gguf"
    assert main(["export", str(quantized), str(gguf), "--format", "gguf", "--gguf-unverified-tokenizer", "--quiet"]) == 0
    data = gguf.read_bytes()
    for cut in (100, len(data) // 2):
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        for argv in (["eval", str(bad), "--text", str(text), "--quiet"], ["inspect", str(bad)],
                     ["quantize", str(bad), str(tmp_path / "o"), "--calib", str(text), *FAST]):
            one_line_error(*run(argv, capsys), "cannot read GGUF file", "cut.gguf")


LIVE_RUN = r"""
import sys, time
from weightsmith.engine import checkpoint
orig = checkpoint.Checkpointer.commit
def commit(self, *a, **k):
    orig(self, *a, **k)
    print("committed", flush=True)
    time.sleep(120)
checkpoint.Checkpointer.commit = commit
from weightsmith.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_live_first_run_keeps_its_work_and_sigterm_ends_it_like_ctrl_c(pico, tmp_path, text, capsys):
    """Two real processes: while the first lives, a second run with --overwrite is refused and the
    first run's OUT.partial is untouched; SIGTERM then ends the first with one line, its blocks kept."""
    src, out = pico(), tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-c", LIVE_RUN, "quantize", str(src), str(out), "--calib", str(text), *FAST],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert first.stdout.readline().strip() == "committed"
        before = _snapshot(tmp_path / "o.partial")
        one_line_error(*run(["quantize", str(src), str(out), "--calib", str(text), *FAST, "--overwrite"], capsys),
                       "another weightsmith process is writing")
        assert _snapshot(tmp_path / "o.partial") == before
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: interrupted; the committed blocks are kept in {out}.partial (rerun the same command with --resume)"
    code, _, err = run(["quantize", str(src), str(out), "--calib", str(text), *FAST, "--resume"], capsys)
    assert code == 0, err
    assert entries(tmp_path) == ["o", "pico-llama", "text.txt"]
