"""Faults and bad input: each gives one clear line (``error: ...``, exit 2) and leaves nothing behind, or,
for a numerically hopeless layer, a documented fallback. Complements test_cli.py (missing paths, bad
flags, empty/short/Latin-1 calibration, NaN weights, a truncated single-file checkpoint)."""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightsmith
from weightsmith.cli import main
from conftest import calib_ids, make_text

FAST = ["--quiet", "--method", "gptq", "--group-size", "16", "--nsamples", "4", "--seqlen", "16"]


def run(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


def nothing_left(parent: Path, *keep: str) -> None:
    assert sorted(p.name for p in parent.iterdir() if p.name not in keep) == []


@pytest.fixture
def calib(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(make_text(2000, seed=1))
    return p


def reshard(src: Path) -> list[Path]:
    """Split a single-file checkpoint into two shards plus an index (as large checkpoints come)."""
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    files, weight_map = [], {}
    for k, part in enumerate(halves):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({x: sd[x] for x in part}, src / name, metadata={"format": "pt"})
        weight_map.update({x: name for x in part})
        files.append(src / name)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_truncated_and_missing_shards(pico, tmp_path, calib, capsys):
    src = pico()
    shards = reshard(src)
    data = shards[1].read_bytes()
    out = tmp_path / "o"
    shards[1].write_bytes(data[: len(data) - 1000])  # the data section cut short
    assert_one_line_error(*run(["quantize", str(src), str(out), "--calib", str(calib), *FAST], capsys), "corrupt", "truncated", shards[1].name)
    shards[1].write_bytes(data[:5])  # even the header length is cut
    assert_one_line_error(*run(["quantize", str(src), str(out), "--calib", str(calib), *FAST], capsys), "corrupt", shards[1].name)
    shards[1].unlink()
    assert_one_line_error(*run(["quantize", str(src), str(out), "--calib", str(calib), *FAST], capsys), "missing", shards[1].name)
    nothing_left(tmp_path, "pico-llama", "calib.txt")


@pytest.mark.parametrize("change,needle", [
    ({"intermediate_size": 96}, "does not match config.json"),  # shapes differ
    ({"num_hidden_layers": 3}, "lacks block 2 tensor"),  # more blocks than the weights hold
])
def test_config_that_does_not_match_the_weights(pico, tmp_path, calib, capsys, change, needle):
    src = pico()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(calib), *FAST], capsys), needle)
    nothing_left(tmp_path, "pico-llama", "calib.txt")


def test_inf_weights_outside_the_blocks(pico, tmp_path, calib, capsys):
    src = pico()
    f = src / "model.safetensors"
    sd = load_file(f)
    sd["model.embed_tokens.weight"][3, 1] = -math.inf
    save_file(sd, f, metadata={"format": "pt"})
    assert_one_line_error(*run(["quantize", str(src), str(tmp_path / "o"), "--calib", str(calib), *FAST], capsys),
                          "NaN/Inf", "model.embed_tokens.weight")
    nothing_left(tmp_path, "pico-llama", "calib.txt")


