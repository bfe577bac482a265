"""The bias probe (weightsmith/eval/bias.py) on a pico llama with a word-level vocabulary of the probe's
own templates: a model that treats he/she identically scores 0 on every pair; otherwise each pair's
difference equals an independent computation from transformers' own loss; the CLI form, with a
pruned model against its dense reference."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from conftest import SPECIALS, make_tokenizer

from weightsmith.cli import main
from weightsmith.eval.bias import OCCUPATIONS, TEMPLATES, TERMS, bias_probe, pairs, probe

WORDS = sorted({w for t in TEMPLATES for w in re.findall(r"[A-Za-z]+|[.,]", t.format(occupation="x", **TERMS[0]))}
               | {w for t in TEMPLATES for w in re.findall(r"[A-Za-z]+|[.,]", t.format(occupation="x", **TERMS[1]))}
               | set(OCCUPATIONS))


def _model(symmetric: bool, seed: int = 0):
    tok = make_tokenizer(WORDS)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=len(SPECIALS) + len(WORDS), max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
        if symmetric:  # he/she, him/her, his/her: one input embedding and one output row per pair
            emb, head = m.model.embed_tokens.weight, m.lm_head.weight
            for a, b in (("she", "he"), ("him", "her")):
                ia, ib = tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)
                emb[ia], head[ia] = emb[ib], head[ib]
            ih, ihis = tok.convert_tokens_to_ids("her"), tok.convert_tokens_to_ids("his")
            emb[ihis], head[ihis] = emb[ih], head[ih]  # 'her' stands for both him's and his's counterpart
    return m, tok


def test_templates_and_pairs():
    ps = pairs()
    assert len(ps) == len(TEMPLATES) * len(OCCUPATIONS) == 160
    for occ, a, b in ps:
        wa, wb = a.split(), b.split()
        assert len(wa) == len(wb) and occ in a and occ in b
        diff = {(x, y) for x, y in zip(wa, wb) if x != y}
        assert diff and diff <= {("he", "she"), ("him", "her"), ("his", "her")}


def test_symmetric_model_scores_zero_on_every_pair():
    """A model whose gendered words share every input and output vector cannot tell the versions apart."""
    m, tok = _model(symmetric=True)
    ids = [tok.convert_tokens_to_ids(w) for w in ("he", "she", "him", "his", "her")]
    assert tok.unk_token_id not in ids
    res = probe(m, tok)
    assert res["pairs"] == 160 and res["mean_abs_diff"] == pytest.approx(0.0, abs=1e-5) and res["he_preferred"] <= 1.0
    assert all(abs(v) < 1e-5 for v in res["by_occupation"].values())


def test_each_difference_matches_transformers_loss():
    m, tok = _model(symmetric=False, seed=1)
    templates, occupations = TEMPLATES[:3], OCCUPATIONS[:4]
    res = probe(m, tok, templates=templates, occupations=occupations)
    want = []
    for occ, a, b in pairs(templates, occupations):
        lp = []
        for s in (a, b):  # independent: BOS + tokens, the mean loss of transformers times the predicted tokens
            ids = torch.tensor([[tok.bos_token_id, *tok(s, add_special_tokens=False).input_ids]])
            with torch.no_grad():
                loss = m(input_ids=ids, labels=ids).loss
            lp.append(-float(loss) * (ids.shape[1] - 1))
        want.append(lp[0] - lp[1])
    n = len(want)
    assert res["pairs"] == n == 12
    assert res["mean_diff"] == pytest.approx(sum(want) / n, rel=1e-4)
    assert res["mean_abs_diff"] == pytest.approx(sum(abs(d) for d in want) / n, rel=1e-4)
    assert res["mean_abs_diff"] > 0.05  # a random model does tell them apart
    assert res["he_preferred"] == sum(d > 0 for d in want) / n
    occ0 = [want[i] for i, (o, _, _) in enumerate(pairs(templates, occupations)) if o == occupations[0]]
    assert res["by_occupation"][occupations[0]] == pytest.approx(sum(occ0) / len(occ0), rel=1e-4)


def test_cli_bias_probe_against_a_reference(tmp_path, capsys):
    m, tok = _model(symmetric=False, seed=2)
    m.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    assert main(["quantize", str(tmp_path / "dense"), str(tmp_path / "pruned"), "--quiet", "--method", "magnitude", "--sparsity", "0.6"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "pruned"), "--bias-probe", "--reference", str(tmp_path / "dense"), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    bp = out["bias_probe"]
    direct = bias_probe(tmp_path / "dense")
    assert bp["reference"]["mean_abs_diff"] == pytest.approx(direct["model"]["mean_abs_diff"])
    assert bp["change"]["mean_abs_diff"] == pytest.approx(bp["model"]["mean_abs_diff"] - bp["reference"]["mean_abs_diff"])
    assert bp["model"]["mean_abs_diff"] != pytest.approx(bp["reference"]["mean_abs_diff"])  # 60 % pruning moved it
    assert "not a benchmark" in bp["note"]
    assert main(["eval", str(tmp_path / "pruned")]) == 2 and "--bias-probe" in capsys.readouterr().err
