"""A lean decode loop for Llama-shaped causal LMs on the kernel (``weightsmith run`` / ``bench-kernel``).

Through transformers, a decoded token of SmolLM2-135M costs ~10 ms of Python and dispatch before
any weight is read (the "no-matmul floor" of bench/results/kernel_*.md): the model's modules, its
cache object, masks and rotary helpers are rebuilt or walked every step. That floor alone is slower
than llama.cpp's whole token, so no kernel can reach llama.cpp through it. This loop runs the same
model — the very modules ``swap_quantized_layers`` left in it (``LutLinear`` on the kernel, or
``nn.Linear``), its RMSNorm weights, its rotary embedding, its output head — with the fewest torch
calls a step allows: one preallocated KV cache, the layers that read one input fused into one kernel
call (q/k/v, gate/up: their packed rows concatenated when they share grid and column order), the
rotary embedding computed once per step, ``scaled_dot_product_attention`` with grouped KV heads,
and the head applied to the last position only while generating.

Architectures: what transformers calls ``llama``, ``mistral`` (without a sliding window shorter than
the run) and ``qwen2`` (q/k/v biases) — pre-norm decoder blocks of RMSNorm, rotary attention and a
SiLU-gated MLP; :func:`unsupported_reason` says why another model is not (it then runs through
transformers). The outputs equal the transformers model's within float rounding (tests/test_kernel.py).
"""
from __future__ import annotations

import ctypes
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import lut
from .linear import LutLinear

ARCHS = ("llama", "mistral", "qwen2")


