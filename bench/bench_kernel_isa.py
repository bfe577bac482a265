"""The kernel's AVX2 and AVX-512 tiles side by side (issue 17), for both grids it runs: the uniform
grid and HLQ's per-plane scales (one template each, ``tile_avx2<PLANES>`` / ``tile_avx512<NT, PLANES>``).
Random codes and scales on layer shapes of SmolLM2-135M (1536×576, 576×1536) and of a 1 B Llama
(4096×2048), W2–W4, group size 64, one thread, 1 token (decoding) and 4 tokens (a prompt tile);
the median over 15 interleaved rounds of 100 calls each. Needs a CPU with AVX-512BW.

    .venv/bin/python bench/bench_kernel_isa.py

Writes bench/results/kernel_isa.json/md. Run it alone: the timings are only comparable within one run.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from weightsmith.kernels import lut  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (4096, 2048)]
GS, ROUNDS, CALLS = 64, 15, 100


def uniform_layer(n: int, k: int, bits: int, g: torch.Generator) -> lut.PackedLayer:
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // GS, generator=g) * 0.05 + 0.005).half().float()
    zero = torch.full((n, k // GS), float(2 ** (bits - 1)))
    return lut.pack(q, scale, zero, (torch.arange(k) // GS).to(torch.int32), bits)


def planes_layer(n: int, k: int, bits: int, g: torch.Generator) -> lut.PackedLayer:
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    ps = (torch.rand(n, k // GS, bits, generator=g) * 0.05 + 0.005).half().float()
    off = torch.randn(n, k // GS, generator=g) * 0.01
    return lut.pack_planes(q, ps, off, GS, bits)


def main() -> None:
    if not lut.available() or lut.isa() != "avx512bw":
        sys.exit(f"needs the kernel with AVX-512BW (have: {lut.isa()} {lut.unavailable_reason()})")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows, lines = [], ["| layer | bits | tokens | uniform AVX2 µs | uniform AVX-512 µs | × | HLQ planes AVX2 µs | HLQ planes AVX-512 µs | × |",
                       "|---|---|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        for bits in (2, 3, 4):
            layers = {"uniform": uniform_layer(n, k, bits, g), "planes": planes_layer(n, k, bits, g)}
            for m in (1, 4):
                x = torch.randn(m, k, generator=g)
                runs = {(kind, isa): [] for kind in layers for isa in (1, 2)}
                for _ in range(ROUNDS):  # interleaved: drifts of the machine hit all four alike
                    for (kind, isa), got in runs.items():
                        t = time.perf_counter()
                        for _ in range(CALLS):
                            lut.lut_gemm(layers[kind], x, threads=1, isa=isa)
                        got.append((time.perf_counter() - t) / CALLS * 1e6)
                med = {f"{kind}_{'avx2' if isa == 1 else 'avx512'}_us": statistics.median(v) for (kind, isa), v in runs.items()}
                rows.append({"out": n, "in": k, "bits": bits, "tokens": m, **med})
                r = rows[-1]
                lines.append(f"| {n}×{k} | {bits} | {m} | {r['uniform_avx2_us']:.1f} | {r['uniform_avx512_us']:.1f} | "
                             f"{r['uniform_avx2_us'] / r['uniform_avx512_us']:.2f} | {r['planes_avx2_us']:.1f} | {r['planes_avx512_us']:.1f} | "
                             f"{r['planes_avx2_us'] / r['planes_avx512_us']:.2f} |")
                print(lines[-1], flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    head = [f"# Kernel tiles: AVX2 vs AVX-512 ({cpu}, {os.cpu_count()} cores, 1 thread)", "",
            f"Median µs per call over {ROUNDS} interleaved rounds of {CALLS} calls; group size {GS}; random codes. "
            "× = AVX2 time / AVX-512 time. `.venv/bin/python bench/bench_kernel_isa.py`", ""]
    write_results("kernel_isa", {"cpu": cpu, "group_size": GS, "rounds": ROUNDS, "calls": CALLS, "rows": rows}, "\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
