"""``LutLinear``: an ``nn.Linear`` replacement holding a quantized layer in the lookup-table kernel's
packed layout. ``forward`` runs the kernel; where the library is unavailable (no compiler, a CPU
without AVX2, ``WEIGHTSMITH_KERNEL=off``) or gradients are needed, it falls back to the dequantized
float weight (unpacked once from the packed form, then cached) — never a crash."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import lut

log = logging.getLogger("weightsmith")

_THREADS: int | None = None
_PASSES = 2  # accurate by default: SmolLM2 perplexity through int8-only tables moved by 0.5 %
_WARNED = False


def set_table_passes(n: int) -> None:
    """Table precision of the kernel: 1 = int8 tables (T-MAC's choice, fastest), 2 = an extra int8
    pass on the rounding residual (~15-bit tables, about twice the lookups)."""
    global _PASSES
    if n not in (1, 2):
        raise ValueError(f"table passes must be 1 or 2, not {n}")
    _PASSES = n


def get_table_passes() -> int:
    return _PASSES


def set_num_threads(n: int | None) -> None:
    """Threads of the kernel (default: ``torch.get_num_threads()``)."""
    global _THREADS
    _THREADS = None if n is None else max(1, int(n))


def get_num_threads() -> int:
    return _THREADS if _THREADS is not None else torch.get_num_threads()


class LutLinear(nn.Module):
    def __init__(self, packed: lut.PackedLayer, bias: torch.Tensor | None = None, use_kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits = packed.in_features, packed.out_features, packed.bits
        self.group, self.block, self.layout = packed.group, packed.block, packed.layout
        self.register_buffer("w_packed", packed.w, persistent=False)
        self.register_buffer("w_scale", packed.scale, persistent=False)
        self.register_buffer("w_zero2", packed.zero2, persistent=False)
        self.register_buffer("perm", packed.perm, persistent=False)
        self.register_buffer("w_zc", packed.zc, persistent=False)  # HLQ layers only
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.use_kernel = use_kernel
        self.threads: int | None = None  # None: the module-wide setting (set_num_threads)
        self.passes: int | None = None  # None: the module-wide setting (set_table_passes)
        self._dequant: torch.Tensor | None = None
        self._call = None  # (function, leading pointer args, trailing size args) once prepared; False: no kernel

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() may move the buffers: re-read the pointers
        self._call = None
        return super()._apply(fn, *args, **kwargs)

    def _prepare(self):
        lib = lut.load_library() if self.use_kernel else None
        if lib is None or self.w_packed.device.type != "cpu":
            self._call = False
            return
        b = self.bias
        if b is not None and b.dtype != torch.float32:
            self.bias = b = b.float()
        p = self.packed
        fn, ptrs = lut.gemm_entry(lib, p)
        self._call = (fn, (*ptrs, b.data_ptr() if b is not None else None), (p.kp, self.group, self.block, self.bits))

    @classmethod
    def from_quant_layer(cls, layer, bias: torch.Tensor | None = None, **kw) -> "LutLinear":
        """From a :class:`weightsmith.export.common.QuantLayer` (integer codes + qparams), in the layout
        this CPU runs fastest (:func:`weightsmith.kernels.lut.preferred_layout`)."""
        return cls(lut.pack(layer.q, layer.scale, layer.zero, layer.g_idx, layer.bits, layout=lut.preferred_layout(layer.bits)), bias, **kw)

    @classmethod
    def from_planes(cls, q: torch.Tensor, plane_scale: torch.Tensor, offset: torch.Tensor, group_size: int, bits: int,
                    bias: torch.Tensor | None = None, **kw) -> "LutLinear":
        """An HLQ layer (:class:`weightsmith.encodings.Planes`: codes, per-plane scales, offsets)."""
        return cls(lut.pack_planes(q, plane_scale, offset, group_size, bits), bias, **kw)

    @property
    def packed(self) -> lut.PackedLayer:
        return lut.PackedLayer(self.w_packed, self.w_scale, self.w_zero2, self.perm, self.out_features, self.in_features,
                               self.group, self.block, self.bits, zc=self.w_zc, layout=self.layout)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in), unpacked from the kernel layout."""
        return lut.unpack(self.packed)

    def kernel_active(self) -> bool:
        return self.use_kernel and lut.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._call is None or (self._call is False and self.use_kernel and lut.available()):
            self._prepare()
        if self._call and self.use_kernel and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            fn, ptrs, sizes = self._call
            x2 = x.reshape(-1, self.in_features)
            if x2.dtype != torch.float32 or not x2.is_contiguous():
                x2 = x2.to(torch.float32).contiguous()
            y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
            rc = fn(*ptrs, x2.data_ptr(), y.data_ptr(), x2.shape[0], self.out_features, self.in_features, *sizes,
                    self.passes or _PASSES, self.threads or _THREADS or torch.get_num_threads(), -1)
            if rc != 0:
                raise RuntimeError(f"ws_lut_gemm failed with {rc}")
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return self.forward_dequant(x)

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """The fallback: dequantized float weight, cached on first use."""
        global _WARNED
        if self.use_kernel and not _WARNED and not lut.available():
            _WARNED = True
            log.warning("lookup-table kernel unavailable (%s): using the dequantized float path", lut.unavailable_reason())
        if self._dequant is None:
            self._dequant = self.dequantized_weight()
        w = self._dequant.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequantize().T + bias`` in float32, without caching (tests)."""
        return F.linear(x.float(), self.dequantized_weight(), self.bias)

    def packed_nbytes(self) -> int:
        return self.packed.nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, bias={self.bias is not None}, kernel={'on' if self.kernel_active() else 'off'}"
                + (", layout=dot4" if self.layout == lut.DOT4 else ""))
