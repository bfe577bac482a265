"""Packed export on pico models: each format loaded back by its own reader and compared with our
dequantized model; layouts checked bit for bit against the formats' definitions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calib_ids, save_pico
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.export import export

W4_SYM = {"bits": 4, "group_size": 32, "sym": True}
W4_ASYM = {"bits": 4, "group_size": 32, "sym": False}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def pico_src(work):
    return save_pico(work / "pico", "llama")


def _quantized(work: Path, src: Path, name: str, grid: dict, method: dict | None = None) -> Path:
    out = work / name
    if not out.exists():
        weightsmith.quantize(src, {"method": method or {"name": "rtn"}, "grid": grid}, calibration=calib_ids(), out=out, progress=False)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


IDS = calib_ids(2, 24, seed=7)


# ---- compressed-tensors ---------------------------------------------------------------------------------------------

def test_compressed_tensors_sym_loads_through_transformers_with_identical_logits(work, pico_src):
    q = _quantized(work, pico_src, "w4sym", W4_SYM)
    out = export(q, work / "w4sym-ct", "compressed-tensors")
    cfg = json.loads((work / "w4sym-ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert cfg["ignore"] == ["lm_head"] and out["layers"] == 14
    t = _all_tensors(work / "w4sym-ct")
    name = "model.layers.0.mlp.down_proj"
    assert t[f"{name}.weight_packed"].dtype == torch.int32 and t[f"{name}.weight_packed"].shape == (64, 128 * 4 // 32)
    assert f"{name}.weight_zero_point" not in t and t[f"{name}.weight_shape"].tolist() == [64, 128]
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(work / "w4sym-ct", dtype=torch.float32).eval()  # compressed-tensors decompresses
    assert _rel(_logits(got, IDS), _logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_our_dense_packing_is_bit_identical_to_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from weightsmith.export.compressed_tensors import pack_rows_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (24, 75), generator=g)  # 75 columns: a partial last word
    ours = pack_rows_int32(codes, bits)
    theirs = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape).to(torch.int64) + 2 ** (bits - 1), codes)


def test_compressed_tensors_asym_zero_points_decompress_exactly(work, pico_src):
    """Asymmetric: the packed zero point is what compressed-tensors' own decompressor reads. (Loading an
    asymmetric pack-quantized dir through transformers fails in compressed-tensors 0.20 — it sizes the
    zero point unpacked on load — so `weightsmith eval` reads these with our own unpacker.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    q = _quantized(work, pico_src, "w4asym", W4_ASYM)
    export(q, work / "w4asym-ct", "compressed-tensors")
    qc = json.loads((work / "w4asym-ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=qc["config_groups"]["group_0"]["weights"])
    t = _all_tensors(work / "w4asym-ct")
    deq = _all_tensors(q)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        sd = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(name + ".")}
        assert sd["weight_zero_point"].shape == ((sd["weight_shape"][0] * 4 + 31) // 32, sd["weight_scale"].shape[1])
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(w, deq[f"{name}.weight"])
    from weightsmith.eval.loading import load_for_eval

    got, _, _ = load_for_eval(work / "w4asym-ct", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    assert _rel(_logits(got, IDS), _logits(ref, IDS)) <= 1e-6


def test_compressed_tensors_group_size_not_dividing_falls_back_to_gcd_exactly(work, pico_src):
    q = _quantized(work, pico_src, "w4g48", {"bits": 4, "group_size": 48, "sym": True})  # widths 64, 128: last group shorter
    info = export(q, work / "w4g48-ct", "compressed-tensors")
    assert info["group_size_written"] == 16
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(work / "w4g48-ct", dtype=torch.float32).eval()
    assert _rel(_logits(got, IDS), _logits(ref, IDS)) <= 1e-4


def test_compressed_tensors_refuses_permuted_groups_gptq_keeps_them(work, pico_src):
    q = _quantized(work, pico_src, "w4-dyn", W4_SYM, {"name": "gptq", "act_order": True, "static_groups": False})
    with pytest.raises(WeightsmithError, match="permuted g_idx"):
        export(q, work / "w4-dyn-ct", "compressed-tensors")
    assert not (work / "w4-dyn-ct").exists() and not list(work.glob(".w4-dyn-ct*"))
    info = export(q, work / "w4-dyn-gptq", "gptq")
    assert info["desc_act"] is True
    g = _all_tensors(work / "w4-dyn-gptq")["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g.long(), torch.arange(128) // 32)  # act-order order kept
    _check_gptq_against_dequantized(work / "w4-dyn-gptq", q)


# ---- GPTQ format ----------------------------------------------------------------------------------------------------

def _read_gptq_independently(d: Path) -> dict[str, torch.Tensor]:
    """Unpack a GPTQ-format dir from the format's definition (AutoGPTQ's QuantLinear, v1 / v2):
    qweight (in/8, out): row i holds input columns 8i..8i+7, column j of a word at bits 4j;
    qzeros (groups, out/8) the same along out; v1 stores zero - 1; w = scale * (q - zero)."""
    cfg = json.loads((d / "quantize_config.json").read_text())
    bits = cfg["bits"]
    per = 32 // bits
    mask = (1 << bits) - 1
    t = _all_tensors(d)
    out = {}
    for k in [k for k in t if k.endswith(".qweight")]:
        base = k[: -len(".qweight")]
        qw = t[k].numpy().view(np.uint32)
        qz = t[f"{base}.qzeros"].numpy().view(np.uint32)
        q = np.zeros((qw.shape[0] * per, qw.shape[1]), dtype=np.int64)
        for j in range(per):
            q[j::per] = (qw >> (bits * j)) & mask
        z = np.zeros((qz.shape[0], qz.shape[1] * per), dtype=np.int64)
        for j in range(per):
            z[:, j::per] = (qz >> (bits * j)) & mask
        if cfg["checkpoint_format"] == "gptq":
            z = z + 1
        s = t[f"{base}.scales"].float().numpy()
        g = t[f"{base}.g_idx"].long().numpy()
        w = (q - z[g, :]) * s[g, :]  # (in, out)
        out[f"{base}.weight"] = torch.from_numpy(w.T.astype(np.float32))
    return out


def _check_gptq_against_dequantized(d: Path, q: Path) -> None:
    """Same codes and zeros, scales rounded to fp16: exactly our weights with fp16 scales."""
    from weightsmith.export.common import QuantizedCheckpoint

    ours = _read_gptq_independently(d)
    with QuantizedCheckpoint(q) as ck:
        assert set(ours) == {f"{n}.weight" for n in ck.layers}
        for n in ck.layers:
            layer = ck.layer(n)
            layer.scale = layer.scale.half().float()
            assert torch.equal(ours[f"{n}.weight"], layer.dequantize()), n


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gptq_format_zero_point_convention(work, pico_src, version):
    q = _quantized(work, pico_src, "w4sym", W4_SYM)
    d = work / f"w4sym-gptq-{version}"
    export(q, d, "gptq", gptq_version=version)
    cfg = json.loads((d / "quantize_config.json").read_text())
    assert cfg["checkpoint_format"] == ("gptq" if version == "v1" else "gptq_v2") and cfg["bits"] == 4 and cfg["group_size"] == 32
    assert json.loads((d / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    t = _all_tensors(d)
    qz = t["model.layers.0.self_attn.q_proj.qzeros"]
    # symmetric 4-bit: zero point 8 in every nibble; v1 ("zeros minus one") stores 7 → 0x77777777, v2 stores 8 → 0x88888888
    expected = 0x77777777 if version == "v1" else 0x88888888 - 2**32
    assert qz.dtype == torch.int32 and bool((qz == expected).all())
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64 // 8, 64) and t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    _check_gptq_against_dequantized(d, q)
    from weightsmith.eval.loading import load_for_eval

    got, _, _ = load_for_eval(d, progress=False)  # no GPTQModel here: weightsmith's own unpacker
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    assert _rel(_logits(got, IDS), _logits(ref, IDS)) <= 2e-3  # fp16 scales


def test_gptq_v1_refuses_a_zero_point_of_zero(work, tmp_path):
    src = save_pico(tmp_path / "pos", "llama")
    shard = sorted(src.glob("*.safetensors"))[0]
    t = load_file(shard)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].abs()  # min 0 → asymmetric zero point 0
    save_file(t, shard, metadata={"format": "pt"})
    q = _quantized(tmp_path, src, "asym", W4_ASYM)
    assert int(load_file(sorted((q / "qparams").glob("*.safetensors"))[0])["model.layers.0.mlp.up_proj.zero"].min()) == 0
    with pytest.raises(WeightsmithError, match="v1"):
        export(q, tmp_path / "asym-v1", "gptq")
    assert not (tmp_path / "asym-v1").exists()
    export(q, tmp_path / "asym-v2", "gptq", gptq_version="v2")
    _check_gptq_against_dequantized(tmp_path / "asym-v2", q)


# ---- GGUF -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,grid,gtype", [("w4sym", W4_SYM, "Q4_0"), ("w4asym", W4_ASYM, "Q4_1"),
                                             ("w8row", {"bits": 8, "group_size": -1, "sym": True}, "Q8_0")])
def test_gguf_loads_through_transformers(work, pico_src, name, grid, gtype):
    import gguf

    q = _quantized(work, pico_src, name, grid)
    f = work / f"{name}.gguf"
    info = export(q, f, "gguf", gguf_unverified_tokenizer=True)
    assert info["gguf_type"] == gtype
    r = gguf.GGUFReader(str(f))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == gtype and types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"
    assert r.fields["general.architecture"].contents() == "llama" and r.fields["llama.block_count"].contents() == 2
    # the blocks decode (gguf's own numpy dequantizer) to our codes with fp16 scales, q/k rows in llama.cpp's order
    from weightsmith.export.common import QuantizedCheckpoint
    from weightsmith.export.gguf_format import qk_permutation

    with QuantizedCheckpoint(q) as ck:
        for hf, gname, perm_heads in (("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", None),
                                      ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2)):
            t = next(t for t in r.tensors if t.name == gname)
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))).astype(np.float32))
            layer = ck.layer(hf)
            gi = layer.g_idx.long()
            s16 = layer.scale.half().float()[:, gi]
            if gtype == "Q4_1":
                m16 = (-layer.scale * layer.zero.float()).half().float()[:, gi]
                want = s16 * layer.q.float() + m16
            else:
                want = s16 * (layer.q.float() - layer.zero.float()[:, gi])
            if perm_heads:
                want = want[qk_permutation(want.shape[0], perm_heads)]
            assert torch.allclose(got, want, rtol=0, atol=1e-6), gname
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(work, gguf_file=f.name, dtype=torch.float32).eval()
    assert _rel(_logits(got, IDS), _logits(ref, IDS)) <= 5e-3  # fp16 scales and fp16 embeddings


