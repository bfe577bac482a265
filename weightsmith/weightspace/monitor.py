"""``weightsmith monitor DIFF_DIR TUNED --text FILE``: score inputs by how strongly they drive a fine-tune's update.

After "Watch the Weights: Unsupervised monitoring and control of fine-tuned LLMs" (Zhong & Raghunathan,
2025). ``weightsmith diff`` stored, per matrix, the top-K singular triplets (U, S, V) of
ΔW = W_tuned − W_base. Hooks on each of those linear layers of the tuned model (stored matrices that
are not a linear layer's weight — embeddings — are skipped and listed) give, per token t:

- ``side="input"`` (default): a forward pre-hook captures the layer's input x_t and
  r_ℓ,t = ‖S ⊙ (Vᵀ x_t)‖ / (σ₁ ‖x_t‖) = ‖ΔW_K x_t‖ / (‖ΔW_K‖₂ ‖x_t‖) ∈ [0, 1], how much of the
  (rank-K) update the token's input excites, relative to the most it could;
- ``side="output"``: the paper's reading — a forward hook captures the layer's output y_t and
  r_ℓ,t = max_j |u_jᵀ y_t| / ‖y_t‖, the largest cosine with a left singular direction (the paper
  reads the residual stream after the block, with the directions of o_proj and down_proj; here it is
  each layer's own output, which for o_proj / down_proj is what the block writes to the residual).

A text's score on layer ℓ is the maximum over its tokens, s_ℓ = max_t r_ℓ,t (a behaviour triggered by
a few tokens shows at those tokens). With ``calib`` (clean texts, one per line: the paper's
calibration on ordinary data), each layer's score is divided by its maximum over the calibration
texts, and a text is *flagged* when some layer exceeds 1 (outside the range seen on clean data). The
text's score is the mean over the monitored layers (``aggregate="max"``: the maximum). No labels are
used to score. With labels (1 = the input should trigger the fine-tuned behaviour), the AUROC of the
scores is reported — the Mann–Whitney statistic with tied scores given their average rank (a tie
between a positive and a negative counts ½) — and, with ``calib``, the flag rate of each class.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..validate import compile_regex
from .diff import DIRECTIONS, SUMMARY


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative) + ½ P(equal)."""
    s = [float(x) for x in scores]
    y = [int(v) for v in labels]
    if len(s) != len(y):
        raise WeightsmithError(f"{len(s)} scores but {len(y)} labels")
    if any(v not in (0, 1) for v in y):
        raise WeightsmithError("labels must be 0 or 1")
    pos = sum(y)
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        raise WeightsmithError(f"AUROC needs both classes; the labels have {pos} positive(s) and {neg} negative(s)")
    order = sorted(range(len(s)), key=lambda i: s[i])
    ranks = [0.0] * len(s)
    i = 0
    while i < len(order):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rsum = sum(r for r, v in zip(ranks, y) if v == 1)
    return (rsum - pos * (pos + 1) / 2) / (pos * neg)


def read_lines(path: str | Path, what: str) -> list[str]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise WeightsmithError(f"{what} file {p} does not exist") from None
    except UnicodeDecodeError:
        raise WeightsmithError(f"{what} file {p} is not UTF-8 text") from None
    except OSError as e:
        raise WeightsmithError(f"cannot read {what} file {p}: {e.strerror}") from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise WeightsmithError(f"{what} file {p} has no non-empty line")
    return lines


def read_labels(path: str | Path) -> list[int]:
    out = []
    for i, ln in enumerate(read_lines(path, "labels"), 1):
        v = ln.strip()
        if v not in ("0", "1"):
            raise WeightsmithError(f"labels file {path}: line {i} is {v!r}, not 0 or 1")
        out.append(int(v))
    return out


