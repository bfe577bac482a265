"""compressed-tensors and pruned checkpoints (weightsmith/export/compressed_tensors.py): the installed
compressed-tensors has no sparse compressor, so a pruned-only checkpoint is refused with that reason
(by export, and by quantize --format before any work); pruned + quantized is written pack-quantized
with its zeros as codes, loaded back by transformers (compressed-tensors decompresses) with every
weight exactly the dequantized one, the zeros where the mask put them, density and size reported."""
from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, save_pico
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.export import export
from weightsmith.export.compressed_tensors import sparse_compressors

L0 = "model.layers.0."


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("xsp")
    return d, save_pico(d / "pico", "llama")


def test_installed_compressed_tensors_has_no_sparse_compressor():
    """What the refusal rests on (if a later version adds them, this fails and the exporter is to be extended)."""
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor

    assert sparse_compressors() == []
    assert "pack-quantized" in BaseCompressor.registered_names()  # the registry is the one we think it is
    assert compressed_tensors.__version__.startswith("0.20")


def test_pruned_only_is_refused_with_the_reason(work, tmp_path, capsys):
    d, src = work
    weightsmith.quantize(src, {"method": "wanda:sparsity=0.5"}, calib_ids(8, 32), out=tmp_path / "p", progress=False)
    with pytest.raises(WeightsmithError, match=r"pruned \(14 layers with a mask\) but not quantized: compressed-tensors 0\.20.* no sparse compressor"):
        export(tmp_path / "p", tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    code = main(["quantize", str(src), str(tmp_path / "q"), "--quiet", "--method", "magnitude", "--format", "compressed-tensors"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to pack" in err and "no sparse compressor" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.dequantized*"))  # refused before the run


@pytest.mark.parametrize("recipe", ["wanda:sparsity=0.5,gptq", "sparsegpt:pattern=2:4:quantize=true"])
def test_pruned_and_quantized_round_trip(work, tmp_path, recipe):
    d, src = work
    q = tmp_path / "q"
    weightsmith.quantize(src, {"method": recipe, "grid": {"bits": 4, "group_size": 32}}, calib_ids(8, 32), out=q, progress=False)
    info = export(q, tmp_path / "ct", "compressed-tensors")
    ref = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,  # compressed-tensors decompresses the codes
                                               quantization_config=CompressedTensorsConfig(dequantize=True)).state_dict()
    zeros = numel = 0
    for k, w in ref.items():
        assert torch.equal(got[k], w), k  # exactly the dequantized weights, zeros included
        if ".layers." in k and k.endswith("proj.weight"):
            zeros, numel = zeros + int((w == 0).sum()), numel + w.numel()
    assert zeros / numel >= 0.5
    sp = info["sparsity"]
    assert sp["layers"] == 14 and sp["density"] == pytest.approx(1 - zeros / numel) and "no sparse compression" in sp["stored_as"]
    assert info["size_vs_input"] == pytest.approx(info["bytes"] / info["input_weight_bytes"]) and info["size_vs_input"] < 0.8
