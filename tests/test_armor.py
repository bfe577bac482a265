"""ARMOR (weightsmith/prune/armor.py): the product A·S·B with an exact 2:4 core and block-diagonal
factors, its layer error below SparseGPT's (its start) and falling with the rounds, the closed-form
factor steps, the Factored encoding (bits, qparams round trip), the recipe rules and the refusals of
the exporters."""
from __future__ import annotations

import pytest
import torch
from conftest import calib_ids
from test_quant_math import correlated_layer

import weightsmith
from weightsmith.config import build_config
from weightsmith.encodings import Factored, band_of, dense_of_band, layer_bits
from weightsmith.errors import WeightsmithError
from weightsmith.export.common import QuantizedCheckpoint
from weightsmith.prune.armor import armor
from weightsmith.prune.common import mask_from_scores
from weightsmith.prune.sparsegpt import sparsegpt
from weightsmith.quant.pipeline import output_error

L0 = "model.layers.0."


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(192, n=4096)


def test_product_core_and_factors(layer):
    w, H = layer
    dense, (a, b, core), info = armor(w, H, block_size=32, iters=3)
    assert a.shape == (192, 32) and b.shape == (256, 32)
    A, B = dense_of_band(a), dense_of_band(b)
    assert torch.allclose(A @ core @ B, dense, atol=1e-5)
    assert torch.all((core != 0).reshape(192, -1, 4).sum(-1) <= 2)  # the core is 2:4
    assert float((dense == 0).float().mean()) < 0.01  # the product is dense
    off = torch.ones(192, 192, dtype=torch.bool)
    for s in range(0, 192, 32):
        off[s : s + 32, s : s + 32] = False
    assert torch.all(A[off] == 0)  # block-diagonal
    assert info["core_density"] == pytest.approx(0.5)
    # a ragged last block (40 does not divide 192 or 256)
    dense40, (a40, b40, c40), _ = armor(w, H, block_size=40, iters=1)
    assert torch.allclose(dense_of_band(a40) @ c40 @ dense_of_band(b40), dense40, atol=1e-5)


def test_error_below_sparsegpt_and_falls_with_rounds(layer):
    w, H = layer
    sg = output_error(sparsegpt(w, H, pattern="2:4").weight - w, H)
    wm = mask_from_scores(w.abs() * H.diag().sqrt(), 0.5, "2:4", per_row=True)
    wa = output_error(w * wm - w, H)
    errs = [output_error(armor(w, H, block_size=32, iters=k)[0] - w, H) for k in (0, 1, 4)]
    # iters=0 is SparseGPT's 2:4 result (the start); measured 192x256 blocks 32: 14.4 (sparsegpt) -> 5.33 -> 3.25
    # (without the remask 5.75 -> 3.43), wanda 40.0
    assert errs[0] == pytest.approx(sg, rel=1e-3)
    assert errs[2] < errs[1] < errs[0] and errs[2] < 0.5 * sg and errs[2] < 0.15 * wa, (errs, sg, wa)


@pytest.mark.slow
def test_real_smollm2_layers(smollm2_layers):
    """Block 1 of SmolLM2-135M with its real inputs, 2:4: ARMOR's relative layer error against
    SparseGPT's (its start) and Wanda's. Measured (blocks 64, 4 rounds): q_proj 0.00226 (no remask
    0.00263) / SparseGPT 0.00767; down_proj 0.00765 (0.00797) / 0.0213 (2 rounds here)."""
    for g, (w, H) in smollm2_layers.items():
        w = w[:576]  # q_proj of the q/k/v group; down_proj whole
        base = output_error(w, H)
        sg = output_error(sparsegpt(w, H, pattern="2:4").weight - w, H) / base
        wm = mask_from_scores(w.abs() * H.diag().sqrt(), 0.5, "2:4", per_row=True)
        wa = output_error(w * wm - w, H) / base
        dense, (a, b, core), info = armor(w, H, iters=2, remask=g == "qkv")  # down_proj: the fast variant
        e = output_error(dense - w, H) / base
        assert e < 0.7 * sg and e < 0.3 * wa, (g, e, sg, wa)
        assert torch.all((core != 0).reshape(core.shape[0], -1, 4).sum(-1) <= 2)
        if g == "qkv":  # the core's mask re-solve (iCBS on the core's problem) is accepted and helps
            e0 = output_error(armor(w, H, iters=2, remask=False)[0] - w, H) / base
            assert info["armor_remasks"] >= 1 and e < 0.95 * e0, (e, e0)


