"""Engine 2 end to end on pico models: per-layer rules (mixed grids written by the engine, exported to
all three formats and loaded back), the refusal of rules that split a q/k/v group, skip rules, pure
pruning and prune-then-quantize recipes, the planner (knapsack optimality, budget, resume key) and a
block step."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import calib_ids
from transformers import AutoModelForCausalLM

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.export import export
from weightsmith.export.common import QuantizedCheckpoint
from weightsmith.quant.bitalloc import BitAllocConfig, plan

IDS = calib_ids(8, 32)
L0, L1 = "model.layers.0.", "model.layers.1."


def _logits(path, **kw):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(input_ids=calib_ids(2, 16, seed=9)).logits


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pico_mod(tmp_path_factory):
    from conftest import save_pico

    return save_pico(tmp_path_factory.mktemp("e2") / "pico", "llama")


@pytest.fixture(scope="module")
def mixed(pico_mod, tmp_path_factory):
    """GPTQ W4 g32 with rules: every down_proj at 8 bits g64, block 1's q/k/v at 8 bits per row, block 0's o_proj kept in float."""
    out = tmp_path_factory.mktemp("e2m") / "mixed"
    rules = [{"match": r"mlp\.down_proj", "grid": {"bits": 8, "group_size": 64}},
             {"match": r"layers\.1\.self_attn\.[qkv]_proj", "grid": {"bits": 8, "group_size": -1}},
             {"match": r"layers\.0\.self_attn\.o_proj", "skip": True}]
    rep = weightsmith.quantize(pico_mod, {"method": "gptq", "grid": {"bits": 4, "group_size": 32}, "rules": rules}, IDS, out=out, progress=False)
    return out, rep


def test_rules_give_layers_their_own_grids(mixed):
    out, rep = mixed
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows[L0 + "mlp.down_proj"]["grid"] == {"bits": 8, "group_size": 64, "sym": True}
    assert rows[L1 + "self_attn.k_proj"]["grid"] == {"bits": 8, "group_size": -1, "sym": True}
    assert rows[L0 + "self_attn.q_proj"]["grid"] == {"bits": 4, "group_size": 32, "sym": True}
    assert rows[L0 + "self_attn.o_proj"]["skipped"] and rep["skipped_layers"] == [L0 + "self_attn.o_proj"]
    # bits per weight counted per layer: 8 + 16/64 for down_proj, 4 + 16/32 for the others
    assert rows[L0 + "mlp.down_proj"]["bits_per_weight"] == pytest.approx(8.25)
    assert rows[L0 + "mlp.up_proj"]["bits_per_weight"] == pytest.approx(4.5)
    assert rep["summary"]["layers"] == 13 and rep["summary"]["skipped_layers"] == 1
    with QuantizedCheckpoint(out) as ck:  # the per-layer encodings the engine wrote
        assert ck.grid(L0 + "mlp.down_proj").bits == 8 and ck.grid(L0 + "self_attn.v_proj").bits == 4
        assert L0 + "self_attn.o_proj" not in ck.layers
    # the float layer is the original's
    src = AutoModelForCausalLM.from_pretrained(rep["model"]).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(src[L0 + "self_attn.o_proj.weight"], got[L0 + "self_attn.o_proj.weight"])


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gguf"])
def test_engine_mixed_grid_exports_and_loads_back(mixed, tmp_path, fmt):
    out, _ = mixed
    ref = _logits(out)
    if fmt == "gguf":
        dest = tmp_path / "m.gguf"
        info = export(out, dest, fmt, gguf_unverified_tokenizer=True)
        assert info["gguf_types"] == {"Q4_0": 8, "Q8_0": 5}  # 2 down_proj + block 1's q/k/v at 8 bits; o_proj of block 0 F16
        got = _logits(tmp_path, gguf_file=dest.name)
        assert _rel(got, ref) <= 5e-3
        return
    dest = tmp_path / "m"
    export(out, dest, fmt)
    if fmt == "compressed-tensors":
        got = _logits(dest)
        assert _rel(got, ref) <= 1e-4
    else:
        from weightsmith.eval.loading import load_for_eval

        m, _, _ = load_for_eval(dest, progress=False)
        with torch.no_grad():
            got = m(input_ids=calib_ids(2, 16, seed=9)).logits
        assert _rel(got, ref) <= 2e-3  # fp16 scales


def test_rules_that_split_a_shared_input_group_are_refused_before_work(pico_mod, tmp_path, calib_file, capsys):
    code = main(["quantize", str(pico_mod), str(tmp_path / "o"), "--quiet", "--method", "gptq", "--calib", str(calib_file),
                 "--rule", r"layers\.1\.self_attn\.k_proj:bits=8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.layers.1.self_attn.q_proj (W4 g64 sym, gptq) and model.layers.1.self_attn.k_proj (W8 g64 sym, gptq)" in err
    assert "read one input" in err and not (tmp_path / "o").exists()


def test_exporter_refuses_a_grid_it_cannot_hold_before_quantizing(pico_mod, tmp_path, capsys):
    code = main(["quantize", str(pico_mod), str(tmp_path / "o.gguf"), "--quiet", "--method", "rtn", "--format", "gguf",
                 "--rule", r"mlp:bits=3"])
    err = capsys.readouterr().err
    assert code == 2 and "--format gguf: rule 'mlp' (W3)" in err and not (tmp_path / "o.gguf").exists()


def test_pure_pruning_and_prune_then_quantize(pico_mod, tmp_path):
    p = weightsmith.quantize(pico_mod, {"method": "wanda:sparsity=0.5"}, IDS, out=tmp_path / "w", progress=False)
    row = next(r for r in p["layers"] if r["name"] == L0 + "mlp.up_proj")
    assert row["density"] == pytest.approx(0.5) and "grid" not in row and row["bits"]["mask"] == row["shape"][0] * row["shape"][1]
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "w").state_dict()[L0 + "mlp.up_proj.weight"]
    assert float((w == 0).float().mean(1).min()) == pytest.approx(0.5)  # Wanda compares within each output row
    pq = weightsmith.quantize(pico_mod, {"method": "magnitude:pattern=2:4,gptq", "grid": {"bits": 4, "group_size": 32}}, IDS,
                              out=tmp_path / "mq", progress=False)
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "mq").state_dict()[L0 + "mlp.up_proj.weight"]
    kept = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert int(kept.max()) <= 2  # GPTQ kept the 2:4 mask (a kept weight may also round to 0)
    with QuantizedCheckpoint(tmp_path / "mq") as ck:
        kinds = [e["kind"] for e in ck.encodings(L0 + "mlp.up_proj")]
        assert kinds == ["sparsity", "grid"]
        assert ck.layer(L0 + "mlp.up_proj").bits == 4
    row = next(r for r in pq["layers"] if r["name"] == L0 + "mlp.up_proj")
    assert row["error"] < 1.0 and row["bits_per_weight"] == pytest.approx(4.5)  # the mask is held by the dense zeros


# ---- the planner -----------------------------------------------------------------------------------------------------

def _groups(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        numel = int(torch.randint(1, 4, (1,), generator=g)) * 4096
        opts = []
        for b in (2, 3, 4, 8):
            for gs in (32, 128):
                err = float(torch.rand(1, generator=g)) * 2.0 ** (-b) * (1 + i)
                opts.append({"bits": b, "group_size": gs, "storage_bits": int(numel * (b + 16 / gs)), "relative": err, "absolute": err})
        out.append({"layers": [f"l{i}"], "numel": numel, "rows": [64], "measure": opts})
    return out


@pytest.mark.parametrize("target", [2.6, 3.3, 4.1])
def test_knapsack_plan_is_optimal_and_within_budget(target):
    groups = _groups()
    cfg = BitAllocConfig(target_bpw=target, resolution=20000, objective="relative")
    rules, summary = plan(groups, cfg)
    numel = sum(g["numel"] for g in groups)
    assert summary["planned_bpw"] <= target + 1e-9
    best = min((sum(o["relative"] for o in combo), combo) for combo in itertools.product(*[g["measure"] for g in groups])
               if sum(o["storage_bits"] for o in combo) <= target * numel)
    assert summary["predicted_error"] == pytest.approx(best[0], rel=1e-9, abs=1e-12)
    assert rules[0]["match"] == "^(l0)$" and set(rules[0]["grid"]) == {"bits", "group_size"}


def test_knapsack_refuses_an_impossible_target():
    with pytest.raises(WeightsmithError, match="the smallest candidates need"):
        plan(_groups(), BitAllocConfig(target_bpw=1.5, objective="relative"))


def test_target_bpw_end_to_end_and_resume_key(pico_mod, tmp_path):
    rep = weightsmith.quantize(pico_mod, {"method": "bitalloc:target_bpw=3.5:bits=[2,3,4,8]:group_sizes=[32,64],gptq",
                                          "grid": {"bits": 4, "group_size": 32}}, IDS, out=tmp_path / "t", progress=False)
    s, plan_ = rep["summary"], rep["plan"]
    assert s["bits_per_weight"] <= 3.5 + 1e-9 and plan_["planned_bpw"] == pytest.approx(s["bits_per_weight"])
    grids = {json.dumps(r["grid"], sort_keys=True) for r in rep["layers"]}
    assert len(grids) >= 2  # the plan mixes grids
    for g in plan_["groups"]:  # layers that read one input got one grid
        assert len({json.dumps(r["grid"], sort_keys=True) for r in rep["layers"] if r["name"] in g["layers"]}) == 1
    assert not (tmp_path / "t.partial").exists()


def test_tune_scales_lowers_the_block_output_error(pico_mod, tmp_path):
    rep = weightsmith.quantize(pico_mod, {"method": "gptq,tune_scales:iters=40:lr=0.01", "grid": {"bits": 3, "group_size": 32}}, IDS,
                               out=tmp_path / "b", progress=False)
    infos = {r["block"]: r["tune_scales"] for r in rep["layers"]}
    assert len(infos) == 2
    for i in infos.values():
        assert i["kept"] and i["block_error_after"] < 0.97 * i["block_error_before"], i
    # the tuned scales are what the qparams hold: the weights still lie on the (new) grid
    with QuantizedCheckpoint(tmp_path / "b") as ck:
        for n in ck.layers:
            ck.layer(n)  # refuses weights off their qparams' grid


def test_a_run_leaves_grad_mode_as_it_found_it(pico_mod, tmp_path):
    """Chunks park inside their forwards' no_grad blocks, interleaved on one thread: the runner must
    not leave autograd switched off for the caller."""
    assert torch.is_grad_enabled()
    weightsmith.quantize(pico_mod, {"method": "gptq", "grid": {"bits": 4, "group_size": 32}, "chunk_size": 2}, IDS, out=tmp_path / "g",
                         progress=False)
    assert torch.is_grad_enabled()


def test_output_fisher_is_the_mean_squared_loss_gradient_at_each_output(pico_mod):
    """engine/fisher.py against autograd done by hand on the whole model: f_i = mean_t (∂L/∂y_ti)²."""
    from transformers import AutoModelForCausalLM

    from weightsmith.engine.fisher import output_fisher
    from weightsmith.model.adapter import LazyModel
    from weightsmith.model.source import CheckpointSource

    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    with CheckpointSource(pico_mod) as src:
        got = output_fisher(LazyModel(src), IDS[:4], names, chunk=3, progress=False)
    m = AutoModelForCausalLM.from_pretrained(pico_mod, dtype=torch.float32).eval()
    outs = {}

    def keep(name):
        def hook(_mod, _inp, o):
            o.retain_grad()
            outs[name] = o
        return hook

    hooks = [dict(m.named_modules())[n].register_forward_hook(keep(n)) for n in names]
    x = IDS[:4]
    logits = m(input_ids=x, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in hooks:
        h.remove()
    for n in names:
        want = outs[n].grad.pow(2).reshape(-1, outs[n].shape[-1]).sum(0) / x[:, 1:].numel()
        assert got[n].shape == want.shape and torch.allclose(got[n], want, rtol=1e-4, atol=1e-12), n
        assert (got[n] > 0).all()


def test_model_sampled_fisher_at_the_logits_is_the_true_fisher(pico_mod):
    """labels=model: at the logits the loss gradient is p − e_y with y drawn from p, whose mean square
    is p(1 − p) per vocabulary entry: the summed estimate over the vocabulary matches the analytic
    mean of 1 − Σ_i p_i² within sampling noise; the data-label estimate does not; seeded (same draws
    twice); fisher_labels reaches the gradient pass through the planner and changes the plan's measurements."""
    from transformers import AutoModelForCausalLM

    from weightsmith.engine.fisher import output_fisher
    from weightsmith.model.adapter import LazyModel
    from weightsmith.model.source import CheckpointSource

    with CheckpointSource(pico_mod) as src:
        true1 = output_fisher(LazyModel(src), IDS, ["lm_head"], chunk=4, progress=False, labels="model")["lm_head"]
        true2 = output_fisher(LazyModel(src), IDS, ["lm_head"], chunk=4, progress=False, labels="model")["lm_head"]
        emp = output_fisher(LazyModel(src), IDS, ["lm_head"], chunk=4, progress=False)["lm_head"]
    m = AutoModelForCausalLM.from_pretrained(pico_mod, dtype=torch.float32).eval()
    with torch.no_grad():
        pr = torch.softmax(m(input_ids=IDS).logits[:, :-1].double(), -1)
    want = (pr * (1 - pr)).reshape(-1, pr.shape[-1]).mean(0)  # E_y (p_i − 1[y = i])² = p_i (1 − p_i), per entry
    assert torch.equal(true1, true2)
    assert abs(float(true1.sum()) / float(want.sum()) - 1) < 0.05, (float(true1.sum()), float(want.sum()))
    seen = torch.zeros(pr.shape[-1], dtype=torch.bool)
    seen[IDS[:, 1:].reshape(-1)] = True  # the entries the text's next tokens hit
    share = lambda f: float(f.double()[seen].sum() / f.double().sum())  # noqa: E731
    assert abs(share(true1) - share(want)) < 0.1, (share(true1), share(want))
    assert share(emp) > share(want) + 0.3, (share(emp), share(want))  # the data labels put it on the text's tokens
    with pytest.raises(WeightsmithError, match="labels must be"):
        with CheckpointSource(pico_mod) as src:
            output_fisher(LazyModel(src), IDS[:2], ["lm_head"], progress=False, labels="text")


def test_target_bpw_with_the_fisher_objective(pico_mod, tmp_path):
    rep = weightsmith.quantize(pico_mod, {"method": "bitalloc:target_bpw=3.5:bits=[2,3,4,8]:group_sizes=[32,64]:objective=fisher:fisher_samples=4,gptq",
                                          "grid": {"bits": 4, "group_size": 32}}, IDS, out=tmp_path / "f", progress=False)
    s, plan_ = rep["summary"], rep["plan"]
    assert plan_["objective"] == "fisher" and s["bits_per_weight"] <= 3.5 + 1e-9
    saved = json.loads((tmp_path / "f" / "plan.json").read_text())
    for g in saved["measurements"]:  # every candidate carries the estimate, smaller for more bits at one group size
        by = {(m["bits"], m["group_size"]): m["fisher"] for m in g["measure"]}
        assert all(v >= 0 for v in by.values()) and by[(2, 32)] > by[(4, 32)] > by[(8, 32)]
