"""Checkpoints whose layers differ — each its own grid, some pruned or left in float — through the
read side: ``QuantizedCheckpoint`` encodings, all three exporters (loaded back and compared with the
dequantized dir), their refusals, the readers and ``inspect``.

The fixtures follow the on-disk contract of the encodings (``export/common.py``): a W4 g32 pico
model quantized by the CLI, then chosen layers re-quantized with other grids (``rtn_quantize``),
pruned, or given low-rank factors; their shard weights and qparams rewritten, and each rewritten
qparams file declaring its layers' encodings in the ``weightsmith.encodings`` metadata (files left
alone stay legacy: no metadata, the report's grid).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calib_ids, make_text, save_pico
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from weightsmith.cli import main
from weightsmith.config import GridConfig
from weightsmith.errors import WeightsmithError
from weightsmith.export import export
from weightsmith.export.common import ENCODINGS_KEY, QuantizedCheckpoint
from weightsmith.export.readers import open_checkpoint
from weightsmith.inspect import inspect
from weightsmith.quant.rtn import rtn_quantize

IDS = calib_ids(2, 24, seed=7)
L0, L1 = "model.layers.0.", "model.layers.1."


# ---- fixture builder ------------------------------------------------------------------------------------------------

def _grid(bits: int, group_size: int, sym: bool = True) -> dict:
    return {"kind": "grid", "bits": bits, "group_size": group_size, "sym": sym}


def _prune(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """Magnitude mask, 1 = kept: half of each row (unstructured) or 2 of every 4 columns (2:4)."""
    if pattern == "2:4":
        g = w.abs().reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(2, dim=2).indices, True)
        return keep.reshape(w.shape)
    thr = w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
    return w.abs() > thr


def remix(base: Path, src: Path, out: Path, rules: dict[str, list[dict]]) -> Path:
    """Copy the weightsmith dir ``base`` to ``out`` and give each layer in ``rules`` the encodings
    listed there, computed from the float weights of ``src``: a grid re-quantizes it (RTN), a
    sparsity encoding prunes it first (magnitude; stored as the packed mask), a low-rank one adds
    ``A·B`` (random, rank ``r``) on top."""
    shutil.copytree(base, out)
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    floats = {}
    for f in src.glob("*.safetensors"):
        floats.update(load_file(f))
    legacy = _grid(**{k: v for k, v in json.loads((out / "report.json").read_text())["config"]["grid"].items()
                      if k in ("bits", "group_size", "sym")})
    by_block: dict[Path, list[str]] = {}
    for name in rules:
        by_block.setdefault(out / "qparams" / f"block-{int(name.split('.')[2]):05d}.safetensors", []).append(name)
    for qf, names in by_block.items():
        qp = load_file(qf)
        encs = {k.rsplit(".", 1)[0]: [dict(legacy)] for k in qp if k.endswith(".scale")}
        for name in names:
            shard = out / wmap[f"{name}.weight"]
            t = load_file(shard)
            w = floats[f"{name}.weight"].float()
            for s in ("scale", "zero", "g_idx", "lorc_a", "lorc_b"):
                qp.pop(f"{name}.{s}", None)
            for e in rules[name]:
                if e["kind"] == "sparsity":
                    m = _prune(w, e["pattern"])
                    w = w * m
                    qp[f"{name}.mask"] = torch.from_numpy(np.packbits(m.numpy().astype(np.uint8), axis=1, bitorder="little"))
            for e in rules[name]:
                if e["kind"] == "grid":
                    r = rtn_quantize(w, GridConfig(bits=e["bits"], group_size=e["group_size"], sym=e["sym"]))
                    w = r.weight
                    qp[f"{name}.scale"] = r.scale.float().contiguous()
                    qp[f"{name}.zero"] = r.zero.to(torch.int32).contiguous()
                    qp[f"{name}.g_idx"] = r.g_idx.to(torch.int32).contiguous()
            for e in rules[name]:
                if e["kind"] == "lowrank":
                    g = torch.Generator().manual_seed(1)
                    a, b = 0.01 * torch.randn(w.shape[0], e["rank"], generator=g), torch.randn(e["rank"], w.shape[1], generator=g)
                    w = w + a @ b
                    qp[f"{name}.lowrank_a"], qp[f"{name}.lowrank_b"] = a, b
            t[f"{name}.weight"] = w.to(t[f"{name}.weight"].dtype).contiguous()
            save_file(t, shard, metadata={"format": "pt"})
            encs[name] = rules[name]
        save_file(qp, qf, metadata={ENCODINGS_KEY: json.dumps(encs)})
    return out


# ---- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mixed")


@pytest.fixture(scope="module")
def pico_src(work):
    return save_pico(work / "pico", "llama")


def _cli_quantize(src: Path, out: Path, work: Path, *extra: str) -> Path:
    if not out.exists():
        calib = work / "calib.txt"
        if not calib.exists():
            calib.write_text(make_text(3000, seed=3), encoding="utf-8")
        assert main(["quantize", str(src), str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",
                     "--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "-q", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def w4(work, pico_src):
    return _cli_quantize(pico_src, work / "w4", work)


@pytest.fixture(scope="module")
def w4asym(work, pico_src):
    return _cli_quantize(pico_src, work / "w4asym", work, "--asym")


# symmetric mixed grids: what compressed-tensors loads through transformers (asymmetric zero points it cannot, see test_export.py)
SYM_RULES = {
    L0 + "mlp.down_proj": [_grid(8, 64)],
    L1 + "self_attn.q_proj": [_grid(8, -1)],
    L1 + "self_attn.k_proj": [_grid(8, -1)],
    L1 + "self_attn.v_proj": [_grid(8, -1)],
    L1 + "mlp.gate_proj": [_grid(4, 64)],
    L1 + "mlp.up_proj": [_grid(4, 64)],
    L0 + "self_attn.o_proj": [{"kind": "sparsity", "pattern": "unstructured", "density": 0.5}],  # pruned, float
    L1 + "mlp.down_proj": [_grid(4, 32), {"kind": "sparsity", "pattern": "2:4", "density": 0.5}],  # pruned + quantized
}
ASYM_RULES = {  # base W4 g32 asym (Q4_1 in GGUF) + symmetric W4 (Q4_0) and W8 (Q8_0) layers
    L0 + "mlp.up_proj": [_grid(4, 64)],
    L1 + "mlp.down_proj": [_grid(8, 32)],
    L1 + "self_attn.o_proj": [_grid(4, 32, sym=False), {"kind": "sparsity", "pattern": "unstructured", "density": 0.5}],
}


@pytest.fixture(scope="module")
def mixed(work, pico_src, w4):
    return remix(w4, pico_src, work / "mixed", SYM_RULES)


@pytest.fixture(scope="module")
def mixed_asym(work, pico_src, w4asym):
    return remix(w4asym, pico_src, work / "mixed-asym", ASYM_RULES)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ref(q: Path):
    return AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- reading the encodings --------------------------------------------------------------------------------------------

def test_checkpoint_reads_per_layer_encodings_and_legacy_files(mixed):
    with QuantizedCheckpoint(mixed) as ck:
        assert ck.encodings(L0 + "mlp.down_proj") == [_grid(8, 64)]
        assert ck.encodings(L1 + "mlp.down_proj") == SYM_RULES[L1 + "mlp.down_proj"]
        assert ck.encodings(L0 + "self_attn.q_proj") == [_grid(4, 32)]  # block 0's file has metadata, q_proj kept the report's grid
        assert L0 + "self_attn.o_proj" in ck.encoded and L0 + "self_attn.o_proj" not in ck.layers  # pruned only: no codes
        assert len(ck.layers) == 13 and len(ck.encoded) == 14
        assert ck.grid(L1 + "self_attn.k_proj").group_size == -1 and ck.uniform is None
        assert ck.distinct_grids()[0].as_dict() == {"bits": 4, "group_size": 32, "sym": True}
        with pytest.raises(WeightsmithError, match="different grids"):
            ck.bits
        lay = ck.layer(L0 + "mlp.down_proj")
        assert (lay.bits, lay.group_size, lay.sym) == (8, 64, True) and lay.natural_groups()
        assert torch.equal(lay.dequantize(), ck.source.get(L0 + "mlp.down_proj.weight").float())
        sp = ck.layer(L1 + "mlp.down_proj")
        m = ck.mask(L1 + "mlp.down_proj")
        assert m.shape == sp.shape and int(m.sum()) == m.numel() // 2 and bool((sp.dequantize()[~m] == 0).all())
        with pytest.raises(WeightsmithError, match="no grid encoding"):
            ck.layer(L0 + "self_attn.o_proj")


def test_a_file_declaring_too_little_is_refused(mixed, tmp_path):
    q = shutil.copytree(mixed, tmp_path / "bad")
    f = q / "qparams" / "block-00000.safetensors"
    with safe_open(str(f), "pt") as fh:
        meta = json.loads(fh.metadata()[ENCODINGS_KEY])
    t = load_file(f)
    del meta[L0 + "mlp.up_proj"]  # its scale/zero/g_idx now belong to nothing
    save_file(t, f, metadata={ENCODINGS_KEY: json.dumps(meta)})
    with pytest.raises(WeightsmithError, match="belongs to no encoding"):
        QuantizedCheckpoint(q)
    meta[L0 + "mlp.up_proj"] = [_grid(4, 32)]
    t.pop(L0 + "self_attn.o_proj.mask")
    save_file(t, f, metadata={ENCODINGS_KEY: json.dumps(meta)})
    with pytest.raises(WeightsmithError, match=r"self_attn.o_proj: its sparsity encoding has no mask"):
        QuantizedCheckpoint(q)


def test_uniform_metadata_exports_byte_identical_to_legacy(work, pico_src, w4, tmp_path):
    """The same W4 grid declared in metadata: every format's output is the legacy one, byte for byte."""
    q = remix(w4, pico_src, tmp_path / "declared" / w4.name, {L0 + "mlp.up_proj": [_grid(4, 32)], L1 + "mlp.up_proj": [_grid(4, 32)]})
    with QuantizedCheckpoint(q) as ck:
        assert ck.bits == 4 and ck.group_size == 32 and ck.sym is True
    for fmt, name in (("compressed-tensors", "ct"), ("gptq", "gptq"), ("gguf", "m.gguf")):
        a, b = (export(w4, tmp_path / f"legacy-{name}", fmt, gguf_unverified_tokenizer=True),
                export(q, tmp_path / f"declared-{name}", fmt, gguf_unverified_tokenizer=True))
        for k in ("output", "seconds"):
            a.pop(k), b.pop(k)
        assert a == b, fmt
        pa, pb = tmp_path / f"legacy-{name}", tmp_path / f"declared-{name}"
        files = [pa] if pa.is_file() else sorted(f.relative_to(pa) for f in pa.rglob("*") if f.is_file() and f.name != "report.json")
        for f in files:
            fa, fb = (pa, pb) if pa.is_file() else (pa / f, pb / f)
            assert fa.read_bytes() == fb.read_bytes(), (fmt, str(f))


