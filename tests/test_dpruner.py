"""D-Pruner (weightsmith/prune/dpruner.py): the score against its formula, the recipe with a domain text
through the engine (domain loss measured beside Wanda's and magnitude's), and the --domain-calib option and
its errors."""
from __future__ import annotations

import pytest
import torch
from conftest import WORDS, make_text, make_tokenizer
from test_obert import pico_lm  # noqa: F401 - the trained pico Llama fixture

import weightsmith
from weightsmith.errors import WeightsmithError
from weightsmith.prune.dpruner import dpruner_score, importance


def test_score_is_the_regularised_removal_estimate():
    g = torch.Generator().manual_seed(0)
    w, gg, fg, gd, fd = (torch.randn(6, 8, generator=g) for _ in range(5))
    fg, fd = fg.abs(), fd.abs()
    G = (-gg * w + 0.5 * fg * w * w).abs()
    ref = (-gd * w + 0.5 * fd * w * w).abs() + 0.3 * G / G.mean() * fd.mean() * w * w
    assert torch.allclose(dpruner_score(w, gg, fg, gd, fd, 0.3), ref, atol=1e-5)
    assert torch.allclose(importance(w, gd, fd).float(), ref - 0.3 * G / G.mean() * fd.mean() * w * w, atol=1e-5)


def _domain_loss(path, text):
    from transformers import AutoModelForCausalLM

    from weightsmith.safety import from_pretrained

    ids = make_tokenizer()(text, return_tensors="pt").input_ids[0][: 16 * 32].reshape(16, 32)
    with torch.no_grad():
        return float(from_pretrained(AutoModelForCausalLM, path).eval()(input_ids=ids, labels=ids).loss)


def test_domain_recipe_and_options(pico_lm, tmp_path, capsys):  # noqa: F811
    gen = tmp_path / "general.txt"
    gen.write_text(make_text(6000, seed=3))
    dom = tmp_path / "domain.txt"
    dom.write_text(make_text(6000, seed=4, words=WORDS[:60]))  # a "domain": the walk confined to 60 of the 200 words
    held = make_text(1200, seed=9, words=WORDS[:60])
    calib = {"path": str(gen), "nsamples": 16, "seqlen": 32}
    loss = {}
    for name, method in (("dpruner", f"dpruner:sparsity=0.5:domain_calib={dom}"), ("wanda", "wanda:sparsity=0.5"),
                         ("magnitude", "magnitude:sparsity=0.5")):
        weightsmith.quantize(pico_lm, {"method": method, "calib": calib}, out=tmp_path / name, progress=False)
        loss[name] = _domain_loss(tmp_path / name, held)
    loss["dense"] = _domain_loss(pico_lm, held)
    # Measured on this trained pico Llama at 50 %, held-out domain text: dense 3.150, magnitude 3.175,
    # wanda 3.215, dpruner 3.217 (reg=0: 3.210, reg=1: 3.224; per_row: 3.358). D-Pruner does NOT beat
    # magnitude here (nor Wanda at the default reg): only its sanity is asserted, not the paper's claim.
    assert loss["dpruner"] - loss["dense"] < 0.15, loss
    from weightsmith.cli import main

    code = main(["quantize", str(pico_lm), str(tmp_path / "c"), "--quiet", "--method", "dpruner", "--sparsity", "0.5",
                 "--domain-calib", str(tmp_path / "missing.txt"), "--calib", str(gen), "--nsamples", "8", "--seqlen", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "calibration path" in err and "missing.txt does not exist" in err, err
    with pytest.raises(WeightsmithError, match="domain calibration text"):
        weightsmith.quantize(pico_lm, {"method": "dpruner", "calib": calib}, out=tmp_path / "n", progress=False)
