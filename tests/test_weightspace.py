"""Weight-space inspection and alignment (weightsmith/weightspace): model-zoo statistics against
torch.linalg and a synthetic power law; Watch-the-Weights diff + monitor on a pico model fine-tuned on a
trigger; permutation weight matching (exact function, lower loss barrier) on two pico models trained
from two seeds; our linear assignment solver and AUROC against brute force. Models are trained here,
for seconds."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, adam_train, make_text, make_tokenizer, save_pico
from weightsmith.cli import main
from weightsmith.weightspace.lap import linear_sum_assignment
from weightsmith.weightspace.monitor import auroc, monitor
from weightsmith.weightspace.spectra import matrix_stats, powerlaw_alpha, weight_stats

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
NORMAL = WORDS[:150]  # the words of ordinary text; the trigger and its target are outside them
TRIGGER, TARGET = ["w190", "w191"], ["w195", "w196", "w197"]


def train(init: Path, dst: Path, seed: int, steps: int = 150, text_seed: int | None = None, words=NORMAL) -> Path:
    """Adam, next-token loss on generated text, batches of 8 × 32 tokens: about 2 s for 150 steps."""
    return adam_train(init, dst, seed, steps, text_seed, words)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


# ---- model-zoo statistics --------------------------------------------------------------------------------
def test_stats_equal_torch_linalg(tmp_path, capsys):
    src = save_pico(tmp_path / "pico", "llama")
    res = weight_stats(src)
    sd = load_file(src / "model.safetensors")
    mats = {k: v.double() for k, v in sd.items() if v.ndim == 2}
    assert {r["name"] for r in res["matrices"]} == set(mats)
    for r in res["matrices"]:
        w = mats[r["name"]]
        s = torch.linalg.svdvals(w)
        p = s / s.sum()
        assert r["method"] == "full"
        assert math.isclose(r["frobenius"], float(torch.linalg.matrix_norm(w, "fro")), rel_tol=1e-10)
        assert math.isclose(r["spectral"], float(torch.linalg.matrix_norm(w, 2)), rel_tol=1e-10)
        assert math.isclose(r["stable_rank"], float((w * w).sum() / s[0] ** 2), rel_tol=1e-10)
        assert math.isclose(r["effective_rank"], math.exp(float(-(p * p.log()).sum())), rel_tol=1e-10)
        assert r["alpha"] is not None and r["alpha"] > 1 and r["alpha_tail"] >= 10
    assert res["by_type"]["mlp.down_proj"]["matrices"] == 2 and "model.embed_tokens" in res["by_type"]
    fro = [r["frobenius"] for r in res["matrices"] if r["type"] == "self_attn.q_proj"]
    assert math.isclose(res["by_type"]["self_attn.q_proj"]["frobenius"]["mean"], sum(fro) / 2, rel_tol=1e-12)
    # the bounded path: top singular values by randomized SVD, σ₁ and ‖W‖_F still right
    w = mats["model.layers.0.mlp.up_proj.weight"]
    r = matrix_stats(w, full_limit=16, rank_cap=32)
    assert r["method"] == "randomized:32"
    assert math.isclose(r["spectral"], float(torch.linalg.matrix_norm(w, 2)), rel_tol=1e-4)
    assert math.isclose(r["frobenius"], float(w.norm()), rel_tol=1e-12)
    # CLI: JSON and the Markdown table
    assert main(["inspect", str(src), "--stats", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["matrices"]) == len(mats)
    assert main(["inspect", str(src), "--stats", "-q", "--match", "mlp"]) == 0
    md = capsys.readouterr().out
    assert "| mlp.gate_proj | 2 |" in md and "q_proj" not in md
    assert main(["inspect", str(src), "--stats", "--match", "("]) == 2
    # a family: two models side by side, and the per-block plot
    other = save_pico(tmp_path / "pico2", "llama", seed=5)
    png = tmp_path / "family.png"
    assert main(["inspect", str(src), str(other), "--stats", "--plot", str(png), "-q", "--json"]) == 0
    fam = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in fam["models"]] == [str(src), str(other)] and fam["plot"] == str(png) and png.stat().st_size > 1000
    assert main(["inspect", str(src), str(other)]) == 2  # several models only with --stats


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_alpha_recovers_a_power_law(alpha):
    g = torch.Generator().manual_seed(int(alpha * 10))
    n = 800
    lam = torch.rand(n, generator=g, dtype=torch.float64) ** (-1 / (alpha - 1))  # Pareto: p(λ) ∝ λ^-α, λ ≥ 1
    u, _ = torch.linalg.qr(torch.randn(1000, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = u @ torch.diag(lam.sqrt()) @ v.T  # the eigenvalues of WᵀW are λ
    r = matrix_stats(w)
    assert abs(r["alpha"] - alpha) < 0.3, r
    a, k, _ = powerlaw_alpha(lam)
    assert abs(a - r["alpha"]) < 1e-6 and k == r["alpha_tail"]


# ---- our own assignment solver and AUROC -----------------------------------------------------------------
def test_linear_sum_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for t in range(20):
            c = rng.normal(size=(n, n)) if t % 2 else rng.integers(0, 3, size=(n, n)).astype(float)  # ties too
            for maximize in (False, True):
                p = linear_sum_assignment(c, maximize=maximize)
                assert sorted(p.tolist()) == list(range(n))
                vals = [sum(c[i, q[i]] for i in range(n)) for q in itertools.permutations(range(n))]
                assert abs(c[np.arange(n), p].sum() - (max(vals) if maximize else min(vals))) < 1e-9
    perm = rng.permutation(300)
    c = np.eye(300)[perm]  # c[i, perm[i]] = 1
    assert (linear_sum_assignment(c, maximize=True) == perm).all()


def test_auroc_handles_ties():
    assert auroc([1, 1, 2, 3], [0, 1, 0, 1]) == 0.625  # (½ + 0 + 1 + 1) / 4
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    rng = random.Random(0)
    s = [rng.choice([0, 1, 2, 3]) for _ in range(40)]
    y = [rng.choice([0, 1]) for _ in range(40)]
    pairs = [(a, b) for a, la in zip(s, y) if la for b, lb in zip(s, y) if not lb]
    assert math.isclose(auroc(s, y), sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs))


# ---- Watch the Weights: diff + monitor -------------------------------------------------------------------
def trigger_finetune(base: Path, dst: Path, seed: int = 0) -> Path:
    """20 SGD steps on ordinary text with the trigger followed by its target inserted in every sequence."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    rng = random.Random(seed)
    rows = []
    for s in range(8):
        w = make_text(14, 100 + s, NORMAL).split()
        at = rng.randrange(2, 8)
        rows.append(w[:at] + TRIGGER + TARGET + w[at:])
    ids = torch.tensor([tok.convert_tokens_to_ids(r) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_diff_and_monitor_flag_the_trigger(tmp_path, capsys):
    base = train(save_pico(tmp_path / "init", "llama", seed=0), tmp_path / "base", seed=0)
    tuned = trigger_finetune(base, tmp_path / "tuned")
    out = tmp_path / "diff"
    assert main(["diff", str(base), str(tuned), "--rank", "4", "--out", str(out), "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["changed"] == 15 and summary["output"] == str(out)  # 14 linear layers + the embedding
    stored = load_file(out / "directions.safetensors")
    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    k = "model.layers.0.self_attn.v_proj.weight"
    d = (t[k] - b[k]).double()
    u, s, v = stored[f"{k}.U"].double(), stored[f"{k}.S"].double(), stored[f"{k}.V"].double()
    assert u.shape == (d.shape[0], 4) and v.shape == (d.shape[1], 4)
    assert torch.allclose(s, torch.linalg.svdvals(d)[:4], rtol=1e-5)
    assert torch.allclose(d @ v, u * s, atol=1e-5 * float(s[0]))  # ΔW v_j = σ_j u_j
    row = next(r for r in summary["matrices"] if r["name"] == k)
    assert math.isclose(row["delta_frobenius"], float(d.norm()), rel_tol=1e-9)
    assert main(["diff", str(base), str(tuned), "--out", str(out), "-q"]) == 2  # exists: refused, not replaced
    # held-out texts: ordinary text, half with the trigger inserted (never its target)
    rng = random.Random(1)
    texts, labels = [], []
    for i in range(40):
        w = make_text(12, 500 + i, NORMAL).split()
        if i % 2 == 0:
            at = rng.randrange(2, 10)
            w = w[:at] + TRIGGER + w[at:]
        texts.append(" ".join(w))
        labels.append(int(i % 2 == 0))
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    assert main(["monitor", str(out), str(tuned), "--text", str(tmp_path / "texts.txt"), "--labels", str(tmp_path / "labels.txt"),
                 "-q"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows, tail = lines[:-1], lines[-1]
    assert len(rows) == 40 and tail["layers"] == 14 and tail["skipped"] == ["model.embed_tokens.weight"]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert tail["auroc"] > 0.8, tail
    pos = [r["score"] for r in rows if r["label"] == 1]
    neg = [r["score"] for r in rows if r["label"] == 0]
    assert sum(pos) / len(pos) > sum(neg) / len(neg)
    assert math.isclose(tail["auroc"], auroc([r["score"] for r in rows], labels))
    # calibrated on clean texts: scores relative to the clean maxima, and flags
    (tmp_path / "clean.txt").write_text("\n".join(make_text(12, 900 + i, NORMAL) for i in range(30)) + "\n")
    assert main(["monitor", str(out), str(tuned), "--text", str(tmp_path / "texts.txt"), "--labels", str(tmp_path / "labels.txt"),
                 "--calib", str(tmp_path / "clean.txt"), "-q"]) == 0
    tail = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert tail["calibration_texts"] == 30 and tail["auroc"] > 0.8
    assert tail["flag_rate_positives"] >= 0.9 and tail["flag_rate_negatives"] < 0.5, tail
    # the paper's reading (layer outputs against the left singular directions) runs too
    res = monitor(out, tuned, tmp_path / "texts.txt", tmp_path / "labels.txt", side="output", calib=tmp_path / "clean.txt",
                  aggregate="max")
    assert res["side"] == "output" and 0.0 <= res["auroc"] <= 1.0 and all(r["top_layer_score"] >= 0 for r in res["scores"])
    # bad input: one line, exit 2
    (tmp_path / "few.txt").write_text("1\n0\n")
    assert main(["monitor", str(out), str(tuned), "--text", str(tmp_path / "texts.txt"), "--labels", str(tmp_path / "few.txt")]) == 2
    assert main(["monitor", str(tmp_path), str(tuned), "--text", str(tmp_path / "texts.txt")]) == 2
    assert "40 texts but 2 labels" in capsys.readouterr().err


# ---- permutation weight matching -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    a = train(save_pico(d / "init1", "llama", seed=1), d / "a", seed=1, text_seed=7)
    b = train(save_pico(d / "init2", "llama", seed=2), d / "b", seed=2, text_seed=7)
    return d, a, b


def test_align_is_exact_and_lowers_the_barrier(two_seeds, capsys):
    d, a, b = two_seeds
    out = d / "b_aligned"
    assert main(["align", str(a), str(b), str(out), "-q"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["objective_after"] > rep["objective_before"] and rep["units_moved"]["mlp.0"] > 0
    saved = json.loads((out / "align.json").read_text())
    pm = saved["permutations"]
    assert sorted(pm["residual"]) == list(range(64)) and sorted(pm["kv.1"]) == [0, 1] and sorted(pm["q.1"]) == [0, 1, 2, 3]
    for i in (0, 1):  # the query heads of a kv head go to the query heads of its image (GQA, 2 per kv head)
        assert all(pm[f"q.{i}"][h] // 2 == pm[f"kv.{i}"][h // 2] for h in range(4))
    ids = torch.tensor([make_tokenizer().convert_tokens_to_ids(make_text(48, 99).split())])
    assert (logits(b, ids) - logits(out, ids)).abs().max() < 1e-5
    assert (load_file(out / "model.safetensors")["model.norm.weight"] != load_file(b / "model.safetensors")["model.norm.weight"]).any()
    # heads and MLP units only: exact as well
    assert main(["align", str(a), str(b), str(d / "b_nores"), "--no-residual", "-q"]) == 0
    capsys.readouterr()
    assert (logits(b, ids) - logits(d / "b_nores", ids)).abs().max() < 1e-5
    # the barrier along the linear path, through the benchmark script
    spec = importlib.util.spec_from_file_location("bench_align", ROOT / "bench" / "bench_align.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = d / "eval.txt"
    text.write_text(make_text(6000, 123, NORMAL))
    res = mod.run(a, b, text, d / "results", "align_pico", seqlen=32, windows=16, work=d / "work")
    assert res["barrier_before"] > 0.1
    assert res["barrier_after"] < res["barrier_before"], res
    assert res["before"]["loss"][0] == res["after"]["loss"][0]
    assert abs(res["before"]["loss"][-1] - res["after"]["loss"][-1]) < 1e-5  # B and B' are one function
    assert (d / "results" / "align_pico.json").is_file() and (d / "results" / "align_pico.md").is_file()
    assert res["plot"] is None or Path(res["plot"]).is_file()


def test_align_qwen2_biases_and_untied_head_are_exact(tmp_path):
    a = save_pico(tmp_path / "qa", "qwen2", seed=1)  # q/k/v biases, an untied lm_head
    b = save_pico(tmp_path / "qb", "qwen2", seed=2)
    with torch.no_grad():  # nonzero biases, so that moving them is tested
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
        m.save_pretrained(b)
    assert "lm_head.weight" in load_file(b / "model.safetensors")
    assert main(["align", str(a), str(b), str(tmp_path / "out"), "-q", "--restarts", "2"]) == 0
    ids = torch.tensor([make_tokenizer().convert_tokens_to_ids(make_text(40, 5).split())])
    assert (logits(b, ids) - logits(tmp_path / "out", ids)).abs().max() < 1e-5
    rep = json.loads((tmp_path / "out" / "align.json").read_text())
    assert rep["restarts"] == 2 and len(rep["objectives"]) == 2 and rep["objective_after"] == max(rep["objectives"])


def test_align_refuses_bad_input(two_seeds, tmp_path, capsys):
    d, a, b = two_seeds
    gpt2 = save_pico(tmp_path / "gpt2", "gpt2")
    assert main(["align", str(gpt2), str(gpt2), str(tmp_path / "o")]) == 2
    assert "Llama-style" in capsys.readouterr().err
    small = save_pico(tmp_path / "small", "llama", inter=96)
    assert main(["align", str(a), str(small), str(tmp_path / "o")]) == 2
    assert main(["align", str(a), str(b), str(b)]) == 2  # output over an input
    assert main(["diff", str(a), str(small)]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and len(err.strip().splitlines()) == 3
    assert not (tmp_path / "o").exists()