# ---- compressed-tensors -----------------------------------------------------------------------------------------------

def test_compressed_tensors_mixed_grids_load_through_transformers(work, mixed):
    d = work / "mixed-ct"
    info = export(mixed, d, "compressed-tensors")
    assert info["grid"] is None and info["config_groups"] == 4 and info["layers"] == 13
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["strategy"]): g["targets"] for g in qc["config_groups"].values()}
    assert groups[(8, 64, "group")] == [L0 + "mlp.down_proj"]
    assert groups[(8, None, "channel")] == [L1 + f"self_attn.{p}_proj" for p in "kqv"]
    assert groups[(4, 64, "group")] == [L1 + "mlp.gate_proj", L1 + "mlp.up_proj"]
    assert len(groups[(4, 32, "group")]) == 7 and L1 + "mlp.down_proj" in groups[(4, 32, "group")]
    assert qc["ignore"] == [L0 + "self_attn.o_proj", "lm_head"]  # the pruned float layer and the head
    t = _all_tensors(d)
    assert t[L0 + "self_attn.o_proj.weight"].dtype == torch.float32 and L0 + "self_attn.o_proj.weight_packed" not in t
    assert t[L0 + "mlp.down_proj.weight_packed"].shape == (64, 128 * 8 // 32) and t[L0 + "mlp.down_proj.weight_scale"].shape == (64, 2)
    got = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # compressed-tensors matches the exact names
    for n, m in got.named_modules():  # every layer got its own scheme (not a default one)
        if n == L0 + "mlp.down_proj":
            assert m.quantization_scheme.weights.num_bits == 8 and m.quantization_scheme.weights.group_size == 64
        if n == L0 + "self_attn.o_proj":
            assert getattr(m, "quantization_scheme", None) is None
    assert _rel(_logits(got), _logits(_ref(mixed))) <= 1e-4
    # our own unpacker reads every group too
    with open_checkpoint(d) as v, QuantizedCheckpoint(mixed) as ck:
        for n in ck.layers:
            assert torch.equal(v.weight(f"{n}.weight"), ck.source.get(f"{n}.weight").float()), n


def test_compressed_tensors_mixed_with_a_3bit_layer(work, pico_src, w4):
    """3-bit codes straddle the int32 words (pack-quantized holds them); GPTQ and GGUF refuse the layer."""
    q = remix(w4, pico_src, work / "mixed-w3", {L0 + "mlp.gate_proj": [_grid(3, 32)], L1 + "self_attn.v_proj": [_grid(8, 32)]})
    d = work / "mixed-w3-ct"
    export(q, d, "compressed-tensors")
    got = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert _rel(_logits(got), _logits(_ref(q))) <= 1e-4
    with pytest.raises(WeightsmithError, match=r"not 3-bit \(layer model\.layers\.0\.mlp\.gate_proj; 3-bit GPTQ"):
        export(q, work / "mixed-w3-gptq", "gptq")
    with pytest.raises(WeightsmithError, match=r"no GGUF type holds a 3-bit symmetric grid exactly \(layer model\.layers\.0\.mlp\.gate_proj\)"):
        export(q, work / "mixed-w3.gguf", "gguf", gguf_unverified_tokenizer=True)
    assert not (work / "mixed-w3-gptq").exists() and not (work / "mixed-w3.gguf").exists()
    assert not list(work.glob(".mixed-w3*"))


def test_compressed_tensors_mixed_asymmetric_through_our_reader(work, mixed_asym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from weightsmith.eval.loading import load_for_eval

    d = work / "mixed-asym-ct"
    export(mixed_asym, d, "compressed-tensors")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    t = _all_tensors(d)
    deq = _all_tensors(mixed_asym)
    for g in qc["config_groups"].values():  # compressed-tensors' own decompressor, group by group
        scheme = QuantizationScheme(targets=g["targets"], weights=g["weights"])
        for name in g["targets"]:
            sd = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(name + ".")}
            assert torch.equal(PackedQuantizationCompressor.decompress(sd, scheme)["weight"], deq[f"{name}.weight"]), name
    got, _, _ = load_for_eval(d, progress=False)
    assert _rel(_logits(got), _logits(_ref(mixed_asym))) <= 1e-6


# ---- GPTQ -------------------------------------------------------------------------------------------------------------

def test_gptq_mixed_grids_dynamic_and_our_reader(work, mixed):
    from weightsmith.eval.loading import load_for_eval

    d = work / "mixed-gptq"
    export(mixed, d, "gptq")
    qc = json.loads((d / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, True)  # the most common grid
    esc = lambda n: "^" + n.replace(".", "\\.") + "$"  # noqa: E731
    assert qc["dynamic"]["+:" + esc(L0 + "mlp.down_proj")] == {"bits": 8, "group_size": 64, "sym": True}
    assert qc["dynamic"]["+:" + esc(L1 + "self_attn.k_proj")] == {"bits": 8, "group_size": -1, "sym": True}
    assert qc["dynamic"]["+:" + esc(L1 + "mlp.up_proj")] == {"bits": 4, "group_size": 64, "sym": True}
    assert qc["dynamic"]["-:" + esc(L0 + "self_attn.o_proj")] == {}
    assert len(qc["dynamic"]) == 7 and json.loads((d / "config.json").read_text())["quantization_config"] == qc
    t = _all_tensors(d)
    assert t[L0 + "mlp.down_proj.qweight"].shape == (128 // 4, 64) and t[L0 + "mlp.down_proj.scales"].shape == (2, 64)
    assert t[L1 + "self_attn.q_proj.qweight"].shape == (64 // 4, 64) and t[L1 + "self_attn.q_proj.scales"].shape == (1, 64)
    with open_checkpoint(d) as v, QuantizedCheckpoint(mixed) as ck:
        for n in ck.layers:  # exactly our codes with fp16 scales, read with each layer's own grid
            lay = ck.layer(n)
            assert v.grid_of(n) == (lay.bits, lay.group_size, lay.sym)
            lay.scale = lay.scale.half().float()
            assert torch.equal(v.weight(f"{n}.weight"), lay.dequantize()), n
    got, _, _ = load_for_eval(d, progress=False)
    assert _rel(_logits(got), _logits(_ref(mixed))) <= 2e-3  # fp16 scales


def test_gptq_mixed_asymmetric_v2(work, mixed_asym):
    from weightsmith.eval.loading import load_for_eval

    d = work / "mixed-asym-gptq"
    export(mixed_asym, d, "gptq", gptq_version="v2")
    qc = json.loads((d / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, False)
    assert qc["dynamic"] == {"+:^model\\.layers\\.0\\.mlp\\.up_proj$": {"bits": 4, "group_size": 64, "sym": True},
                             "+:^model\\.layers\\.1\\.mlp\\.down_proj$": {"bits": 8, "group_size": 32, "sym": True}}
    got, _, _ = load_for_eval(d, progress=False)
    assert _rel(_logits(got), _logits(_ref(mixed_asym))) <= 2e-3


# ---- GGUF -------------------------------------------------------------------------------------------------------------

def _gguf_types(f: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors}


def test_gguf_a_type_per_tensor_loads_through_transformers(work, mixed):
    f = work / "mixed.gguf"
    info = export(mixed, f, "gguf", gguf_unverified_tokenizer=True)
    assert info["gguf_type"] == "Q4_0" and info["gguf_types"] == {"Q4_0": 9, "Q8_0": 4}
    ty = _gguf_types(f)
    assert ty["blk.0.ffn_down.weight"] == "Q8_0" and ty["blk.1.attn_q.weight"] == "Q8_0" and ty["blk.1.ffn_up.weight"] == "Q4_0"
    assert ty["blk.0.attn_output.weight"] == "F16" and ty["blk.1.ffn_down.weight"] == "Q4_0" and ty["blk.0.attn_norm.weight"] == "F32"
    from weightsmith.export.readers import GGUFView

    with GGUFView(f) as v:
        assert v.field("general.file_type") == 2  # MOSTLY_Q4_0: the most common type
        assert "mixed: W4 g32 sym x7" in v.field("general.quantized_by")
    bs = inspect(f)["by_scheme"]
    assert bs["Q8_0 (GGUF)"]["tensors"] == 4 and bs["Q4_0 (GGUF)"]["tensors"] == 9
    assert bs["Q8_0 (GGUF)"]["bits_per_weight"] == 8.5 and bs["Q4_0 (GGUF)"]["bits_per_weight"] == 4.5
    got = AutoModelForCausalLM.from_pretrained(work, gguf_file=f.name, dtype=torch.float32).eval()
    assert _rel(_logits(got), _logits(_ref(mixed))) <= 5e-3  # fp16 scales, fp16 embeddings and float layer


def test_gguf_mixed_asymmetric_and_the_type_override(work, mixed_asym, mixed):
    f = work / "mixed-asym.gguf"
    export(mixed_asym, f, "gguf", gguf_unverified_tokenizer=True)
    ty = _gguf_types(f)
    assert ty["blk.0.ffn_gate.weight"] == "Q4_1" and ty["blk.0.ffn_up.weight"] == "Q4_0" and ty["blk.1.ffn_down.weight"] == "Q8_0"
    assert ty["blk.1.attn_output.weight"] == "Q4_1"
    got = AutoModelForCausalLM.from_pretrained(work, gguf_file=f.name, dtype=torch.float32).eval()
    assert _rel(_logits(got), _logits(_ref(mixed_asym))) <= 5e-3
    # --gguf-type overrides every layer's type and must fit them all
    with pytest.raises(WeightsmithError, match=r"GGUF Q4_1 holds 4-bit grids; layer model\.layers\.1\.mlp\.down_proj is 8-bit symmetric"):
        export(mixed_asym, work / "o1.gguf", "gguf", gguf_unverified_tokenizer=True, gguf_type="Q4_1")
    with pytest.raises(WeightsmithError, match=r"GGUF Q8_0 holds 8-bit symmetric grids; layer model\.layers\.0\.\S+ is 4-bit"):
        export(mixed, work / "o2.gguf", "gguf", gguf_unverified_tokenizer=True, gguf_type="Q8_0")
    assert not list(work.glob("*o[12].gguf*"))


def test_gguf_type_override_that_fits_every_layer(work, pico_src, w4asym):
    q = remix(w4asym, pico_src, work / "w4-sym-asym", {L0 + "mlp.up_proj": [_grid(4, 64)]})
    f = work / "w4-sym-asym.gguf"
    assert export(q, f, "gguf", gguf_unverified_tokenizer=True)["gguf_types"] == {"Q4_0": 1, "Q4_1": 13}
    f2 = work / "w4-sym-asym-q41.gguf"
    assert export(q, f2, "gguf", gguf_unverified_tokenizer=True, gguf_type="Q4_1")["gguf_type"] == "Q4_1"
    assert set(v for k, v in _gguf_types(f2).items() if k.startswith("blk.") and not k.endswith("norm.weight")) == {"Q4_1"}


# ---- refusals -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,out,label", [("compressed-tensors", "lr-ct", "compressed-tensors"), ("gptq", "lr-gptq", "GPTQ"),
                                           ("gguf", "lr.gguf", "GGUF")])
def test_lowrank_encoding_is_refused_by_every_exporter(work, pico_src, w4, fmt, out, label):
    q = work / "lowrank"
    if not q.exists():
        remix(w4, pico_src, q, {L1 + "mlp.gate_proj": [_grid(4, 32), {"kind": "lowrank", "rank": 4}]})
    with QuantizedCheckpoint(q) as ck:
        assert ck.encodings(L1 + "mlp.gate_proj")[1] == {"kind": "lowrank", "rank": 4}
    with pytest.raises(WeightsmithError) as e:
        export(q, work / out, fmt, gguf_unverified_tokenizer=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{label} cannot store a lowrank encoding: layer model.layers.1.mlp.gate_proj (qparams lowrank_a/lowrank_b)")
    assert not (work / out).exists() and not list(work.glob(f".{out}*"))
    row = next(r for r in inspect(q)["tensors"] if r["name"] == L1 + "mlp.gate_proj.weight")  # 128x64, rank 4
    assert row["scheme"] == "int4 g32 sym + lowrank r4 (dequantized, qparams)"
    assert row["packed_bits_per_weight"] == pytest.approx(4.5 + 16 * 4 * (128 + 64) / (128 * 64))


def test_legacy_lorc_factors_are_a_lowrank_encoding(work, pico_src, w4, tmp_path):
    q = shutil.copytree(w4, tmp_path / "lorc")
    f = q / "qparams" / "block-00001.safetensors"
    t = load_file(f)
    t[L1 + "mlp.up_proj.lorc_a"], t[L1 + "mlp.up_proj.lorc_b"] = torch.zeros(128, 2), torch.zeros(2, 64)
    save_file(t, f)  # no metadata: legacy
    with QuantizedCheckpoint(q) as ck:
        assert ck.encodings(L1 + "mlp.up_proj") == [_grid(4, 32), {"kind": "lowrank", "rank": 2}]
        assert ck.bits == 4  # the grid is still uniform
    with pytest.raises(WeightsmithError, match=r"^GGUF cannot store a lowrank encoding: layer model\.layers\.1\.mlp\.up_proj \(qparams lorc_a/lorc_b\)"):
        export(q, tmp_path / "l.gguf", "gguf", gguf_unverified_tokenizer=True)


def test_cli_export_refusal_is_one_line(work, pico_src, w4, capsys):
    q = work / "lowrank-cli"
    remix(w4, pico_src, q, {L0 + "self_attn.v_proj": [_grid(8, 32), {"kind": "lowrank", "rank": 2}]})
    assert main(["export", str(q), str(work / "lrc"), "--format", "gptq", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GPTQ cannot store a lowrank encoding: layer model.layers.0.self_attn.v_proj") and err.count("\n") == 1


def test_unknown_encoding_kind_is_refused_by_kind(work, pico_src, w4, tmp_path):
    q = remix(w4, pico_src, tmp_path / "codebook", {L0 + "mlp.up_proj": [_grid(4, 32)]})
    f = q / "qparams" / "block-00000.safetensors"
    with safe_open(str(f), "pt") as fh:
        meta = json.loads(fh.metadata()[ENCODINGS_KEY])
    meta[L0 + "mlp.up_proj"].append({"kind": "codebook", "entries": 256})
    save_file(load_file(f), f, metadata={ENCODINGS_KEY: json.dumps(meta)})
    with pytest.raises(WeightsmithError, match=r"cannot store a codebook encoding: layer model\.layers\.0\.mlp\.up_proj"):
        export(q, tmp_path / "cb", "compressed-tensors")


# ---- inspect and the readers --------------------------------------------------------------------------------------------

def test_inspect_mixed_reports_schemes_and_bits_per_layer(work, mixed):
    res = inspect(mixed)
    rows = {r["name"]: r for r in res["tensors"]}
    assert rows[L0 + "mlp.down_proj.weight"]["scheme"] == "int8 g64 sym (dequantized, qparams)"
    assert rows[L0 + "mlp.down_proj.weight"]["packed_bits_per_weight"] == pytest.approx(8 + 16 / 64)
    assert rows[L1 + "self_attn.q_proj.weight"]["scheme"].startswith("int8 per-channel sym")
    assert rows[L1 + "self_attn.q_proj.weight"]["packed_bits_per_weight"] == pytest.approx(8 + 16 / 64)  # one scale per 64-wide row
    assert rows[L1 + "mlp.down_proj.weight"]["scheme"] == "int4 g32 sym + sparsity 2:4 50% (dequantized, qparams)"
    assert rows[L1 + "mlp.down_proj.weight"]["packed_bits_per_weight"] == pytest.approx(4.5)
    assert rows[L0 + "self_attn.o_proj.weight"]["scheme"].startswith("float + sparsity unstructured 50%")
    assert rows[L0 + "self_attn.o_proj.weight"]["packed_bits_per_weight"] == 32.0
    assert res["quantized_layers"] == 13
    with QuantizedCheckpoint(mixed) as ck:  # overall = the per-layer counts weighted by size
        shapes = {n: ck.source.shape(f"{n}.weight") for n in ck.layers}
    n = sum(a * b for a, b in shapes.values())
    want = sum(rows[f"{k}.weight"]["packed_bits_per_weight"] * a * b for k, (a, b) in shapes.items()) / n
    assert res["packed_bits_per_weight_quantized"] == pytest.approx(want) and 4.5 < want < 8.25
    assert res["by_scheme"]["int8 g64 sym (dequantized, qparams)"]["tensors"] == 1
    # the packed formats report the same per-layer scheme and what they really store
    for fmt, d in (("compressed-tensors", work / "mixed-ct"), ("gptq", work / "mixed-gptq")):
        if not d.exists():
            export(mixed, d, fmt)
        r = {x["name"]: x for x in inspect(d)["tensors"]}
        sfx = "(pack-quantized)" if fmt == "compressed-tensors" else "(GPTQ v1)"
        assert r[L0 + "mlp.down_proj.weight"]["scheme"] == f"int8 g64 sym {sfx}", fmt
        assert r[L1 + "mlp.up_proj.weight"]["scheme"] == f"int4 g64 sym {sfx}", fmt
        assert r[L0 + "self_attn.o_proj.weight"]["scheme"] == "float", fmt
        # int8 g64 (64x128) as stored: CT 8-bit codes + a float32 (the dir's dtype) scale per 64 + the int64 shape;
        # GPTQ 8-bit codes + an fp16 scale and an 8-bit packed zero per 64 + an int32 g_idx per column
        want = 8 + 32 / 64 + 128 / (64 * 128) if fmt == "compressed-tensors" else 8 + 16 / 64 + 8 / 64 + 32 / 64
        assert r[L0 + "mlp.down_proj.weight"]["bits_per_weight"] == pytest.approx(want), fmt


def test_inspect_cli_prints_the_mixed_schemes(mixed, capsys):
    assert main(["inspect", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "packed bpw" in out and "bits/weight of the quantized layers as packed formats store them (the report's bits/weight)" in out
    assert "int8 g64 sym (dequantized, qparams): 1 matrices" in out and "int4 g64 sym (dequantized, qparams): 2 matrices" in out
