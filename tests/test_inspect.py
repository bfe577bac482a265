"""``weightsmith inspect`` on every format it reads, with and without a reference."""
from __future__ import annotations

import json

import pytest
from conftest import calib_ids, save_pico

import weightsmith
from weightsmith.cli import main
from weightsmith.export import export
from weightsmith.inspect import inspect


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    src = save_pico(d / "pico", "llama")
    q = d / "q"
    rep = weightsmith.quantize(src, {"method": "rtn", "grid": {"bits": 4, "group_size": 32, "sym": True}}, calibration=calib_ids(), out=q, progress=False)
    export(q, d / "ct", "compressed-tensors")
    export(q, d / "gptq", "gptq")
    export(q, d / "m.gguf", "gguf", gguf_unverified_tokenizer=True)
    return d, src, q, rep


def test_inspect_every_format_against_the_reference(models):
    d, src, q, rep = models
    # the weight error of a layer: identical whichever packed form it is read from (GPTQ / GGUF: fp16 scales)
    want = {}
    for layer in rep["layers"]:
        want[layer["name"] + ".weight"] = None
    base = inspect(q, reference=src)
    assert base["format"] == "weightsmith" and base["quantized_layers"] == 14
    errs = {r["name"]: r["rel_error"] for r in base["tensors"] if r.get("rel_error") is not None}
    assert set(want) <= set(errs) and all(0.01 < errs[k] < 0.3 for k in want)
    assert errs["model.embed_tokens.weight"] == 0.0
    for fmt, path, tol, bpw in (("compressed-tensors", d / "ct", 1e-6, (4.9, 5.2)), ("gptq", d / "gptq", 1e-3, (4.6, 5.2)),
                                ("gguf", d / "m.gguf", 1e-3, (4.49, 4.51))):
        res = inspect(path, reference=src)
        assert res["format"] == fmt and res["quantized_layers"] == 14, fmt
        assert bpw[0] < res["bits_per_weight_quantized"] < bpw[1], (fmt, res["bits_per_weight_quantized"])
        assert res["size_on_disk_bytes"] == (path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
        if fmt == "gguf":  # GGUF names: compare by layer position
            got = {r["name"]: r["rel_error"] for r in res["tensors"] if r["name"] == "blk.1.attn_k.weight"}
            assert got["blk.1.attn_k.weight"] == pytest.approx(errs["model.layers.1.self_attn.k_proj.weight"], rel=tol, abs=1e-5)
        else:
            for k in want:
                r = next(r for r in res["tensors"] if r["name"] == k)
                assert r["rel_error"] == pytest.approx(errs[k], rel=tol, abs=1e-5), (fmt, k)
    plain = inspect(src)
    assert plain["format"] == "float" and plain["quantized_layers"] == 0 and plain["bits_per_weight_all"] == 32.0


def test_inspect_cli_table_and_json(models, capsys):
    d, src, q, rep = models
    assert main(["inspect", str(d / "ct"), "--reference", str(src)]) == 0
    out = capsys.readouterr().out
    assert "int4 g32 sym (pack-quantized)" in out and "size on disk" in out and "relative Frobenius error" in out
    assert main(["inspect", str(d / "m.gguf"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "gguf" and "Q4_0 (GGUF)" in res["schemes"]
    bad = d / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    assert main(["inspect", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read GGUF file")
