"""The streaming engine on pico models of every architecture family, and its scheduling core."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import weightsmith
from weightsmith.engine.sequential import SequentialRunner, discover_groups
from weightsmith.quant.grid import dequantize_groups
from conftest import calib_ids

ARCHS = ["llama", "qwen2", "mistral", "opt", "gpt2", "bert"]
EXPECTED_LAYERS = {"llama": 7, "qwen2": 7, "mistral": 7, "opt": 6, "gpt2": 4, "bert": 6}


def load_weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_on_every_architecture(arch, pico, tmp_path):
    src = pico(arch)
    out = tmp_path / "q"
    cfg = {"method": "gptq", "grid": {"bits": 4, "group_size": 16}, "chunk_size": 4}
    rep = weightsmith.quantize(src, cfg, calib_ids(16, 32), out=out, progress=False)
    layers = rep["layers"]
    assert len(layers) == EXPECTED_LAYERS[arch] * 2
    assert rep["summary"]["mean_error"] < 0.7 * rep["summary"]["mean_rtn_error"]
    # the output is a plain HF directory that transformers loads without weightsmith
    cls = getattr(transformers, json.loads((out / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(out)
    orig = cls.from_pretrained(src)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        a, b = model(ids).logits, orig(ids).logits
    assert 0 < (a - b).abs().max() < 5
    # every quantized weight lies exactly on the grid its qparams describe
    sd, names = load_weights(out), {r["name"] for r in layers}
    qp = {}
    for f in (out / "qparams").glob("*.safetensors"):
        qp.update(load_file(f))
    for name in names:
        w = sd.get(f"{name}.weight")
        if w is None:  # BERT checkpoints carry the base-model prefix
            w = next(v for k, v in sd.items() if k.endswith(f"{name.split('.', 1)[-1]}.weight") and name.split(".")[0] in k)
        w = w.t() if arch == "gpt2" else w
        assert torch.equal(dequantize_groups(w, qp[f"{name}.scale"], qp[f"{name}.zero"], qp[f"{name}.g_idx"], 4), w), name
    # nothing but the output is left in the parent directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", f"pico-{arch}"])


def test_shared_inputs_form_one_group(pico, tmp_path):
    rep = weightsmith.quantize(pico("llama"), {"method": "rtn"}, calib_ids(4, 16), out=tmp_path / "q", progress=False)
    q = next(r for r in rep["layers"] if r["name"].endswith("layers.0.self_attn.q_proj"))
    assert sorted(q["shares_input_with"]) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    up = next(r for r in rep["layers"] if r["name"].endswith("layers.1.mlp.up_proj"))
    assert up["shares_input_with"] == ["model.layers.1.mlp.gate_proj"]


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 24)
        self.b = nn.Linear(12, 24)  # reads the same input as a
        self.c = nn.Linear(24, 12)

    def forward(self, x):
        return x + self.c(torch.relu(self.a(x)) * self.b(x))


def rounding(g, h, stats):
    for rel in g.names:
        m = getattr(block, rel)
        m.weight.data = torch.round(m.weight.data * 4) / 4
    seen.append((list(g.names), h.clone()))


block: TwoLayer
seen: list


@pytest.mark.parametrize("low_memory", [False, True])
def test_true_sequential_one_forward(low_memory):
    global block, seen
    block, seen = TwoLayer(), []
    layers = {"a": block.a, "b": block.b, "c": block.c}
    xs = [torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    groups, unreached = discover_groups(block, layers, (xs[0],), {})
    assert [g.names for g in groups] == [["a", "b"], ["c"]] and unreached == []
    outs = SequentialRunner(block, layers, groups, rounding, sequential=True, low_memory=low_memory).run([((x,), {}) for x in xs])
    x = torch.cat([x.reshape(-1, 12) for x in xs])
    assert seen[0][0] == ["a", "b"] and torch.allclose(seen[0][1], x.t() @ x / x.shape[0], atol=1e-5)
    # c's statistics come from the already-rounded a and b (true-sequential), over all chunks
    with torch.no_grad():
        mid = torch.relu(block.a(x)) * block.b(x)
        assert torch.allclose(seen[1][1], mid.t() @ mid / mid.shape[0], atol=1e-5)
        for xi, o in zip(xs, outs):
            assert torch.allclose(o, block(xi), atol=1e-6)


def test_not_sequential_uses_float_statistics():
    global block, seen
    block, seen = TwoLayer(), []
    layers = {"a": block.a, "b": block.b, "c": block.c}
    xs = [torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    groups, _ = discover_groups(block, layers, (xs[0],), {})
    x = torch.cat([x.reshape(-1, 12) for x in xs])
    with torch.no_grad():
        mid = torch.relu(block.a(x)) * block.b(x)
    SequentialRunner(block, layers, groups, rounding, sequential=False).run([((x,), {}) for x in xs])
    assert torch.allclose(seen[1][1], mid.t() @ mid / mid.shape[0], atol=1e-5)


def test_deterministic(pico, tmp_path):
    src = pico("llama")
    cfg = {"method": "gptq", "grid": {"bits": 3, "group_size": 16}}
    weightsmith.quantize(src, cfg, calib_ids(8, 32), out=tmp_path / "a", progress=False)
    weightsmith.quantize(src, cfg, calib_ids(8, 32), out=tmp_path / "b", progress=False)
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunking_changes_nothing_but_memory(pico, tmp_path):
    src = pico("llama")
    for cs in (1, 16):
        weightsmith.quantize(src, {"method": "gptq", "chunk_size": cs}, calib_ids(16, 32), out=tmp_path / f"c{cs}", progress=False)
    a, b = load_weights(tmp_path / "c1"), load_weights(tmp_path / "c16")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3  # float summation order only