def test_encoding_bits_and_split():
    a, b = torch.randn(8, 4), torch.randn(16, 4)
    core = torch.randn(8, 16) * (torch.arange(16) % 4 < 2)
    e = Factored([(a, b, core)], 4, "2:4")
    bits = layer_bits((8, 16), [e])
    # kept values 16·64, mask 3 bits per 4 (32 groups), blocks 16·(2·16 + 4·16) = 1536
    assert bits["bits"] == {"weights": 1024, "mask": 96, "factors": 1536}
    assert bits["bits_per_weight"] == pytest.approx((1024 + 96 + 1536) / 128)
    assert torch.allclose(e.dense(), dense_of_band(a) @ core @ dense_of_band(b))
    assert torch.equal(dense_of_band(band_of([torch.eye(4)] * 2, 8, 4)), torch.eye(8))
    with pytest.raises(ValueError):
        e.split([4, 4])


def test_recipe_rules():
    assert build_config({"method": "armor"}).steps[0].pattern == "2:4"
    with pytest.raises(WeightsmithError, match="unstructured"):
        build_config({"method": "armor:pattern=unstructured"})
    for bad in ("armor,gptq", "armor,rtn", "armor,magnitude"):
        with pytest.raises(WeightsmithError, match="A·S·B"):
            build_config({"method": bad})
    assert build_config({"method": "armor:pattern=4:8:block_size=16"}).needs() == {"H"}
    with pytest.raises(WeightsmithError, match="would not keep"):
        build_config({"method": "wanda,armor"})


def test_pico_end_to_end_encodings_and_export_refusal(pico, tmp_path):
    from transformers import AutoModelForCausalLM

    from weightsmith.export import export

    src = pico("llama")
    rep = weightsmith.quantize(src, {"method": "armor:block_size=16:iters=2"}, calib_ids(8, 32), out=tmp_path / "a", progress=False)
    rows = {r["name"]: r for r in rep["layers"]}
    row = rows[L0 + "mlp.up_proj"]
    assert row["core_density"] == pytest.approx(0.5) and row["measured_density"] > 0.99  # the written weight is the product
    # bits: 16·half the weights + 3/4 bit + 16·(128·16 + 64·16)/(128·64) = 8 + 0.75 + 6
    assert row["bits_per_weight"] == pytest.approx(8 + 0.75 + 16 * (128 * 16 + 64 * 16) / (128 * 64))
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    with QuantizedCheckpoint(tmp_path / "a") as ck:
        enc = ck.encodings(L0 + "mlp.up_proj")
        assert [e["kind"] for e in enc] == ["factored"] and enc[0]["pattern"] == "2:4" and enc[0]["block_size"] == 16
    from safetensors import safe_open

    qf = sorted((tmp_path / "a" / "qparams").glob("block-*.safetensors"))[0]
    with safe_open(qf, "pt") as f:
        a, b, core = (f.get_tensor(L0 + f"mlp.up_proj.armor_{k}") for k in ("a", "b", "core"))
    assert torch.allclose(dense_of_band(a) @ core @ dense_of_band(b), sd[L0 + "mlp.up_proj.weight"].float(), atol=1e-4)
    assert torch.all((core != 0).reshape(core.shape[0], -1, 4).sum(-1) <= 2)
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(WeightsmithError, match="factored"):
            export(tmp_path / "a", tmp_path / (f"x-{fmt}" + (".gguf" if fmt == "gguf" else "")), fmt)
