"""Resume after a kill: SIGKILL a quantization after block k is committed, resume it, and get an output
bit-identical to an uninterrupted run without recomputing blocks < k; a kill during the final write
leaves OUT complete or absent; a resume that does not match the interrupted job is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weightsmith.cli import main
from weightsmith.engine.checkpoint import MANIFEST
from conftest import make_text, save_pico

ROOT = Path(__file__).resolve().parent.parent
N_BLOCKS = 5

# The CLI with test-only instrumentation: every quantized group appends its block index to $TRACE
# (to see which blocks a run computed), and a pause ($PAUSE_AT) gives the test time to kill it at
# a chosen point: "commit" (after each block's commit), "report" (final files being written) or
# "rename" (OUT renamed into place, before its manifest is removed).
DRIVER = r"""
import os, sys, time
from weightsmith.engine import checkpoint, streamer
import weightsmith.api as api
pause, at = float(os.environ.get("PAUSE", "0")), os.environ.get("PAUSE_AT", "")
orig_call = streamer.GroupQuantizer.__call__
def traced(self, g, h, stats=None):
    with open(os.environ["TRACE"], "a") as f:
        f.write(f"{self.block_index}\n")
    return orig_call(self, g, h, stats=stats)
streamer.GroupQuantizer.__call__ = traced
orig_commit = checkpoint.Checkpointer.commit
def commit(self, *a, **k):
    orig_commit(self, *a, **k)
    if at == "commit":
        time.sleep(pause)
checkpoint.Checkpointer.commit = commit
orig_report = api.write_report
def report(*a, **k):
    orig_report(*a, **k)
    if at == "report":
        print("final", flush=True)
        time.sleep(pause)
api.write_report = report
orig_rename = checkpoint.os.rename
class _os:
    def __getattr__(self, n):
        return getattr(os, n)
    @staticmethod
    def rename(a, b):
        orig_rename(a, b)
        if at == "rename" and str(a).endswith(".partial"):
            print("final", flush=True)
            time.sleep(pause)
checkpoint.os = _os()
from weightsmith.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    src = save_pico(d / "src", "llama", layers=N_BLOCKS)
    calib = d / "calib.txt"
    calib.write_text(make_text(4000, seed=2))
    args = ["--quiet", "--method", "gptq", "--bits", "4", "--group-size", "16", "--calib", str(calib), "--nsamples", "12",
            "--seqlen", "32", "--chunk-size", "4"]
    ref = d / "ref"
    cli(src, ref, args, trace=d / "ref.trace")
    return {"dir": d, "src": src, "args": args, "ref": ref}


def cli(src, out, args, trace, pause_at="", pause=0.0, wait=True):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "TRACE": str(trace), "PAUSE_AT": pause_at, "PAUSE": str(pause)}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, "quantize", str(src), str(out), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out_, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return p


def traced_blocks(trace: Path) -> set[int]:
    return {int(x) for x in trace.read_text().split()}


