"""Loss barrier along the linear path between two models, before and after permutation weight matching.

``weightsmith align A B`` permutes B into B' (same function, units ordered like A's: git re-basin
weight matching, ``weightsmith/weightspace/align.py``); this script evaluates the mean next-token loss
and perplexity of (1 − α)·A + α·B and of (1 − α)·A + α·B' at α ∈ {0, 0.1, …, 1} on consecutive windows
of a text file, and the barrier max_α [L(α) − ((1 − α)L(0) + αL(1))] of each path
(``weightspace/barrier.py``). Run by hand:

    python bench/bench_align.py A B --text eval.txt [--seqlen 128 --windows 32] [--name align] [--work DIR]
    python bench/bench_align.py --pico     # two pico Llamas (hidden 64, 2 blocks) trained from seeds 1 and 2 for
                                           # 150 Adam steps on generated text, as tests/test_weightspace.py does (~15 s)

Writes ``bench/results/<name>.json``, ``.md`` and, when matplotlib is installed, ``<name>.png`` (else
the plot is skipped and the JSON says so). B' is written into ``--work`` (default: a temporary
directory, removed afterwards).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightsmith.weightspace.align import align  # noqa: E402
from weightsmith.weightspace.barrier import interpolation_curve, text_windows  # noqa: E402


def run(a: Path, b: Path, text: Path, out_dir: Path, name: str = "align", seqlen: int = 128, windows: int = 32,
        work: Path | None = None, residual: bool = True, labels: tuple[str, str, str] | None = None, restarts: int = 8) -> dict:
    t0 = time.time()
    tmp = None
    if work is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-align-"))
        work = tmp
    try:
        Path(work).mkdir(parents=True, exist_ok=True)
        aligned = Path(work) / "b_aligned"
        rep = align(a, b, aligned, residual=residual, restarts=restarts, overwrite=True)
        t_align = time.time() - t0
        ids = text_windows(a, Path(text).read_text(encoding="utf-8"), seqlen, windows)
        before = interpolation_curve(a, b, ids)
        after = interpolation_curve(a, aligned, ids)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    la, lb, lt = labels or (str(a), str(b), str(text))
    res = {"a": la, "b": lb, "text": lt, "seqlen": seqlen, "windows": int(ids.shape[0]), "residual": residual,
           "align": {k: rep[k] for k in ("objective_before", "objective_after", "sweeps", "units_moved", "restarts", "objectives",
                                         "seed")},
           "align_seconds": t_align,
           "before": before, "after": after, "barrier_before": before["barrier"], "barrier_after": after["barrier"],
           "seconds": time.time() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    res["plot"] = _plot(res, out_dir / f"{name}.png")
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(res) + "\n")
    return res


def markdown(res: dict) -> str:
    b, a = res["before"], res["after"]
    lines = ["# Linear path A → B before and after weight matching", "",
             f"A = `{res['a']}`, B = `{res['b']}`; {res['windows']} windows of {res['seqlen']} tokens of `{res['text']}`; "
             f"residual-stream permutation {'on' if res['residual'] else 'off'}; matching: best of {res['align']['restarts']} seeded "
             f"descents (seed {res['align']['seed']}, {res['align']['sweeps']} sweeps), "
             f"⟨A, B⟩ {res['align']['objective_before']:.4g} → {res['align']['objective_after']:.4g}.", "",
             "| α | loss A↔B | ppl A↔B | loss A↔B' | ppl A↔B' |", "|---:|---:|---:|---:|---:|"]
    for i, al in enumerate(b["alphas"]):
        lines.append(f"| {al:.1f} | {b['loss'][i]:.4f} | {b['perplexity'][i]:.3f} | {a['loss'][i]:.4f} | {a['perplexity'][i]:.3f} |")
    lines += ["", f"Barrier (nats/token, max over α of the loss above the straight line): **{res['barrier_before']:.4f}** "
              f"before (at α = {b['barrier_alpha']}), **{res['barrier_after']:.4f}** after (at α = {a['barrier_alpha']}).",
              "" if res["plot"] else "", "" if res["plot"] else "(no plot: matplotlib is not installed)"]
    return "\n".join(lines).rstrip()


def _plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(res["before"]["alphas"], res["before"]["loss"], "o-", label=f"A↔B (barrier {res['barrier_before']:.3f})")
    ax.plot(res["after"]["alphas"], res["after"]["loss"], "s-", label=f"A↔B' matched (barrier {res['barrier_after']:.3f})")
    ax.set_xlabel("α  ((1−α)·A + α·B)")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def pico_pair(work: Path) -> tuple[Path, Path, Path]:
    """The test's two pico models from two seeds and a held-out text of the same generator."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import make_text, save_pico
    from test_weightspace import NORMAL, train

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    a = train(save_pico(work / "init1", "llama", seed=1), work / "a", seed=1, text_seed=7)
    b = train(save_pico(work / "init2", "llama", seed=2), work / "b", seed=2, text_seed=7)
    text = work / "eval.txt"
    text.write_text(make_text(6000, 123, NORMAL))
    return a, b, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", nargs="?")
    ap.add_argument("b", nargs="?")
    ap.add_argument("--pico", action="store_true", help="train the two pico models of tests/test_weightspace.py and use them")
    ap.add_argument("--text")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--name", default="align")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-residual", dest="residual", action="store_false")
    ap.add_argument("--restarts", type=int, default=8, help="seeded descents, the best match kept (default 8)")
    a = ap.parse_args()
    if a.pico:
        tmp = Path(tempfile.mkdtemp(prefix="bench-align-pico-"))
        try:
            ma, mb, text = pico_pair(tmp)
            res = run(ma, mb, text, Path(a.out_dir), a.name, 32, 16, tmp / "work", a.residual,
                      labels=("pico llama, seed 1", "pico llama, seed 2", "generated text, held-out seed"), restarts=a.restarts)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        if not (a.a and a.b and a.text):
            ap.error("give A B --text FILE, or --pico")
        res = run(Path(a.a), Path(a.b), Path(a.text), Path(a.out_dir), a.name, a.seqlen, a.windows,
                  Path(a.work) if a.work else None, a.residual, restarts=a.restarts)
    print(json.dumps({k: res[k] for k in ("barrier_before", "barrier_after", "seconds", "plot")}))


if __name__ == "__main__":
    main()