def load_directions(diff_dir: str | Path, match: str | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``diff.json`` and, per matrix (regex ``match`` on its name), its U, S, V from ``directions.safetensors``."""
    from safetensors.torch import load_file

    d = Path(diff_dir)
    if not (d / SUMMARY).is_file() or not (d / DIRECTIONS).is_file():
        raise WeightsmithError(f"{d} is not a `weightsmith diff --out` directory (no {SUMMARY} / {DIRECTIONS})")
    try:
        summary = json.loads((d / SUMMARY).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsmithError(f"{d / SUMMARY} is not valid JSON: {e}") from None
    from ..model.source import _read_header

    _read_header(d / DIRECTIONS)  # the whole header checked before anything is loaded
    t = load_file(str(d / DIRECTIONS))
    pat = None if match is None else compile_regex(match, "--match")
    dirs = {}
    for r in summary.get("matrices", []):
        k = r["name"]
        if pat is not None and not pat.search(k):
            continue
        if any(f"{k}.{x}" not in t for x in "USV"):
            raise WeightsmithError(f"{d / DIRECTIONS} lacks the directions of {k}")
        dirs[k] = {x: t[f"{k}.{x}"].float() for x in "USV"}
    if not dirs:
        raise WeightsmithError(f"{d}: no stored directions" + (f" match {match!r}" if match else ""))
    return summary, dirs


class _Scorer:
    """Hooks on the monitored linear layers; ``run(ids)`` → {matrix: max over tokens of r}."""

    def __init__(self, model, dirs: dict, side: str):
        self.cur: dict[str, float] = {}
        self.hooks = []
        modules = dict(model.named_modules())
        for k, d in dirs.items():
            mod = modules[k[: -len(".weight")] if k.endswith(".weight") else k]
            if side == "input":
                sv, s1 = (d["V"] * d["S"]).contiguous(), float(d["S"][0])  # n × K: (Vᵀx)·S in one product

                def pre(m, args, name=k, sv=sv, s1=s1):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    self.cur[name] = float(((x @ sv).norm(dim=1) / (s1 * x.norm(dim=1).clamp_min(1e-30))).max())

                self.hooks.append(mod.register_forward_pre_hook(pre))
            else:
                u = d["U"].contiguous()

                def post(m, args, out, name=k, u=u):
                    y = out.detach().float().reshape(-1, out.shape[-1])
                    self.cur[name] = float(((y @ u).abs().amax(dim=1) / y.norm(dim=1).clamp_min(1e-30)).max())

                self.hooks.append(mod.register_forward_hook(post))

    def run(self, model, ids) -> dict[str, float]:
        self.cur.clear()
        model(ids)
        return dict(self.cur)

    def close(self):
        for h in self.hooks:
            h.remove()


def monitor(diff_dir: str | Path, tuned: str | Path, text: str | Path, labels: str | Path | None = None, *,
            calib: str | Path | None = None, side: str = "input", aggregate: str = "mean", match: str | None = None,
            seqlen: int = 512, per_layer: bool = False, progress: bool = False) -> dict:
    """Score each non-empty line of ``text`` (module docstring); ``labels``: one 0/1 per non-empty line;
    ``calib``: clean texts whose per-layer maxima normalise the scores and set the flags."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..safety import from_pretrained

    if seqlen < 1:
        raise WeightsmithError(f"--seqlen must be at least 1, got {seqlen}")
    if aggregate not in ("mean", "max"):
        raise WeightsmithError(f"--aggregate must be mean or max, not {aggregate!r}")
    if side not in ("input", "output"):
        raise WeightsmithError(f"--side must be input or output, not {side!r}")
    if Path(tuned).is_file():
        raise WeightsmithError(f"monitor runs the tuned model with hooks: give it as a Hugging Face directory, not the file {tuned}")
    texts = read_lines(text, "text")
    y = read_labels(labels) if labels is not None else None
    if y is not None and len(y) != len(texts):
        raise WeightsmithError(f"{len(texts)} texts but {len(y)} labels (one per non-empty line each)")
    clean = read_lines(calib, "calibration") if calib is not None else None
    summary, dirs = load_directions(diff_dir, match)
    from ..model.source import CheckpointSource

    with CheckpointSource(tuned) as src:  # refuse a wrong model before loading it
        for k, d in dirs.items():
            if k not in src.index:
                raise WeightsmithError(f"{tuned} has no tensor {k} (the diff in {diff_dir} was made for another architecture)")
            if tuple(src.shape(k)) != (d["U"].shape[0], d["V"].shape[0]):
                raise WeightsmithError(f"{k}: shape {tuple(src.shape(k))} in {tuned} but the stored directions are for "
                                       f"{(d['U'].shape[0], d['V'].shape[0])}")
        same = src.fingerprint().get("files") == (summary.get("tuned_fingerprint") or {}).get("files")
    model = from_pretrained(AutoModelForCausalLM, tuned, dtype=torch.float32).eval()
    tok = from_pretrained(AutoTokenizer, tuned)
    modules = dict(model.named_modules())
    skipped = [k for k in dirs if not isinstance(modules.get(k[: -len(".weight")] if k.endswith(".weight") else k), torch.nn.Linear)]
    for k in skipped:  # embeddings and other non-linear matrices have no activations to project
        del dirs[k]
    if not dirs:
        raise WeightsmithError(f"none of the matrices in {diff_dir} is the weight of a linear layer of {tuned}")
    scorer = _Scorer(model, dirs, side)

    def score_all(lines: list[str], what: str) -> list[tuple[int, dict[str, float]]]:
        out = []
        it = lines
        if progress:
            from tqdm import tqdm

            it = tqdm(lines, desc=what, unit="text")
        for i, t in enumerate(it):
            ids = tok(t, return_tensors="pt").input_ids[:, :seqlen]
            if ids.numel() == 0:
                raise WeightsmithError(f"{what} line {i + 1} tokenizes to nothing")
            out.append((int(ids.shape[1]), scorer.run(model, ids)))
        return out

    try:
        with torch.no_grad():
            base = None
            if clean is not None:
                cal = score_all(clean, "calibration")
                base = {k: max(c[k] for _, c in cal) for k in dirs}
            scored = score_all(texts, "monitor")
    finally:
        scorer.close()
    rows = []
    for i, (n, cur) in enumerate(scored):
        per = {k: cur[k] / base[k] if base is not None and base[k] > 0 else cur[k] for k in dirs}
        vals = list(per.values())
        top = max(per, key=per.get)
        row = {"index": i, "score": sum(vals) / len(vals) if aggregate == "mean" else max(vals), "tokens": n,
               "top_layer": top, "top_layer_score": per[top]}
        if base is not None:
            row["flagged"] = per[top] > 1.0
        if per_layer:
            row["layers"] = per
        rows.append(row)
    res = {"diff": str(diff_dir), "tuned": str(tuned), "side": side, "layers": len(dirs), "aggregate": aggregate, "texts": len(rows),
           "tuned_matches_diff": same, "skipped": skipped, "scores": rows}
    if base is not None:
        res["calibration_texts"] = len(clean)
        res["flagged"] = sum(r["flagged"] for r in rows)
    if y is not None:
        for r, v in zip(rows, y):
            r["label"] = v
        res["auroc"] = auroc([r["score"] for r in rows], y)
        res["positives"] = sum(y)
        if base is not None:
            fl = [r["flagged"] for r in rows]
            res["flag_rate_positives"] = sum(f for f, v in zip(fl, y) if v) / sum(y)
            res["flag_rate_negatives"] = sum(f for f, v in zip(fl, y) if not v) / (len(y) - sum(y))
    return res


def json_lines(res: dict) -> str:
    from ..validate import dumps

    lines = [dumps(r) for r in res["scores"]]
    lines.append(dumps({k: v for k, v in res.items() if k != "scores"}))
    return "\n".join(lines)