def manifest(out: Path) -> dict | None:
    f = out.parent / f"{out.name}.partial" / MANIFEST
    try:
        return json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def assert_same_output(a: Path, b: Path) -> None:
    """Every file bit-identical, except the report's timings."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        if rel.name.startswith("report."):
            continue
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ra, rb = (json.loads((x / "report.json").read_text())["layers"] for x in (a, b))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)


def test_kill_after_block_k_then_resume_is_bit_identical(job, tmp_path):
    out, k = tmp_path / "out", 2
    trace1, trace2 = tmp_path / "t1", tmp_path / "t2"
    p = cli(job["src"], out, job["args"], trace1, pause_at="commit", pause=2.0, wait=False)
    deadline = time.time() + 120
    while (m := manifest(out)) is None or m["committed"] < k:
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert m["committed"] == k and not out.exists()
    partial = tmp_path / "out.partial"
    kept = {f.name: f.stat().st_mtime_ns for f in partial.glob("model-*.safetensors")}
    kept.update({f"q{f.name}": f.stat().st_mtime_ns for f in (partial / "qparams").glob("*.safetensors")})
    assert traced_blocks(trace1) == set(range(k)) or traced_blocks(trace1) == set(range(k + 1))  # may have begun block k

    # without --resume the interrupted run is not clobbered
    code = main(["quantize", str(job["src"]), str(out), *job["args"]])
    assert code == 2 and partial.is_dir()

    cli(job["src"], out, [*job["args"], "--resume"], trace2)
    assert traced_blocks(trace2) == set(range(k, N_BLOCKS))  # blocks < k were not recomputed
    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed_from_block"] == k and rep["blocks_computed"] == N_BLOCKS - k
    for name, mtime in kept.items():  # and their files were not rewritten
        f = out / name if not name.startswith("q") else out / "qparams" / name[1:]
        if int(name.rsplit("block-", 1)[-1].split(".")[0]) < k if name.startswith("q") else int(name[6:11]) <= k:
            assert f.stat().st_mtime_ns == mtime, name
    assert not partial.exists() and not (out / MANIFEST).exists()
    assert not any(p.name.startswith(".weightsmith") for p in out.rglob("*"))
    assert_same_output(job["ref"], out)


def test_resume_refuses_another_job(job, tmp_path, capsys):
    out = tmp_path / "out"
    p = cli(job["src"], out, job["args"], tmp_path / "t", pause_at="commit", pause=30.0, wait=False)
    deadline = time.time() + 120
    while (m := manifest(out)) is None or m["committed"] < 1:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    cases = [
        (["--bits", "3"], "the configuration [config.grid.bits] (4 then, 3 now)"),
        (["--nsamples", "8"], "differs"),
        (["--save-dtype", "bfloat16"], "the output dtype"),
    ]
    for extra, msg in cases:
        capsys.readouterr()
        code = main(["quantize", str(job["src"]), str(out), *job["args"], "--resume", *extra])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and err.startswith("error: cannot resume") and err.count("\n") == 1, err
    shard = sorted(job["src"].glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input checkpoint changed
    try:
        code = main(["quantize", str(job["src"]), str(out), *job["args"], "--resume"])
        err = capsys.readouterr().err
        assert code == 2 and "the input checkpoint" in err, err
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (tmp_path / "out.partial" / MANIFEST).is_file()  # refusals keep the interrupted run
    code = main(["quantize", str(job["src"]), str(out), *job["args"], "--overwrite"])  # start over
    assert code == 0 and not (tmp_path / "out.partial").exists()
    assert_same_output(job["ref"], out)


@pytest.mark.parametrize("at", ["report", "rename"])
def test_kill_during_final_write_leaves_out_complete_or_absent(job, tmp_path, at):
    out = tmp_path / "out"
    p = cli(job["src"], out, job["args"], tmp_path / "t", pause_at=at, pause=30.0, wait=False)
    assert p.stdout.readline().strip() == "final"
    p.send_signal(signal.SIGKILL)
    p.wait()
    if at == "report":  # killed before the rename: absent, and --resume only finishes the job
        assert not out.exists()
        cli(job["src"], out, [*job["args"], "--resume"], tmp_path / "t2")
        assert not (tmp_path / "t2").exists() or traced_blocks(tmp_path / "t2") == set()
    else:  # killed after the rename: complete (one small hidden manifest may remain)
        assert out.is_dir() and not (tmp_path / "out.partial").exists()
        (out / MANIFEST).unlink(missing_ok=True)
    assert_same_output(job["ref"], out)


def test_save_dtype_bfloat16_halves_the_output(pico, tmp_path):
    """``--save-dtype bfloat16`` (for large float32 inputs whose float32 output would not fit the disk): the
    output loads with transformers, its float tensors are bfloat16 and hold the float32 result rounded."""
    import torch
    import transformers
    from safetensors.torch import load_file

    import weightsmith
    from conftest import calib_ids

    src = pico()
    cfg = {"method": "gptq", "grid": {"group_size": 16}}
    weightsmith.quantize(src, cfg, calib_ids(4, 16), out=tmp_path / "f32", progress=False)
    rep = weightsmith.quantize(src, cfg, calib_ids(4, 16), out=tmp_path / "bf16", progress=False, save_dtype="bfloat16")
    assert rep["save_dtype"] == "bfloat16"
    a, b = ({k: v for f in sorted(d.glob("model-*.safetensors")) for k, v in load_file(f).items()} for d in (tmp_path / "f32", tmp_path / "bf16"))
    assert a.keys() == b.keys() and all(v.dtype == torch.bfloat16 for v in b.values())
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    size = lambda d: sum(f.stat().st_size for f in d.glob("model-*.safetensors"))  # noqa: E731
    assert size(tmp_path / "bf16") < 0.55 * size(tmp_path / "f32")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")


@pytest.mark.parametrize("float_samples", [None, 4], ids=["all", "subset"])
def test_float_path_method_resumes_bit_identical(tmp_path, monkeypatch, float_samples):
    """GPTAQ carries the float path's hidden states between blocks: they are committed with each block
    (all samples' or, with ``float_samples``, the first chunks'), and a resumed run continues from them."""
    import weightsmith
    from weightsmith.engine import checkpoint
    from conftest import calib_ids

    src = save_pico(tmp_path / "src", "llama", layers=4)
    cfg = {"method": {"name": "gptaq", "float_samples": float_samples}, "grid": {"bits": 3, "group_size": 16}, "chunk_size": 4}
    ids = calib_ids(8, 16)
    weightsmith.quantize(src, cfg, ids, out=tmp_path / "ref", progress=False)
    orig = checkpoint.Checkpointer.commit

    def crash_after_block_1(self, i, *a, **k):
        orig(self, i, *a, **k)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "commit", crash_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        weightsmith.quantize(src, cfg, ids, out=tmp_path / "out", progress=False)
    monkeypatch.setattr(checkpoint.Checkpointer, "commit", orig)
    rep = weightsmith.quantize(src, cfg, ids, out=tmp_path / "out", progress=False, resume=True)
    assert rep["resumed_from_block"] == 2 and rep["blocks_computed"] == 2
    assert_same_output(tmp_path / "ref", tmp_path / "out")