def test_gguf_input_is_parsed_once_and_loads_as_transformers_does(work, pico_src, monkeypatch):
    """Inside gguf_to_hf's context transformers parses a GGUF file once (its config and its weights
    would each parse it) and loads exactly the weights it loads without; gguf-py's names are restored."""
    import gguf
    import gguf.gguf_reader as reader_mod

    from weightsmith.model.source import _gguf_parsed_once

    q = _quantized(work, pico_src, "w4sym-once", W4_SYM)
    f = work / "w4sym-once.gguf"
    export(q, f, "gguf", gguf_unverified_tokenizer=True)
    parses = []
    init = reader_mod.GGUFReader.__init__
    monkeypatch.setattr(reader_mod.GGUFReader, "__init__", lambda self, *a, **k: (parses.append(a[0]), init(self, *a, **k))[1])
    names = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with _gguf_parsed_once():
        got = AutoModelForCausalLM.from_pretrained(work, gguf_file=f.name, dtype=torch.float32).state_dict()
    assert len(parses) == 1
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == names
    want = AutoModelForCausalLM.from_pretrained(work, gguf_file=f.name, dtype=torch.float32).state_dict()
    assert len(parses) > 2  # transformers alone parses it again for the config and for the weights
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_gguf_refusals(work, pico_src):
    q = _quantized(work, pico_src, "w4sym", W4_SYM)
    with pytest.raises(WeightsmithError, match="Q4_K"):
        export(q, work / "k.gguf", "gguf", gguf_unverified_tokenizer=True, gguf_type="Q4_K")
    with pytest.raises(WeightsmithError, match="Q8_0 holds 8-bit"):
        export(q, work / "k.gguf", "gguf", gguf_unverified_tokenizer=True, gguf_type="Q8_0")
    g48 = _quantized(work, pico_src, "w4g48", {"bits": 4, "group_size": 48, "sym": True})
    with pytest.raises(WeightsmithError, match="block of 32 columns"):
        export(g48, work / "g48.gguf", "gguf", gguf_unverified_tokenizer=True)
    with pytest.raises(WeightsmithError, match="must end in .gguf"):
        export(q, work / "notgguf", "gguf", gguf_unverified_tokenizer=True)
    assert not list(work.glob("*k.gguf*")) and not list(work.glob(".g48.gguf*")) and not (work / "g48.gguf").exists()


