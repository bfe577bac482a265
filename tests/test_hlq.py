"""HLQ (hierarchical linear quantization, quant/hlq.py): free per-plane scales per row and group.
On a real SmolLM2 layer it ends below round-to-nearest on the same grid (clip search included) in
every group, it reproduces weights that already lie on a uniform grid, and a data-free recipe
``hlq`` runs end to end: the report counts its plane scales, ``inspect`` reads it back, and the packed
exporters refuse the encoding by name."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import save_pico

import weightsmith
from weightsmith.cli import main
from weightsmith.config import GridConfig
from weightsmith.encodings import Planes
from weightsmith.quant import grid as G
from weightsmith.quant.hlq import fit_groups, hlq_quantize


@pytest.fixture(scope="module")
def real_layer(tmp_path_factory):
    from conftest import smollm2_first_blocks
    from safetensors import safe_open

    d = smollm2_first_blocks(tmp_path_factory, 2)
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if "model.layers.1.mlp.down_proj.weight" in fh.keys():
                return fh.get_tensor("model.layers.1.mlp.down_proj.weight").float()
    raise AssertionError("down_proj of block 1 not found")


@pytest.mark.parametrize("bits,clip,ratio", [(2, True, 0.95), (3, True, 0.95), (2, False, 0.65)])
def test_below_rtn_on_a_real_layer(real_layer, bits, clip, ratio):
    w = real_layer
    grid = GridConfig(bits=bits, group_size=64, sym=False, clip_search=clip)
    dense, enc, info = hlq_quantize(w, grid)
    # measured on SmolLM2's block-1 down_proj (576 x 1536): W2 0.116 vs RTN 0.130 (clip search), W3 0.028 vs 0.032
    assert info["weight_error"] < ratio * info["rtn_weight_error"], info
    assert enc.plane_scale.shape == (576, 24, bits) and enc.offset.shape == (576, 24)
    # the dense weight is exactly one of its group's levels, everywhere
    lv = enc.levels()  # (out, groups, L)
    gi = torch.arange(w.shape[1]) // 64
    dist = (dense[:, :, None] - lv[:, gi, :]).abs().min(-1).values
    assert float(dist.max()) == 0.0
    # never above RTN in any group (the fit starts there and keeps each group's best iterate)
    scale, zero, g_idx = G.grouped_params(w, grid)
    rtn = G.dequantize_groups(w, scale, zero, g_idx, bits)
    e_h = ((dense - w) ** 2).reshape(576, 24, 64).sum(-1)
    e_r = ((rtn - w) ** 2).reshape(576, 24, 64).sum(-1)
    assert bool((e_h <= e_r * (1 + 1e-5) + 1e-12).all())


def test_exact_on_a_uniform_grid_and_a_short_last_group():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(8, 1, generator=g) * 0.1 + 0.01
    q = torch.randint(0, 8, (8, 40), generator=g).float()
    q[:, 0], q[:, 1] = 0, 7  # every group spans the whole range: RTN's min/max grid is this grid
    q[:, 32], q[:, 33] = 0, 7
    w = (q - 3) * scale
    dense, enc, info = hlq_quantize(w, GridConfig(bits=3, group_size=32, sym=False))
    assert enc.offset.shape == (8, 2)  # 32 + a short group of 8
    assert info["weight_error"] < 1e-10 and torch.allclose(dense, w, atol=1e-6)
    # free plane scales fit levels no uniform grid has: {0, 3, 8, 11} / 100 = 0.03 · bit0 + 0.08 · bit1,
    # found exactly from the uniform start {0, 11/3, 22/3, 11} / 100 (where RTN's error stays)
    levels = torch.tensor([0.0, 3.0, 8.0, 11.0]) / 100
    x = levels[torch.randint(0, 4, (16, 64), generator=g)]
    x[:, :4] = levels
    ps, off, codes = fit_groups(x, torch.full((16,), 0.11 / 3), torch.zeros(16), 2, 20)
    assert torch.allclose(ps, torch.tensor([0.03, 0.08]).double().expand(16, 2), atol=1e-9)
    assert torch.allclose(off, torch.zeros(16).double(), atol=1e-9)


def test_hlq_recipe_end_to_end(tmp_path):
    src = save_pico(tmp_path / "src", "llama", layers=2)
    rep = weightsmith.quantize(src, {"method": "hlq", "grid": {"bits": 2, "group_size": 16}}, out=tmp_path / "out", progress=False)
    assert rep["calibration"]["kind"] == "none"  # data-free
    s = rep["summary"]
    assert s["bits_per_weight"] == pytest.approx(2 + 16 * 3 / 16)  # codes + 2 plane scales and an offset per group of 16
    assert all(r["weight_error"] < r["rtn_weight_error"] for r in rep["layers"])
    assert s["mean_weight_error"] < 0.8 * sum(r["rtn_weight_error"] for r in rep["layers"]) / len(rep["layers"])
    rc = main(["inspect", str(tmp_path / "out"), "--json"])
    assert rc == 0
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "gptq"), "--format", "gptq"]) == 2
    assert not (tmp_path / "gptq").exists()


def test_inspect_reads_planes(tmp_path, capsys):
    src = save_pico(tmp_path / "src", "llama", layers=1)
    weightsmith.quantize(src, {"method": "hlq", "grid": {"bits": 3, "group_size": 32}}, out=tmp_path / "out", progress=False)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["packed_bits_per_weight_quantized"] == pytest.approx(3 + 16 * 4 / 32)
    assert any(k.startswith("hlq3 g32") for k in res["schemes"])
    enc = Planes(3, 32, torch.ones(2, 1, 3), torch.zeros(2, 1))
    assert enc.bits((2, 32)) == {"weights": 3 * 64, "scales": 16 * 2 * 4}


@pytest.mark.parametrize("group", ["qkv", "down"])
def test_data_aware_fit_lowers_the_output_error(smollm2_layers, group):
    """hlq:data_aware weighs each input column by its energy diag(H): on SmolLM2's block-1 layers with
    their real inputs, the output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) falls below the data-free fit's at W3 and
    W2 g64, and its weighted error never rises above RTN's in any group (the fit starts there).
    Measured: q/k/v W3 0.0168 → 0.0037, W2 0.106 → 0.016; down W3 0.0181 → 0.0135, W2 0.085 → 0.057.
    GPTQ's rounding onto those levels (solver=gptq) then: q/k/v W3 0.00130, W2 0.00591; down W3 0.00422, W2
    0.01924 — below GPTQ on the uniform grid of the same bits and groups (0.00147, 0.01767; 0.00547, 0.02590)."""
    w, H = smollm2_layers[group]
    d = H.diagonal().double()

    def out_err(q):
        e = (q - w).double()
        return float(torch.einsum("ij,jk,ik->", e, H.double(), e) / torch.einsum("ij,jk,ik->", w.double(), H.double(), w.double()))

    for bits in (3, 2):
        grid = GridConfig(bits=bits, group_size=64, sym=False, clip_search=True)
        free, _, _ = hlq_quantize(w, grid)
        aware, enc, _ = hlq_quantize(w, grid, col_weight=d)
        ef, ea = out_err(free), out_err(aware)
        assert ea < {"qkv": 0.4, "down": 0.85}[group] * ef, (bits, ef, ea)
        scale, zero, g_idx = G.grouped_params(w, grid)
        rtn = G.dequantize_groups(w, scale, zero, g_idx, bits)
        wsq = lambda q: (d.float() * (q - w) ** 2).reshape(w.shape[0], -1, 64).sum(-1)  # noqa: E731
        assert bool((wsq(aware) <= wsq(rtn) * (1 + 1e-5) + 1e-12).all())
    with pytest.raises(Exception, match="column weights"):
        hlq_quantize(w, grid, col_weight=-d)
    # GPTQ's rounding onto the data-aware levels lowers the output error further, every weight on a level
    from weightsmith.quant.gptq import gptq_quantize
    from weightsmith.quant.hlq import gptq_onto_levels

    for bits in (3, 2):
        grid = GridConfig(bits=bits, group_size=64, sym=False, clip_search=True)
        aware, enc, _ = hlq_quantize(w, grid, col_weight=d)
        solved, info = gptq_onto_levels(w, H, enc, 64, 0.01)
        uniform = gptq_quantize(w, H, grid).weight
        assert out_err(solved) < 0.9 * out_err(aware) and out_err(solved) < out_err(uniform)
        lv = enc.levels()
        gi = torch.arange(w.shape[1]) // 64
        assert float((solved[:, :, None] - lv[:, gi, :]).abs().min(-1).values.max()) == 0.0


def test_data_aware_recipe_needs_norms(tmp_path):
    from weightsmith.config import build_config

    assert build_config({"method": "hlq:data_aware=true", "grid": {"bits": 3}}).needs() == {"input_norms"}
    assert build_config({"method": "hlq", "grid": {"bits": 3}}).needs() == set()
    src = save_pico(tmp_path / "pico", "llama")
    from conftest import calib_ids

    grid = {"bits": 3, "group_size": 32, "sym": False}
    rep = weightsmith.quantize(src, {"method": "hlq:data_aware=true", "grid": grid}, calib_ids(8, 32), out=tmp_path / "q", progress=False)
    rows = [r for r in rep["layers"] if not r.get("skipped")]
    assert rows and all(r["weight_error"] <= r["rtn_weight_error"] * 1.5 for r in rows)  # norms only: no H, no output errors
    assert build_config({"method": "hlq:solver=gptq", "grid": {"bits": 3}}).needs() == {"H"}
    rep2 = weightsmith.quantize(src, {"method": "hlq:solver=gptq", "grid": grid}, calib_ids(8, 32), out=tmp_path / "g", progress=False)
    rep3 = weightsmith.quantize(src, {"method": "gptq", "grid": grid}, calib_ids(8, 32), out=tmp_path / "u", progress=False)
    e2, eu = (sum(r["error"] for r in rp["layers"] if not r.get("skipped")) for rp in (rep2, rep3))
    # GPTQ's rounding onto the HLQ levels, against GPTQ on the uniform grid of the same bits and groups (measured 0.105 vs 0.113)
    assert e2 < 0.97 * eu, (e2, eu)
    from weightsmith.export.common import QuantizedCheckpoint

    with QuantizedCheckpoint(tmp_path / "g") as ck:  # read back: the dense weight is its codes' levels
        name = "model.layers.0.mlp.down_proj"
        assert [e["kind"] for e in ck.encodings(name)] == ["planes"]
