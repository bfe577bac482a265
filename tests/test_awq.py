"""AWQ: the scale search, generic detection of the op producing a group's input, exact folding, end to end."""
from __future__ import annotations


import pytest
import torch
import transformers
from safetensors.torch import load_file

import weightsmith
from weightsmith.config import build_config
from weightsmith.engine.fold import detect_producers, scale_producer
from weightsmith.engine.sequential import discover_groups
from weightsmith.errors import WeightsmithError
from weightsmith.model.adapter import get_weight, is_linear, set_weight
from weightsmith.quant.awq import search_scale
from weightsmith.quant.grid import relative_error
from weightsmith.quant.pipeline import run_group
from weightsmith.quant.registry import LayerStats
from conftest import CLASSES, calib_ids, pico_config

GRID16 = {"bits": 4, "group_size": 16}


def outlier_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(96, 128, generator=g) * 0.05
    X = torch.randn(4096, 128, generator=g)
    X[:, [3, 50, 77, 100]] *= 25  # a few outlier input channels, as in LLM activations
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_rtn_beats_rtn_with_outlier_channels(bits):
    W, H = outlier_problem()
    errs = {}
    for recipe in ("rtn", "awq,rtn", "gptq", "awq,gptq"):
        cfg = build_config({"method": recipe, "grid": {"bits": bits, "group_size": 32}})
        r = run_group([W[:48], W[48:]], LayerStats(H), cfg, foldable=True)
        errs[recipe] = relative_error(r.effective - W, W, H)  # output error of the group, original input space
    # measured: W3 0.043 → 0.022, W4 0.0088 → 0.0050
    assert errs["awq,rtn"] < 0.7 * errs["rtn"]
    assert errs["awq,gptq"] < errs["gptq"]


def test_search_objective_and_alpha_zero_is_plain_rtn():
    W, H = outlier_problem(1)
    grid = build_config({"method": "rtn"}).grid
    s, alpha, errs = search_scale(W, LayerStats(H), grid, 10)
    assert len(errs) == 10 and min(errs) == errs[int(round(alpha * 10))] and min(errs) < errs[0]
    assert s.shape == (128,) and bool((s > 0).all())
    # α = 0 is plain RTN (scale 1): the search can only improve on it
    from weightsmith.quant.rtn import rtn_quantize
    E = rtn_quantize(W, grid).weight - W
    assert errs[0] == pytest.approx(float(((E @ H) * E).sum()), rel=1e-5)


def test_unfoldable_group_is_left_unscaled_or_refused():
    W, H = outlier_problem()
    cfg = build_config({"method": "awq,rtn", "grid": GRID16})
    r = run_group([W], LayerStats(H), cfg, foldable=False, why_not="no producer")
    assert r.state.input_scale is None and r.state.info["awq"] == {"skipped": "no producer"}
    strict = build_config({"method": [{"name": "awq", "require_fold": True}, "rtn"], "grid": GRID16})
    with pytest.raises(WeightsmithError, match="cannot fold the scale of x.o_proj"):
        run_group([W], LayerStats(H), strict, where="x.o_proj", foldable=False, why_not="no producer")


# ---- producer detection and folding on pico models --------------------------------------------------

def float_block(arch: str, **kw):
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[arch])(pico_config(arch, **kw)).eval()
    ids = calib_ids(2, 16)
    from weightsmith.model.adapter import find_blocks

    _, blocks = find_blocks(model)
    cap = {}

    def hook(_m, args, kwargs):
        cap["a"] = (args, kwargs)
        raise RuntimeError("captured")

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except RuntimeError:
        pass
    finally:
        h.remove()
    block = blocks[0]
    layers = {rel: m for rel, m in block.named_modules() if is_linear(m)}
    groups, _ = discover_groups(block, layers, *cap["a"])
    return block, groups, cap["a"]


def producers_of(arch: str, **kw) -> dict:
    block, groups, (args, kwargs) = float_block(arch, **kw)
    p = detect_producers(block, groups, args, kwargs)
    return {g.leader: (p[g.leader].rel, p[g.leader].kind) for g in groups}


def test_detects_producers_llama():
    p = producers_of("llama")  # GQA: 4 heads, 2 kv heads
    assert p["self_attn.q_proj"] == ("input_layernorm", "norm")
    assert p["mlp.gate_proj"] == ("post_attention_layernorm", "norm")
    assert p["mlp.down_proj"] == ("mlp.up_proj", "linear")  # through act(gate)·up, not gate_proj
    assert p["self_attn.o_proj"] == (None, "none")  # GQA: v_proj's rows are shared by several heads


def test_detects_v_proj_for_o_proj_with_full_attention_heads():
    assert producers_of("llama", num_key_value_heads=4)["self_attn.o_proj"] == ("self_attn.v_proj", "linear")