# ---- bad input, atomicity, CLI --------------------------------------------------------------------------------------

def test_unquantized_checkpoint_is_refused(work, pico_src, capsys):
    assert main(["export", str(pico_src), str(work / "nope"), "--format", "gptq", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a weightsmith-quantized checkpoint" in err and err.count("\n") == 1
    assert not (work / "nope").exists()


def test_extra_qparams_are_refused(work, pico_src, tmp_path):
    import shutil

    q = shutil.copytree(_quantized(work, pico_src, "w4sym", W4_SYM), tmp_path / "lorc")
    f = sorted((q / "qparams").glob("*.safetensors"))[0]
    t = load_file(f)
    t["model.layers.0.mlp.up_proj.lorc_a"] = torch.zeros(4, 4)
    save_file(t, f)
    with pytest.raises(WeightsmithError, match="lorc_a"):
        export(q, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_corrupt_or_modified_checkpoint_is_refused_and_nothing_written(work, pico_src, tmp_path):
    import shutil

    q = shutil.copytree(_quantized(work, pico_src, "w4sym", W4_SYM), tmp_path / "mod")
    shard = sorted(q.glob("model-00001-*.safetensors"))[0]
    t = load_file(shard)
    k = "model.layers.0.mlp.up_proj.weight"
    t[k] = t[k] + 0.3 * t[k].abs().max()  # off the grid
    save_file(t, shard, metadata={"format": "pt"})
    for fmt, out in (("gptq", tmp_path / "o1"), ("gguf", tmp_path / "o2.gguf")):
        with pytest.raises(WeightsmithError, match="not on the grid"):
            export(q, out, fmt, gguf_unverified_tokenizer=True)
        assert not out.exists()
    qf = sorted((q / "qparams").glob("*.safetensors"))[0]
    qf.write_bytes(qf.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsmithError, match="corrupt"):
        export(q, tmp_path / "o3", "compressed-tensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mod"]


def test_quantize_with_format_in_one_go(work, pico_src, tmp_path, capsys):
    out = tmp_path / "packed"
    rc = main(["quantize", str(pico_src), str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--calib", str(_calib_file(tmp_path)), "--nsamples", "8", "--seqlen", "32", "--format", "gptq", "-q"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["export"]["format"] == "gptq" and (out / "quantize_config.json").is_file() and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "packed"]  # the intermediate is gone
    rc = main(["quantize", str(pico_src), str(tmp_path / "x.gguf"), "--bits", "3", "--method", "rtn",
               "--calib", str(_calib_file(tmp_path)), "--nsamples", "4", "--seqlen", "16", "--format", "gguf", "-q"])
    assert rc == 2 and "no GGUF type holds a 3-bit" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "packed"]


def _calib_file(tmp_path: Path) -> Path:
    from conftest import make_text

    p = tmp_path / "calib.txt"
    if not p.exists():
        p.write_text(make_text(3000, seed=3), encoding="utf-8")
    return p
