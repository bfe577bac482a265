"""The CLI: one typed config from flags, YAML and Python; bad input gives one line, exit 2, nothing left behind."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.cli import _config_from_args, build_parser, main
from weightsmith.config import build_config
from conftest import make_text


def run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def parse_q(*argv):
    return _config_from_args(build_parser().parse_args(["quantize", "m", "o", *argv]))


def test_cli_yaml_and_python_build_the_same_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: gptq\n  act_order: false\n  damp: 0.05\ngrid:\n  bits: 3\n  group_size: 128\n  sym: false\ncalib:\n  path: c.txt\n  nsamples: 64\n  seqlen: 256\n  seed: 7\n")
    from_cli = parse_q("--method", "gptq", "--no-act-order", "--damp", "0.05", "--bits", "3", "--group-size", "128", "--asym",
                       "--calib", "c.txt", "--nsamples", "64", "--seqlen", "256", "--seed", "7")
    from_yaml = parse_q("--recipe", str(recipe))
    from_py = build_config(method={"name": "gptq", "act_order": False, "damp": 0.05}, grid={"bits": 3, "group_size": 128, "sym": False},
                           calib={"path": "c.txt", "nsamples": 64, "seqlen": 256, "seed": 7})
    assert from_cli == from_yaml == from_py
    assert from_cli.to_dict()["steps"] == [{"name": "gptq", "act_order": False, "static_groups": True, "damp": 0.05, "block_size": 128}]
    # flags override the recipe
    assert parse_q("--recipe", str(recipe), "--bits", "4").grid.bits == 4


def test_defaults():
    cfg = parse_q()
    # the default recipe (bench/results/methods.md): ResComp, float path on 64 samples, GPTQ's act-order and static groups
    assert cfg.recipe == "rescomp" and cfg.method.float_samples == 64 and cfg.method.act_order and cfg.method.static_groups
    assert parse_q("--float-samples", "32").method.float_samples == 32
    assert parse_q("--method", "gptaq").method.float_samples is None  # a named float-path method: all samples
    assert (cfg.grid.bits, cfg.grid.group_size, cfg.grid.sym) == (4, 64, True)
    assert (cfg.calib.path, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed) == (None, 128, 512, 0)


@pytest.mark.parametrize("argv,msg", [
    (["--bits", "9"], "grid.bits"),
    (["--bits", "1"], "grid.bits"),
    (["--group-size", "0"], "group_size"),
    (["--method", "nope"], "unknown step 'nope'"),
    (["--method", "rtn", "--act-order"], "--act-order is an option of"),
])
def test_invalid_config_one_line(argv, msg, pico, tmp_path, capsys):
    code, _, err = run(["quantize", str(pico()), str(tmp_path / "o"), "--quiet", *argv], capsys)
    assert code == 2 and msg in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o").exists()


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_bad_inputs(pico, tmp_path, capsys):
    src = pico()
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text(make_text(20))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (notmodel / "model.safetensors").write_bytes(b"")
    cases = [
        (["quantize", str(tmp_path / "missing"), str(out)], "does not exist"),
        (["quantize", str(src), str(out), "--calib", str(empty), "--nsamples", "2", "--seqlen", "16"], "empty"),
        (["quantize", str(src), str(out), "--calib", str(short), "--nsamples", "2", "--seqlen", "64"], "shorter than one window"),
        (["quantize", str(src), str(out), "--calib", str(latin), "--nsamples", "2", "--seqlen", "16"], "UTF-8"),
        (["quantize", str(src), str(out), "--calib", str(tmp_path / "nocalib.txt")], "does not exist"),
        (["quantize", str(notmodel), str(out)], "notmodel"),
        (["quantize", str(src), str(out), "--group-size", "4096", "--calib", str(short), "--nsamples", "1", "--seqlen", "8"], "group size 4096"),
        (["quantize", str(src), str(src)], "already exists"),
        (["quantize", str(src), str(tmp_path / "no" / "such" / "dir")], "does not exist"),
        (["eval", str(tmp_path / "missing"), "--text", str(short)], "does not exist"),
    ]
    for argv, msg in cases:
        code, _, err = run([*argv, "--quiet"], capsys)
        assert code == 2, (argv, err)
        assert msg in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert leftovers(tmp_path, {"pico-llama", "empty.txt", "short.txt", "latin.txt", "notmodel"}) == [], argv


def test_nan_weights_and_corrupt_shard(pico, tmp_path, capsys):
    src = pico()
    f = src / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if "layers.1.mlp.down_proj" in k)
    sd[key][0, 0] = math.nan
    save_file(sd, f, metadata={"format": "pt"})
    code, _, err = run(["quantize", str(src), str(tmp_path / "o"), "--quiet", "--nsamples", "2", "--seqlen", "16"], capsys)
    assert code == 2 and "NaN" in err and key in err
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(["quantize", str(src), str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "corrupt" in err and "truncated" in err
    assert not (tmp_path / "o").exists()


def test_quantize_and_eval_end_to_end(pico, tmp_path, calib_file, capsys):
    src = pico()
    out = tmp_path / "q"
    code, stdout, _ = run(["quantize", str(src), str(out), "--quiet", "--method", "gptq", "--bits", "4", "--group-size", "16",
                           "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "64"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    rep = json.loads((out / "report.json").read_text())
    assert summary["layers"] == len(rep["layers"]) == 14
    assert rep["calibration"]["kind"] == "file" and rep["calibration"]["nsamples"] == 8
    assert rep["config"]["grid"]["group_size"] == 16 and rep["versions"]["torch"] == torch.__version__
    assert rep["wall_time_s"] > 0 and rep["peak_rss_mb"] > 50
    for row in rep["layers"]:
        assert set(row) >= {"name", "shape", "error", "rtn_error", "damp"}
    assert (out / "report.md").read_text().count("\n") > 14
    # the output exists; overwriting needs --overwrite
    code, _, err = run(["quantize", str(src), str(out), "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err
    code, stdout, _ = run(["eval", str(out), "--text", str(calib_file), "--seqlen", "64", "--windows", "4", "--reference", str(src), "--quiet"], capsys)
    assert code == 0
    res = json.loads(stdout)
    assert res["windows"] == 4 and res["kl"] > 0 and 0.5 < res["top1"] < 1 and res["perplexity"] > 1


def test_generated_calibration_when_no_data(pico, tmp_path):
    import weightsmith

    rep = weightsmith.quantize(pico(), {"method": "gptq", "calib": {"nsamples": 4, "seqlen": 16, "seed": 1}}, out=tmp_path / "q", progress=False)
    assert rep["calibration"]["kind"] == "generated" and "sampled from the model" in rep["calibration"]["note"]


def test_data_free_recipe_takes_no_calibration(pico, tmp_path, monkeypatch):
    """RTN and magnitude pruning need nothing: no text is read or sampled, no calibration forward runs."""
    import weightsmith
    import weightsmith.api as api
    from weightsmith.engine import sequential

    def boom(*a, **k):
        raise AssertionError("calibration was built for a data-free recipe")

    monkeypatch.setattr(api, "_calibration", boom)
    monkeypatch.setattr(sequential.SequentialRunner, "run", boom)
    src = pico()
    rep = weightsmith.quantize(src, {"method": "rtn", "grid": {"bits": 4, "group_size": 32}}, out=tmp_path / "q", progress=False)
    assert rep["calibration"]["kind"] == "none" and rep["summary"]["layers"] == 14
    assert "mean_error" not in rep["summary"] and "mean_rtn_error" not in rep["summary"]  # no H: no output errors, no RTN baseline
    assert 0 < rep["summary"]["mean_weight_error"] < 0.05 and rep["summary"]["bits_per_weight"] == pytest.approx(4.5)
    pruned = weightsmith.quantize(src, {"method": "magnitude:pattern=2:4"}, out=tmp_path / "p", progress=False)
    row = pruned["layers"][0]
    assert pruned["calibration"]["kind"] == "none" and "grid" not in row
    assert row["bits"]["mask"] == 3 * row["shape"][0] * row["shape"][1] // 4  # 2:4 index bits
    from safetensors import safe_open

    from weightsmith.encodings import META_KEY

    f = tmp_path / "p" / "qparams" / "block-00000.safetensors"
    with safe_open(str(f), "pt") as fh:
        assert '"pattern": "2:4"' in fh.metadata()[META_KEY]
    qp = load_file(f)
    assert qp[f"{row['name']}.mask"].dtype == torch.uint8


def test_encoder_needs_calibration_text(pico, tmp_path, capsys):
    code, _, err = run(["quantize", str(pico("bert")), str(tmp_path / "o"), "--quiet", "--nsamples", "2", "--seqlen", "16"], capsys)
    assert code == 2 and "--calib" in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "quantize" in out and "eval" in out and "demo" in out