def test_detects_producers_opt_and_gpt2():
    p = producers_of("opt")
    assert p["self_attn.q_proj"] == ("self_attn_layer_norm", "norm")
    assert p["fc1"] == ("final_layer_norm", "norm")
    assert p["fc2"] == ("fc1", "linear")  # ReLU is positively homogeneous
    p = producers_of("gpt2")
    assert p["attn.c_attn"] == ("ln_1", "norm") and p["mlp.c_fc"] == ("ln_2", "norm")
    assert p["mlp.c_proj"][0] is None  # GELU: cannot fold
    assert p["attn.c_proj"][0] is None  # c_attn's output is 3× wider: no row-to-channel match


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_scale_and_fold_is_identity(arch):
    block, groups, (args, kwargs) = float_block(arch, num_key_value_heads=4) if arch == "llama" else float_block(arch)
    prods = detect_producers(block, groups, args, kwargs)
    mods = dict(block.named_modules())
    with torch.no_grad():
        ref = block(*args, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        g = torch.Generator().manual_seed(1)
        n = 0
        for grp in groups:  # every foldable group at once, with scales spanning two decades
            p = prods[grp.leader]
            if p.rel is None:
                continue
            width = get_weight(mods[grp.leader]).shape[1]
            s = torch.exp(torch.empty(width).uniform_(-2.3, 2.3, generator=g))
            scale_producer(mods[p.rel], p.kind, 1 / s)
            for rel in grp.names:
                set_weight(mods[rel], get_weight(mods[rel]) * s)
            n += 1
        out = block(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
    assert n >= (2 if arch == "gpt2" else 4)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


# ---- end to end -------------------------------------------------------------------------------------

RECIPE = {"method": ["awq", "gptq", {"name": "lorc", "rank": 4}], "grid": GRID16}


def pico_with_outliers(path):
    """Pico Llama whose norms amplify a few channels (×8), as trained LLMs' norms do: the case AWQ is for."""
    from conftest import save_pico

    save_pico(path, "llama")
    m = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") and "layers" in n:
                p[[5, 17, 40]] *= 8
    m.save_pretrained(path)
    return path


def test_end_to_end_awq_gptq_lorc(tmp_path):
    src = pico_with_outliers(tmp_path / "pico")
    rep = weightsmith.quantize(src, RECIPE, calib_ids(8, 32), out=tmp_path / "q", progress=False)
    s = rep["summary"]
    assert rep["config"]["steps"][0]["name"] == "awq" and rep["config"]["steps"][2]["rank"] == 4
    # 4 bits + a 16-bit scale per 16 weights + rank-4 factors: computed from the shapes
    layers = rep["layers"]
    numel = sum(r["shape"][0] * r["shape"][1] for r in layers)
    bits = sum(4 * o * i + 16 * o * (i // 16) + 16 * 4 * (o + i) for o, i in (r["shape"] for r in layers))
    assert s["bits_per_weight"] == pytest.approx(bits / numel)
    unscaled = {u["name"]: u["why"] for u in s["awq_unscaled"]}
    for b in (0, 1):  # GQA: o_proj has no producer that can absorb a scale
        assert "no op producing the input" in unscaled[f"model.layers.{b}.self_attn.o_proj"]
    scaled = {r["name"] for r in layers if "folded_into" in r}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"} <= scaled, s
    assert "unscaled" in (tmp_path / "q" / "report.md").read_text()
    assert s["mean_error"] < s["mean_rtn_error"]

    a = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    qp = load_file(tmp_path / "q" / "qparams" / "block-00000.safetensors")
    ref_sd, q_sd = a.state_dict(), b.state_dict()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        ratio = ref_sd[f"model.layers.0.{norm}.weight"] / q_sd[f"model.layers.0.{norm}.weight"]
        assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)  # the folded scales s
        assert bool((ratio > 0).all())
    # every layer is on its grid once its LoRC product is removed, the folded producer up_proj included
    for rel in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        name = f"model.layers.0.{rel}"
        w = q_sd[name + ".weight"] - qp[name + ".lowrank_a"] @ qp[name + ".lowrank_b"]
        sc = qp[name + ".scale"][:, qp[name + ".g_idx"].long()]
        z = qp[name + ".zero"][:, qp[name + ".g_idx"].long()].float()
        q = w / sc + z
        assert torch.allclose(q, q.round(), atol=2e-3), rel
        assert float(q.round().min()) >= 0 and float(q.round().max()) <= 15
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.isfinite(lb).all() and float((la - lb).norm() / la.norm()) < 0.5


def test_parked_inputs_are_rescaled_like_a_replay(tmp_path):
    """True-sequential with parked chunks (inputs divided in place at fold time) must equal the
    low-memory replay (which reruns the block through the folded producers). They differ only by float
    rounding (x·(1/s) vs norm(h)·(w/s)), which can flip a discrete choice where the α landscape is flat."""
    src = pico_with_outliers(tmp_path / "pico")
    cfg = {"method": "awq,gptq", "grid": GRID16, "chunk_size": 4}
    ids = calib_ids(8, 32)
    r1 = weightsmith.quantize(src, cfg, ids, out=tmp_path / "park", progress=False)
    r2 = weightsmith.quantize(src, {**cfg, "low_memory": True}, ids, out=tmp_path / "replay", progress=False)
    assert sum("folded_into" in r for r in r1["layers"]) >= 8
    assert [r["error"] for r in r1["layers"]] == pytest.approx([r["error"] for r in r2["layers"]], rel=1e-3)
    a = load_file(tmp_path / "park" / "model-00001-of-00003.safetensors")  # block 0, its norms with the folded scales
    b = load_file(tmp_path / "replay" / "model-00001-of-00003.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_require_fold_stops_on_gqa_o_proj(pico, tmp_path):
    with pytest.raises(WeightsmithError, match="o_proj"):
        weightsmith.quantize(pico("llama"), {"method": [{"name": "awq", "require_fold": True}, "rtn"], "grid": GRID16}, calib_ids(4, 16),
                             out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
