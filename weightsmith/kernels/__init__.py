"""Run quantized checkpoints on the CPU: a lookup-table (T-MAC style) kernel for W1–W4 linear layers.

- :mod:`.lut`: packing into bit planes, the compiled library (ctypes), an exact torch emulation;
- :class:`LutLinear`: the ``nn.Linear`` replacement (kernel, or the dequantized fallback);
- :mod:`.runtime`: put every quantized layer of a weightsmith output on the kernel, generate, benchmark.
"""
from .linear import LutLinear, get_num_threads, get_table_passes, set_num_threads, set_table_passes
from .lut import available, isa, unavailable_reason

__all__ = ["LutLinear", "available", "get_num_threads", "get_table_passes", "isa", "set_num_threads", "set_table_passes", "unavailable_reason"]