def test_singular_hessian_falls_back_to_rtn_and_says_so(pico, tmp_path, monkeypatch):
    """No damping up to 100 % makes the factorisation succeed (simulated): RTN, reported, never NaN."""
    real = torch.linalg.cholesky_ex

    def failing(a, *args, **kw):
        l, _ = real(a, *args, **kw)
        return l, torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    out = tmp_path / "q"
    rep = weightsmith.quantize(pico(), {"method": "gptq", "grid": {"group_size": 16}}, calib_ids(4, 16), out=out, progress=False)
    assert len(rep["summary"]["fallbacks"]) == len(rep["layers"]) == 14
    assert all("rtn" in f["why"] and "damping 1.0" in f["why"] for f in rep["summary"]["fallbacks"])
    assert all(r["damp"] is None and math.isfinite(r["error"]) for r in rep["layers"])
    assert all(torch.isfinite(t).all() for f in out.glob("model-*.safetensors") for t in load_file(f).values())
    assert "fallbacks" in (out / "report.json").read_text()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_calibration_in_the_wrong_encoding(pico, tmp_path, capsys, encoding):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(make_text(2000).encode(encoding))
    assert_one_line_error(*run(["quantize", str(pico()), str(tmp_path / "o"), "--calib", str(bad), *FAST], capsys), "not valid UTF-8")
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_bytes(json.dumps({"text": make_text(500)}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    assert_one_line_error(*run(["quantize", str(pico()), str(tmp_path / "o"), "--calib", str(jsonl), *FAST], capsys), "UTF-8")
    nothing_left(tmp_path, "pico-llama", "calib.txt", "calib.jsonl")


def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> bool:
    where.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, size: str = "1m", ro: bool = False) -> Path:
        where = tmp_path / name
        if os.geteuid() != 0 or not _mount_tmpfs(where, size, ro):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(where)
        return where

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], capture_output=True)


def test_read_only_output_location(pico, tmp_path, calib, capsys, tmpfs):
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    else:  # root ignores permission bits: a read-only filesystem
        parent = tmpfs("ro", ro=True)
    assert_one_line_error(*run(["quantize", str(pico()), str(parent / "o"), "--calib", str(calib), *FAST], capsys),
                          "cannot write to", "permission denied")
    assert list(parent.iterdir()) == []


def test_disk_too_small_fails_early(pico, tmp_path, calib, capsys, tmpfs):
    small = tmpfs("small", "16k")
    assert_one_line_error(*run(["quantize", str(pico()), str(small / "o"), "--calib", str(calib), *FAST], capsys), "not enough disk space")
    assert list(small.iterdir()) == []


def test_disk_full_mid_write_on_a_real_tmpfs(pico, tmp_path, calib, capsys, tmpfs, monkeypatch):
    small = tmpfs("small", "160k")  # room for the first block's shard, not for the rest
    from weightsmith.engine.checkpoint import WorkDir

    monkeypatch.setattr(WorkDir, "check_space", lambda self, needed: None)  # pretend the estimate was wrong
    assert_one_line_error(*run(["quantize", str(pico()), str(small / "o"), "--calib", str(calib), *FAST], capsys),
                          "disk full", "nothing was left behind")
    assert list(small.iterdir()) == []


def test_disk_full_mid_write_simulated(pico, tmp_path, calib, capsys, monkeypatch):
    """Portable variant (no mount): the writer raises ENOSPC on the second shard."""
    import weightsmith.model.saving as saving

    real, calls = saving.save_file, []

    def full(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 3:  # block 0's shard and qparams went through; block 1's shard does not
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(saving, "save_file", full)
    assert_one_line_error(*run(["quantize", str(pico()), str(tmp_path / "o"), "--calib", str(calib), *FAST], capsys),
                          "disk full", "nothing was left behind")
    assert len(calls) == 3
    nothing_left(tmp_path, "pico-llama", "calib.txt")


def test_space_check_counts_the_float_path_state(pico):
    """The resume state of a float-path method holds the float hidden states of its float samples too."""
    import torch

    from weightsmith.api import _output_bytes
    from weightsmith.config import build_config
    from weightsmith.model.adapter import LazyModel
    from weightsmith.model.source import CheckpointSource

    ids = torch.zeros(8, 16, dtype=torch.long)
    with CheckpointSource(pico()) as source:
        lm = LazyModel(source, "cpu")
        need = {tag: _output_bytes(source, lm, build_config(method=m, chunk_size=2), ids, None)
                for tag, m in [("gptq", "gptq"), ("all", "gptaq"), ("four", {"name": "gptaq", "float_samples": 3})]}
    per_sample = 2 * 16 * lm.config.hidden_size * 4  # two generations of one sample's float32 hidden states
    assert need["all"] - need["gptq"] == 8 * per_sample
    assert need["four"] - need["gptq"] == 4 * per_sample  # 3 samples round up to two chunks of 2
