"""aTLAS (merge_method: atlas): coefficients per tensor and task fitted on each task's calibration
windows beat task arithmetic with the best global coefficient of a grid on every task; deterministic
for a seed; the written checkpoint is the fitted model; what is missing or too large is refused in one
line. Pico models: a random base and two fine-tunes (Adam, a second each) on texts over disjoint words."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import WORDS, adam_train, make_text, make_tokenizer, save_pico
from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge

torch.set_num_threads(1)
TASK_WORDS = {"a": WORDS[:100], "b": WORDS[100:200]}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("atlas")
    base = save_pico(d / "base", "llama", seed=0)
    out = {"dir": d, "base": base}
    for i, (t, words) in enumerate(TASK_WORDS.items()):
        out[t] = adam_train(base, d / f"ft_{t}", 10 + i, 30, words=words, n_words=8000)
        (d / f"{t}.txt").write_text(make_text(3000, 20 + i, words))
    return out


def atlas_yaml(zoo, params: str = "steps: 60, lr: 0.05, windows: 4, seqlen: 32", calib_b: bool = True) -> str:
    cb = "\n    parameters: {calibration: b.txt}" if calib_b else ""
    return (f"merge_method: atlas\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n    parameters: {{calibration: a.txt}}\n"
            f"  - model: {zoo['b']}{cb}\nparameters: {{{params}}}\n")


def run(zoo, tmp_path, text: str, name="out", seed=0) -> dict:
    cfg = zoo["dir"] / f"{name}.yaml"  # calibration paths are relative to the YAML's directory
    cfg.write_text(text)
    return merge(cfg, tmp_path / name, progress=False, seed=seed)


def windows_of(zoo, t: str, seed: int = 0) -> torch.Tensor:
    from weightsmith.calib.windows import sample_windows

    ids = make_tokenizer()((zoo["dir"] / f"{t}.txt").read_text(), return_tensors="pt").input_ids[0]
    return sample_windows(ids, 4, 32, seed)


def loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_atlas_beats_the_best_global_task_arithmetic_on_every_task(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    rep = run(zoo, tmp_path, atlas_yaml(zoo))
    fit = rep["fit"]
    assert rep["merge_method"] == "atlas" and rep["seed"] == 0 and fit["steps"] == 60
    assert len(fit["coefficients"]) == rep["tensors"]
    assert all(len(v) == 2 for v in fit["coefficients"].values())
    win = {t: windows_of(zoo, t) for t in TASK_WORDS}
    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tv = {t: AutoModelForCausalLM.from_pretrained(zoo[t], dtype=torch.float32).state_dict() for t in TASK_WORDS}

    def ta(lam):
        model.load_state_dict({k: base[k] + lam * sum(tv[t][k] - base[k] for t in TASK_WORDS) for k in base})
        return {t: loss(model, win[t]) for t in TASK_WORDS}

    grid = {lam: ta(lam) for lam in (0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)}
    best = min(grid, key=lambda lam: sum(grid[lam].values()))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    got = {t: loss(merged, win[t]) for t in TASK_WORDS}
    for i, t in enumerate(TASK_WORDS):
        # the written checkpoint is the fitted model (its loss is the reported one) ...
        assert got[t] == pytest.approx(fit["tasks"][i]["loss_after"], abs=1e-4)
        assert fit["tasks"][i]["loss_after"] < fit["tasks"][i]["loss_before"]
        # ... and beats task arithmetic's best global coefficient on each task
        assert got[t] < grid[best][t] - 0.01, (t, got, best, grid[best])
    assert fit["objective_after"] < sum(grid[best].values()) / 2


def test_coefficients_are_deterministic_for_a_seed_and_resume_key(zoo, tmp_path):
    text = atlas_yaml(zoo, "steps: 15, lr: 0.05, windows: 4, seqlen: 32")
    r1, r2 = run(zoo, tmp_path, text, "s1", seed=3), run(zoo, tmp_path, text, "s2", seed=3)
    r3 = run(zoo, tmp_path, text, "s3", seed=4)
    assert r1["fit"]["coefficients"] == r2["fit"]["coefficients"]
    assert r1["fit"]["coefficients"] != r3["fit"]["coefficients"]  # other windows
    on_disk = json.loads((tmp_path / "s1" / "report.json").read_text())
    assert on_disk["fit"]["coefficients"] == r1["fit"]["coefficients"]
    assert [t["loss_before"] for t in on_disk["fit"]["tasks"]] == [t["loss_before"] for t in r1["fit"]["tasks"]]


def test_zero_steps_at_init_one_is_task_arithmetic(zoo, tmp_path):
    from safetensors.torch import load_file

    run(zoo, tmp_path, atlas_yaml(zoo, "steps: 0, init: 1.0, windows: 2, seqlen: 16"), "ta")
    got = load_file(next((tmp_path / "ta").glob("*.safetensors")))
    sd = {t: load_file(zoo[t] / "model.safetensors") for t in ("base", "a", "b")}
    for k, v in got.items():
        want = sd["base"][k] + (sd["a"][k] - sd["base"][k]) + (sd["b"][k] - sd["base"][k])
        assert (v - want).abs().max().item() < 1e-6, k


@pytest.mark.parametrize("params,calib_b,msg", [
    ("steps: 5", False, "missing required parameter calibration"),
    ("steps: -1", True, "steps ≥ 0"),
    ("steps: 5, speed: 2", True, "'speed' is not a parameter of atlas"),
])
def test_refusals_are_one_line_and_exit_2(zoo, tmp_path, capsys, params, calib_b, msg):
    from weightsmith.cli import main

    cfg = zoo["dir"] / "bad.yaml"
    cfg.write_text(atlas_yaml(zoo, params, calib_b))
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_large_models_are_refused_unless_allowed(zoo, tmp_path, monkeypatch):
    from weightsmith.merge.methods import atlas

    monkeypatch.setattr(atlas, "MAX_PARAMS", 1000)
    with pytest.raises(WeightsmithError, match="allow_large") as e:
        run(zoo, tmp_path, atlas_yaml(zoo, "steps: 1, windows: 2, seqlen: 16"), "big")
    assert "\n" not in str(e.value) and not (tmp_path / "big").exists()
    rep = run(zoo, tmp_path, atlas_yaml(zoo, "steps: 1, windows: 2, seqlen: 16, allow_large: true"), "big")
    assert rep["fit"]["parameters"] > 1000


def test_resume_keeps_the_fit_of_the_interrupted_run(zoo, tmp_path, monkeypatch):
    """An aTLAS merge interrupted while writing resumes without fitting again: the fit is kept in
    OUT.partial (prepared.json, not in the output) and the result equals an uninterrupted run's bit for bit."""
    from safetensors.torch import load_file

    from weightsmith.merge import atlas as atlas_fit
    from weightsmith.merge import driver

    text = atlas_yaml(zoo, "steps: 10, lr: 0.05, windows: 4, seqlen: 32")
    cfg = zoo["dir"] / "resume.yaml"
    cfg.write_text(text)
    full = merge(cfg, tmp_path / "full", progress=False, seed=3, shard_bytes=60_000)
    assert full["shards"] >= 3 and not (tmp_path / "full" / "prepared.json").exists()
    real_tensor, real_fit = driver.run_tensor, atlas_fit.fit_coefficients
    calls = {"tensor": 0, "prepare": 0}

    def dying(*a, **k):
        calls["tensor"] += 1
        if calls["tensor"] == 10:
            raise KeyboardInterrupt
        return real_tensor(*a, **k)

    def counted(*a, **k):
        calls["prepare"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(driver, "run_tensor", dying)
    monkeypatch.setattr(atlas_fit, "fit_coefficients", counted)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "o", progress=False, seed=3, shard_bytes=60_000)
    assert calls["prepare"] == 1 and (tmp_path / "o.partial" / "prepared.json").is_file()
    monkeypatch.setattr(driver, "run_tensor", real_tensor)
    res = merge(cfg, tmp_path / "o", progress=False, seed=3, resume=True, shard_bytes=60_000)
    assert calls["prepare"] == 1  # not fitted again
    assert res["resumed_from_shard"] and res["fit"]["coefficients"] == full["fit"]["coefficients"]
    got = {k: v for f in sorted((tmp_path / "o").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    want = {k: v for f in sorted((tmp_path / "full").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "o" / "prepared.json").exists()