def unsupported_reason(model: nn.Module, max_len: int | None = None) -> str | None:
    """None when the lean loop can run ``model`` (for ``max_len`` positions), else why not."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHS:
        return f"model type {mt!r} (the lean loop runs {', '.join(ARCHS)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "an MLP other than SiLU-gated without bias"
    win = getattr(cfg, "sliding_window", None)
    if win and (mt != "qwen2" or getattr(cfg, "use_sliding_window", False)) and (max_len is None or max_len > win):
        return f"a sliding attention window ({win}) shorter than the run"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return "not a decoder with model.layers, model.rotary_emb and model.norm"
    rope = getattr(body.rotary_emb, "rope_type", "default")
    if rope in ("dynamic", "longrope"):  # their frequencies follow the sequence length; the loop tabulates them once
        return f"a {rope} rotary embedding"
    for ly in body.layers:
        a, m = getattr(ly, "self_attn", None), getattr(ly, "mlp", None)
        if a is None or m is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a block without q/k/v/o and gate/up/down projections"
        for norm in (ly.input_layernorm, ly.post_attention_layernorm):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
                return f"a norm of type {type(norm).__name__}"
    return None


def _fusable(mods: list[nn.Module]) -> bool:
    """Whether LutLinear layers reading one input can be one kernel call: same grid, block, columns,
    and every part but the last a whole number of 64-row tiles (the kernel's packed rows concatenate)."""
    if not all(isinstance(m, LutLinear) for m in mods):
        return False
    p0 = mods[0].packed
    for m in mods:
        p = m.packed
        if (p.in_features, p.group, p.block, p.bits, p.planes, p.layout) != (p0.in_features, p0.group, p0.block, p0.bits, p0.planes, p0.layout):
            return False
        if not torch.equal(p.perm, p0.perm):
            return False
    return all(m.out_features % lut.TILE == 0 for m in mods[:-1])


def fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One LutLinear computing ``cat([m(x) for m in mods], -1)`` (None where :func:`_fusable` says no)."""
    if not _fusable(mods):
        return None
    ps = [m.packed for m in mods]
    p0 = ps[0]
    cat = lambda ts: torch.cat(ts, 0).contiguous()  # noqa: E731
    packed = lut.PackedLayer(cat([p.w for p in ps]), cat([p.scale for p in ps]), p0.zero2 if p0.planes else cat([p.zero2 for p in ps]),
                             p0.perm, sum(p.out_features for p in ps), p0.in_features, p0.group, p0.block, p0.bits,
                             zc=cat([p.zc for p in ps]) if p0.planes else None, layout=p0.layout)
    bias = None
    if any(m.bias is not None for m in mods):
        bias = torch.cat([m.bias.float() if m.bias is not None else torch.zeros(m.out_features) for m in mods])
    new = LutLinear(packed, bias, use_kernel=mods[0].use_kernel)
    new.threads, new.passes = mods[0].threads, mods[0].passes
    return new


class _Joined(nn.Module):
    """Layers reading one input, called one by one, outputs concatenated (where they cannot be fused)."""

    def __init__(self, mods):
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.parts], -1)


def _joined(mods) -> nn.Module:
    if all(type(m) is nn.Linear for m in mods) and len({m.in_features for m in mods}) == 1:
        w = torch.cat([m.weight for m in mods]).detach()
        b = None if all(m.bias is None for m in mods) else torch.cat(
            [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype) for m in mods])
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b, requires_grad=False)
        return lin
    return fuse(mods) or _Joined(mods)


class _Lin(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("z2", ctypes.c_void_p), ("zc", ctypes.c_void_p),
                ("perm", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("Kp", ctypes.c_int64), ("G", ctypes.c_int64), ("S", ctypes.c_int64), ("bits", ctypes.c_int32), ("layout", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("n1", ctypes.c_void_p), ("n2", ctypes.c_void_p), ("qkv", _Lin), ("o", _Lin), ("gu", _Lin), ("down", _Lin),
                ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p)]


def _lin_struct(m: LutLinear) -> _Lin:
    p = m.packed
    b = m.bias
    return _Lin(p.w.data_ptr(), p.scale.data_ptr(), None if p.planes else p.zero2.data_ptr(), p.zc.data_ptr() if p.planes else None,
                p.perm_ptr(), None if b is None else b.data_ptr(), p.out_features, p.in_features, p.kp, p.group, p.block, p.bits, p.layout)


class LeanDecoder:
    """The lean loop over ``model`` (see the module docstring) with a KV cache of ``max_len`` positions.
    ``__call__(ids, all_logits=False)`` appends the tokens ``ids`` (1-D) at the cache's position and
    returns the logits of the last one (or of all, shape (T, vocab)); :meth:`reset` empties the cache."""

    def __init__(self, model: nn.Module, max_len: int, native: bool = True):
        why = unsupported_reason(model, max_len)
        if why:
            raise ValueError(f"the lean loop cannot run this model: {why}")
        cfg, body = model.config, model.model
        self.model, self.max_len = model, int(max_len)
        self.embed = model.get_input_embeddings()
        self.rotary, self.norm, self.head = body.rotary_emb, body.norm, model.get_output_embeddings()
        first = body.layers[0].self_attn
        self.hd = int(getattr(first, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.nh, self.nkv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.scaling = float(getattr(first, "scaling", self.hd ** -0.5))
        self.hidden = int(cfg.hidden_size)
        self.layers = []
        for ly in body.layers:
            a, m = ly.self_attn, ly.mlp
            self.layers.append((ly.input_layernorm, _joined([a.q_proj, a.k_proj, a.v_proj]), a.o_proj,
                                ly.post_attention_layernorm, _joined([m.gate_proj, m.up_proj]), m.down_proj,
                                int(m.gate_proj.out_features)))
        dt = self.embed.weight.dtype
        self.kc = torch.zeros(len(self.layers), self.nkv, self.max_len, self.hd, dtype=dt)
        self.vc = torch.zeros_like(self.kc)
        self.pos = 0
        with torch.inference_mode():  # the rotary embedding of every position, once
            cos, sin = self.rotary(torch.zeros(1, 1, self.hidden, dtype=dt), torch.arange(self.max_len)[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (max_len, hd)
        self.eps = float(body.layers[0].input_layernorm.variance_epsilon)
        self.native = self._native_layers() if native else None

    def _native_layers(self):
        """The ctypes layer table of the one-call decode step, when every projection is on the kernel."""
        lib = lut.load_library()
        if lib is None or self.embed.weight.dtype != torch.float32:
            return None
        mods = [m for ly in self.layers for m in (ly[1], ly[2], ly[4], ly[5])]
        if not all(isinstance(m, LutLinear) and m.use_kernel and (m.bias is None or m.bias.dtype == torch.float32) for m in mods):
            return None
        norms = [n for ly in self.layers for n in (ly[0], ly[3])]
        if any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms):
            return None
        if any(float(n.variance_epsilon) != self.eps for n in norms):
            return None
        arr = (_Layer * len(self.layers))()
        for i, (n1, qkv, o, n2, gu, down, _inter) in enumerate(self.layers):
            arr[i] = _Layer(n1.weight.data_ptr(), n2.weight.data_ptr(), _lin_struct(qkv), _lin_struct(o), _lin_struct(gu),
                            _lin_struct(down), self.kc[i].data_ptr(), self.vc[i].data_ptr())
        self._keep = mods  # the buffers the table points into
        return lib, arr

    def reset(self) -> None:
        self.pos = 0

    @staticmethod
    def _norm(mod, x):
        return F.rms_norm(x, (x.shape[-1],), mod.weight, mod.variance_epsilon)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        ids = ids.reshape(-1)
        T, p0 = int(ids.numel()), self.pos
        L = p0 + T
        if L > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {L} requested")
        nh, nkv, hd = self.nh, self.nkv, self.hd
        x = self.embed(ids)  # (T, hidden)
        if T == 1 and self.native is not None:  # one library call for all the blocks
            lib, arr = self.native
            from .linear import get_num_threads, get_table_passes

            x = x[0].contiguous().clone()
            first = self.layers[0][1]
            rc = lib.ws_lean_step(arr, len(arr), x.data_ptr(), self.cos[p0].data_ptr(), self.sin[p0].data_ptr(), p0, self.max_len,
                                  self.hidden, nh, nkv, hd, self.layers[0][6], self.eps, self.scaling,
                                  first.passes or get_table_passes(), first.threads or get_num_threads())
            if rc != 0:
                raise RuntimeError(f"ws_lean_step failed with {rc}")
            self.pos = L
            return self.head(self._norm(self.norm, x[None]))
        cos, sin = self.cos[p0:L, None, :], self.sin[p0:L, None, :]  # (T, 1, hd)
        half = hd // 2
        mask = None
        if T > 1:  # causal over the cached positions too
            mask = torch.ones(T, L, dtype=torch.bool).tril(p0)
        nq = nh * hd
        nqk = nq + nkv * hd
        for i, (n1, qkv, o_proj, n2, gu, down, inter) in enumerate(self.layers):
            y = qkv(self._norm(n1, x))  # (T, (nh + 2 nkv) hd)
            qk = y[:, :nqk].view(T, nh + nkv, hd)
            rot = torch.cat((-qk[..., half:], qk[..., :half]), -1)
            qk = torch.addcmul(qk * cos, rot, sin)
            self.kc[i, :, p0:L] = qk[:, nh:].transpose(0, 1)
            self.vc[i, :, p0:L] = y[:, nqk:].view(T, nkv, hd).transpose(0, 1)
            att = F.scaled_dot_product_attention(qk[:, :nh].transpose(0, 1)[None], self.kc[i, :, :L][None], self.vc[i, :, :L][None],
                                                 attn_mask=mask, scale=self.scaling, enable_gqa=nh != nkv)
            x = x + o_proj(att[0].transpose(0, 1).reshape(T, nq))
            g = gu(self._norm(n2, x))
            x = x + down(F.silu(g[:, :inter]) * g[:, inter:])
        self.pos = L
        x = self._norm(self.norm, x if all_logits else x[-1:])
        return self.head(x)


def greedy(dec: LeanDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding as :func:`weightsmith.kernels.runtime.greedy` does it, on the lean loop:
    ``(new token ids, prefill seconds, decode seconds)``."""
    dec.reset()
    t0 = time.perf_counter()
    nxt = dec(ids.reshape(-1))[-1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(new_tokens - 1):
        nxt = dec(nxt)[-1].argmax(-1, keepdim=True)
        toks.append(nxt)
    t2 = time.perf_counter()
    return torch.cat(toks), t1 - t0, t2 - t1
