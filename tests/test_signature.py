"""Robust weight signatures (weightsmith signature extract / apply): full rank reproduces ROBUST from
PLAIN, low-rank and sparse errors fall as the budget grows, the manifest's size is the files', strength
0 is the identity, mismatches are refused in one line, and a signature moves another fine-tune of the
same base towards the hardened behaviour. Pico models fine-tuned here (Adam, a second each)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import WORDS, adam_train, make_text, make_tokenizer, save_pico
from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.weightspace.signature import apply, extract, lowrank, top_magnitude

torch.set_num_threads(1)
PLAIN_WORDS, HARD_WORDS = WORDS[:100], WORDS[100:200]


def train(init: Path, dst: Path, words, seed: int) -> Path:
    return adam_train(init, dst, seed, 25, words=words, n_words=8000)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig")
    base = save_pico(d / "base", "llama", seed=0)
    plain = train(base, d / "plain", PLAIN_WORDS, seed=1)
    return {"base": base, "plain": plain, "robust": train(plain, d / "robust", HARD_WORDS, seed=2),
            "other": train(base, d / "other", PLAIN_WORDS, seed=3)}


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_full_rank_extract_and_apply_reproduces_robust(zoo, tmp_path):
    man = extract(zoo["robust"], zoo["plain"], tmp_path / "sig", rank=1024)
    assert man["mode"] == "rank" and man["relative_error"] < 1e-5
    res = apply(zoo["plain"], tmp_path / "sig", tmp_path / "patched", strength=1.0)
    assert res["patched_tensors"] == man["tensor_count"]
    assert maxdiff(weights(tmp_path / "patched"), weights(zoo["robust"])) <= 1e-6
    # density 1 (every entry kept) is exact too
    extract(zoo["robust"], zoo["plain"], tmp_path / "dense", density=1.0)
    apply(zoo["plain"], tmp_path / "dense", tmp_path / "patched_d", strength=1.0)
    assert maxdiff(weights(tmp_path / "patched_d"), weights(zoo["robust"])) <= 1e-6
    assert {"config.json", "tokenizer.json", "report.json"} <= {p.name for p in (tmp_path / "patched").iterdir()}


def test_error_falls_as_rank_and_density_grow(zoo, tmp_path):
    robust = weights(zoo["robust"])
    errs = []
    for r in (1, 4, 16, 64):
        man = extract(zoo["robust"], zoo["plain"], tmp_path / f"r{r}", rank=r)
        apply(zoo["plain"], tmp_path / f"r{r}", tmp_path / f"p{r}")
        errs.append((man["relative_error"], man["bytes"], maxdiff(weights(tmp_path / f"p{r}"), robust)))
    assert all(a[0] > b[0] for a, b in zip(errs, errs[1:])), errs  # relative error of the signature
    assert all(a[1] < b[1] for a, b in zip(errs, errs[1:])), errs  # its size
    assert all(a[2] > b[2] for a, b in zip(errs[:-1], errs[1:-1])), errs  # distance of the patched model to ROBUST
    sparse = [extract(zoo["robust"], zoo["plain"], tmp_path / f"d{i}", density=dn)["relative_error"] for i, dn in enumerate((0.05, 0.2, 0.5))]
    assert sparse[0] > sparse[1] > sparse[2] > 0
    # the pieces: rank-r factors are the best rank-r approximation (Eckart–Young), top-k keeps the largest entries
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 20, generator=g)
    a, b = lowrank(m, 5)
    s = torch.linalg.svdvals(m.double())
    assert float((m - a @ b).norm()) == pytest.approx(float(s[5:].square().sum().sqrt()), rel=1e-5)
    idx, val = top_magnitude(m, 0.1)
    kept = torch.zeros(m.numel(), dtype=torch.bool)
    kept[idx.long()] = True
    assert idx.numel() == 60 and m.reshape(-1).abs()[kept].min() >= m.reshape(-1).abs()[~kept].max()


@pytest.mark.parametrize("kw", [{"rank": 4}, {"density": 0.1}, {"rank": 8, "dtype": "bfloat16"}])
def test_manifest_size_is_the_files_tensors(zoo, tmp_path, kw):
    man = extract(zoo["robust"], zoo["plain"], tmp_path / "sig", **kw)
    stored = 0
    for f in (tmp_path / "sig").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                stored += t.numel() * t.element_size()
    disk = json.loads((tmp_path / "sig" / "signature.json").read_text())
    assert man["bytes"] == disk["bytes"] == stored == sum(r["bytes"] for r in disk["tensors"].values())
    plain_bytes = sum(t.numel() * t.element_size() for t in weights(zoo["plain"]).values())
    assert man["model_bytes"] == plain_bytes and man["fraction"] == pytest.approx(stored / plain_bytes)
    assert 0 < man["fraction"] < 0.5
    if "density" in kw:
        n = {k: v.numel() for k, v in weights(zoo["plain"]).items()}
        assert all(r["k"] == max(1, int(0.1 * n[k])) for k, r in disk["tensors"].items())


def test_strength_zero_is_the_identity_and_strength_scales(zoo, tmp_path):
    extract(zoo["robust"], zoo["plain"], tmp_path / "sig", rank=1024)
    apply(zoo["other"], tmp_path / "sig", tmp_path / "zero", strength=0.0)
    other, zero = weights(zoo["other"]), weights(tmp_path / "zero")
    assert all(torch.equal(other[k], zero[k]) for k in other)
    apply(zoo["other"], tmp_path / "sig", tmp_path / "half", strength=0.5)
    half, robust, plain = weights(tmp_path / "half"), weights(zoo["robust"]), weights(zoo["plain"])
    assert max((half[k] - other[k] - 0.5 * (robust[k] - plain[k])).abs().max().item() for k in other) <= 1e-6


def test_signature_transfers_to_another_finetune(zoo, tmp_path):
    """The hardened skill (text over other words) moves with the signature onto a plain fine-tune of another seed."""
    from transformers import AutoModelForCausalLM

    from weightsmith.calib.windows import sample_windows

    tok = make_tokenizer()
    ids = sample_windows(tok(make_text(3000, 99, HARD_WORDS), return_tensors="pt").input_ids[0], 8, 32, 0)

    def loss(d):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            return float(m(ids, labels=ids).loss)

    extract(zoo["robust"], zoo["plain"], tmp_path / "sig", rank=8)
    apply(zoo["other"], tmp_path / "sig", tmp_path / "other+sig")
    before, after, robust = loss(zoo["other"]), loss(tmp_path / "other+sig"), loss(zoo["robust"])
    assert after < before - 0.5 and robust < before, (before, after, robust)


def test_mismatches_are_refused_in_one_line(zoo, tmp_path, capsys):
    extract(zoo["robust"], zoo["plain"], tmp_path / "sig", rank=2)
    wide = save_pico(tmp_path / "wide", "llama", seed=0, hidden=32)
    gpt2 = save_pico(tmp_path / "gpt2", "gpt2", seed=0)
    cases = [
        (["signature", "apply", str(wide), str(tmp_path / "sig"), str(tmp_path / "o")], "has shape"),
        (["signature", "apply", str(gpt2), str(tmp_path / "sig"), str(tmp_path / "o")], "lacks"),
        (["signature", "apply", str(zoo["plain"]), str(zoo["plain"]), str(tmp_path / "o")], "not a signature directory"),
        (["signature", "extract", str(zoo["robust"]), str(wide), str(tmp_path / "o"), "--rank", "2"], "shape"),
        (["signature", "extract", str(zoo["robust"]), str(gpt2), str(tmp_path / "o"), "--rank", "2"], "same tensors"),
        (["signature", "extract", str(zoo["robust"]), str(zoo["plain"]), str(tmp_path / "o"), "--density", "1.5"], "(0, 1]"),
        (["signature", "extract", str(zoo["robust"]), str(zoo["plain"]), str(tmp_path / "sig"), "--rank", "2"], "already exists"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv + ["-q"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
        assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))
    with pytest.raises(WeightsmithError, match="exactly one of --rank"):
        extract(zoo["robust"], zoo["plain"], tmp_path / "o")
    # the CLI's JSON line
    capsys.readouterr()
    assert main(["signature", "extract", str(zoo["robust"]), str(zoo["plain"]), str(tmp_path / "cli"), "--density", "0.05", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "density" and out["bytes"] > 0 and out["output"] == str(tmp_path / "cli")
