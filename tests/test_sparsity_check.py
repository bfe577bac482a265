"""Density and the N:M check measured from the weights (weightsmith/prune/check.py): on crafted
matrices, in the quantize report and in ``inspect`` of a pruned-and-quantized output and of its
packed exports (the codes read back, not the mask)."""
from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, save_pico
from transformers import AutoModelForCausalLM

import weightsmith
from weightsmith.cli import main
from weightsmith.export import export
from weightsmith.inspect import inspect
from weightsmith.prune.check import nm_patterns, sparsity_check

L0 = "model.layers.0."


def test_nm_patterns_on_crafted_matrices():
    w = torch.ones(3, 16)
    assert nm_patterns(w) == [] and sparsity_check(w)["density"] == 1.0
    two_four = w.clone()
    two_four[:, 1::4] = 0
    two_four[:, 2::4] = 0
    assert nm_patterns(two_four) == ["2:4", "4:8", "8:16"]
    four_eight = torch.ones(3, 16)
    four_eight[:, 4:8] = 0  # 4 kept then 4 dropped: 4:8, but a group of 4 is full
    four_eight[:, 12:16] = 0
    assert nm_patterns(four_eight) == ["4:8", "8:16"]
    one = two_four.clone()
    one[2, 3] = 0  # fewer zeros in one row only lowers nothing: the max over rows counts
    assert nm_patterns(one) == ["2:4", "4:8", "8:16"]
    one[1, 1] = 5.0  # a third nonzero in one group of 4 of one row breaks 2:4
    assert nm_patterns(one) == ["3:4", "5:8", "9:16"]
    assert nm_patterns(torch.ones(2, 6)) == []  # 4, 8, 16 do not divide 6
    assert sparsity_check(two_four)["density"] == 0.5


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("spc")
    src = save_pico(d / "pico", "llama")
    out = d / "q"
    rep = weightsmith.quantize(src, {"method": "wanda:pattern=2:4,gptq", "grid": {"bits": 4, "group_size": 32}}, calib_ids(8, 32), out=out,
                               progress=False)
    return d, src, out, rep


def test_report_measures_density_and_nm_from_the_weights(pruned):
    d, src, out, rep = pruned
    w = AutoModelForCausalLM.from_pretrained(out).state_dict()
    zeros = total = 0
    for r in rep["layers"]:
        t = w[r["name"] + ".weight"]
        assert r["measured_density"] == pytest.approx(float((t != 0).float().mean()))
        assert r["measured_density"] <= 0.5 and r["nm"][0] in ("2:4", "1:4")  # a kept weight may round to 0, never the reverse
        assert r["density"] == 0.5  # the mask's own density (the pruner's)
        zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    s = rep["summary"]["sparsity"]
    assert s["density"] == pytest.approx(1 - zeros / total) and sum(s["nm"].values()) == len(rep["layers"])
    md = (out / "report.md").read_text()
    assert "| density | N:M |" in md and "measured density" in md
    dense = weightsmith.quantize(src, {"method": "rtn", "grid": {"bits": 8, "group_size": 32}}, out=d / "dense", progress=False)
    assert "| density |" not in (d / "dense" / "report.md").read_text()  # no pruning: no density columns
    assert all(r["measured_density"] > 0.95 for r in dense["layers"])


@pytest.mark.parametrize("fmt,path", [(None, "q"), ("compressed-tensors", "ct"), ("gguf", "m.gguf")])
def test_inspect_density_and_nm(pruned, fmt, path):
    d, src, out, rep = pruned
    target = d / path
    if fmt is not None and not target.exists():
        export(out, target, fmt, gguf_unverified_tokenizer=True)  # the pico word-level tokenizer
    res = inspect(target)
    rows = {r["name"]: r for r in res["tensors"]}
    sp = res["sparsity"]
    assert sp["over"] == "matrices of the blocks" and sp["matrices"] == 14
    want = rep["summary"]["sparsity"]["density"]
    assert sp["density"] == pytest.approx(want, abs=1e-9) and set(sp["nm"]) <= {"2:4", "1:4"}
    key = L0 + "mlp.up_proj.weight" if fmt != "gguf" else "blk.0.ffn_up.weight"
    assert rows[key]["nm"][0] in ("2:4", "1:4") and rows[key]["density"] <= 0.5
    emb = "model.embed_tokens.weight" if fmt != "gguf" else "token_embd.weight"
    assert rows[emb]["density"] == 1.0 and rows[emb]["nm"] == []  # not pruned


def test_inspect_table_shows_the_check(pruned, capsys):
    d, src, out, rep = pruned
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "density (matrices of the blocks): " in text and "N:M" in text and " 2:4" in text
    plain = inspect(src)
    assert plain["sparsity"]["density"] > 0.99 and plain["sparsity"]["nm"] == {"none": 14}
