"""Peak memory does not grow with the number of blocks: GPTQ on synthetic Llama checkpoints of 8 and
32 blocks (hidden 256, intermediate 1024: 3.9 MB a block), each quantization in its own process.

    .venv/bin/python bench/bench_streaming.py

Writes bench/results/streaming.json and streaming.md.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from common import write_results  # noqa: E402
from conftest import save_pico  # noqa: E402

SCRIPT = """
import sys, torch, weightsmith
ids = torch.randint(7, 200, (8, 64), generator=torch.Generator().manual_seed(0))
rep = weightsmith.quantize(sys.argv[1], {"method": "gptq"}, ids, out=sys.argv[2], progress=False)
print(rep["peak_rss_mb"], rep["wall_time_s"])
"""


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (8, 32):
            src = save_pico(Path(tmp) / f"m{n}", "llama", layers=n, hidden=256, inter=1024)
            size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
            p = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(Path(tmp) / f"q{n}")], capture_output=True, text=True, check=True)
            rss, secs = map(float, p.stdout.split()[-2:])
            rows[n] = {"blocks": n, "checkpoint_mb": round(size, 1), "peak_rss_mb": rss, "quantize_s": secs}
    lines = ["# Streaming: peak RSS against the number of blocks (GPTQ W4 g64, 8×64 calibration tokens)", "",
             "| blocks | checkpoint MB | peak RSS MB | quantize s |", "|---|---|---|---|"]
    lines += [f"| {r['blocks']} | {r['checkpoint_mb']} | {r['peak_rss_mb']} | {r['quantize_s']} |" for r in rows.values()]
    lines += ["", f"Growth from 8 to 32 blocks: {rows[32]['peak_rss_mb'] - rows[8]['peak_rss_mb']:.1f} MB of peak RSS for "
              f"{rows[32]['checkpoint_mb'] - rows[8]['checkpoint_mb']:.1f} MB more weights."]
    write_results("streaming", {"runs": list(rows.values())}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
