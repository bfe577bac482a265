"""The int8 output head's kernels (``lut.i8_gemm``, ``lut.i8_gemm_tiles``: ``--head-dtype int8``) for
one decoded token: the weights widened to float in registers vs the AVX-512 VNNI paths (activations
rounded to int8 twice, integer dot products; row-major rows, or the VNNI tiles), beside torch's bfloat16 and float32 matmuls of the same rounded head. Random
int8 rows and scales on the head shapes of SmolLM2-135M (49152×576) and of the synthetic 1 B Llama
(49152×2048); 1 and 2 threads; the median of CALLS calls, ROUNDS interleaved rounds (each round's
median reported, and the median of those). Needs the kernel library; the VNNI column needs a CPU with it.

    .venv/bin/python bench/bench_int8_head.py

Writes bench/results/int8_head.json/md. Run it alone: the timings are only comparable within one run.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from weightsmith.kernels import lut  # noqa: E402

SHAPES = [(49152, 576), (49152, 2048)]
ROUNDS, CALLS = 3, 40


def median_ms(fn) -> float:
    fn()
    ts = []
    for _ in range(CALLS):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    if not lut.available():
        sys.exit(f"the kernel library is unavailable: {lut.unavailable_reason()}")
    vnni = lut.i8_vnni()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        sc = torch.rand(n, generator=g) * 0.01 + 1e-3
        x = torch.randn(1, k, generator=g)
        w32 = q.float() * sc[:, None]
        wb, xb = w32.to(torch.bfloat16), x.to(torch.bfloat16)
        ref = x.double() @ w32.double().T
        err = float((lut.i8_gemm(q, sc, x, act8=True) - ref).abs().max()) if vnni else None
        tiles = lut.i8_pack_tiles(q) if vnni else None
        err_t = float((lut.i8_gemm_tiles(tiles, sc, x, n) - ref).abs().max()) if vnni else None
        for th in (1, 2):
            torch.set_num_threads(th)
            paths = {"float widening": lambda: lut.i8_gemm(q, sc, x, threads=th, act8=False),
                     "bfloat16 matmul": lambda: xb @ wb.T, "float32 matmul": lambda: x @ w32.T}
            if vnni:
                paths["vnni"] = lambda: lut.i8_gemm(q, sc, x, threads=th, act8=True)
                paths["vnni tiles"] = lambda: lut.i8_gemm_tiles(tiles, sc, x, n, threads=th)
            times = {name: [] for name in paths}
            for _ in range(ROUNDS):
                for name, fn in paths.items():
                    times[name].append(median_ms(fn))
            rows.append({"shape": [n, k], "threads": th, "ms": {m: statistics.median(v) for m, v in times.items()},
                         "rounds_ms": times, "vnni_max_abs_error": err,
                         "vnni_tiles_max_abs_error": err_t})
            print(rows[-1]["shape"], th, {m: round(v, 2) for m, v in rows[-1]["ms"].items()}, file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    meta = {"cpu": cpu, "isa": lut.isa(), "vnni": vnni, "torch": torch.__version__,
            "rounds": ROUNDS, "calls": CALLS, "load_after": load}
    cols = ["float widening", "vnni", "vnni tiles", "bfloat16 matmul", "float32 matmul"]
    lines = ["# int8 head, one token: ms per call (median)", "",
             f"{os.cpu_count()}-core {meta['cpu']} ({meta['isa']}, VNNI {'yes' if vnni else 'no'}), torch {torch.__version__}; "
             f"{ROUNDS} interleaved rounds of {CALLS} calls, load average {load:.2f} after the run.", "",
             "| head (out × in) | threads | " + " | ".join(cols) + " | VNNI tiles / float widening | VNNI / tiles max abs error |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        ms = r["ms"]
        ratio = f"{ms['float widening'] / ms['vnni tiles']:.2f}× faster" if "vnni tiles" in ms else "–"
        e = (f"{r['vnni_max_abs_error']:.1e} / {r['vnni_tiles_max_abs_error']:.1e}" if r["vnni_max_abs_error"] is not None else "–")
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['threads']} | " + " | ".join(f"{ms[c]:.2f}" if c in ms else "–" for c in cols)
                     + f" | {ratio} | {e} |")
    lines += ["", "vnni: row-major int8 rows, 4 rows at a time, each row's 16 lanes reduced; vnni tiles: the rows repacked once "
              "(lut.i8_pack_tiles: 16 rows × 4 columns per 64 bytes, one sequential stream, each row's sum in its own lane) — what "
              "`--head-dtype int8` uses on a VNNI CPU. The float paths multiply the same rounded weights (int8 × scale) in torch; "
              "the error column is each VNNI path's largest deviation from the float64 matmul of the rounded weights (rows of "
              "random int8 codes, |x| ~ N(0, 1))."]
    lines += ["", "Ran alone: the other jobs of the machine were paused (SIGSTOP) for its 20 s." if os.environ.get("BENCH_NOTE") else ""]
    write_results("int8_head", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
