"""The merge driver: N checkpoints in, one out, one tensor at a time.

For each output tensor (in the order of :mod:`merge.plan`) the method reads its inputs through
``CheckpointSource`` — plain file reads of that tensor only, safetensors and GGUF alike — and the
result goes straight into the open output shard (``model/saving.py`` ``StreamingShard``: the
shard's header is written first, every tensor's bytes as they come), so the resident memory is the
inputs of one tensor and the method's work on them, whatever the size of the model or the shards.

The output is written in ``OUT.partial`` (``engine/checkpoint.py`` ``WorkDir``: the lock on OUT,
nothing half-written, OUT appears complete in one rename). After each shard is fsync'ed a manifest
is replaced atomically; ``resume=True`` keeps the shards an interrupted run of the same job
committed (same config, seed, inputs and shard plan) and continues after them. Config and tokenizer
files come from the base (or the first model), the tokenizer from ``tokenizer_source`` when given.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ..engine.checkpoint import MANIFEST, _write_json_atomic  # MANIFEST: the name WorkDir keeps an interrupted run by
from ..errors import WeightsmithError
from ..model.source import CheckpointSource
from .config import MergeConfig, load_config
from .plan import Plan, TensorPlan, build_plan
from .registry import Input, TensorJob

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
MANIFEST_FORMAT = 1
TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")


def is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in TOKENIZER_FILES


def merge(config, out, *, overwrite: bool = False, resume: bool = False, seed: int = 0, progress: bool = True,
          shard_bytes: int = SHARD_BYTES) -> dict:
    """Merge the models of ``config`` (a mergekit-style YAML path or text, a dict, or a
    :class:`MergeConfig`) into the Hugging Face directory ``out``. Returns the report (also in
    ``out/report.json``). ``seed`` seeds the random methods (DARE) per tensor and model."""
    from ..api import _release_freed_memory_promptly
    from ..engine.checkpoint import WorkDir
    from ..report import peak_rss_mb, versions
    from ..safety import check_output
    from ..validate import dumps

    t0 = time.time()
    _release_freed_memory_promptly()
    cfg, text, cfg_path = load_config(config)
    out = Path(out)
    names = cfg.model_names()
    paths = {n: cfg.resolve(n) for n in names}
    tok_path = cfg.resolve(cfg.tokenizer_source) if cfg.tokenizer_source not in (None, "base") else None
    check_output(out, [*paths.values(), cfg_path, tok_path], overwrite=overwrite, extra=[out.parent / f"{out.name}.partial"])
    with contextlib.ExitStack() as stack:
        sources = {n: stack.enter_context(CheckpointSource(paths[n])) for n in names}
        plan = build_plan(cfg, sources, paths)
        tok_files = _tokenizer_files(plan, sources, tok_path)
        shards = split_shards(plan.tensors, shard_bytes)
        key = {"config": cfg.to_dict(), "seed": seed if plan.method.seeded else None,
               "inputs": [sources[n].fingerprint() for n in names], "shards": [[t.key for t in s] for s in shards]}
        work = WorkDir(out, overwrite, resume)
        fit = None
        try:
            total = sum(t.nbytes for t in plan.tensors)
            work.check_space(int(total * 1.01) + 2**20)
            prepared = None
            if plan.method.prepare is not None:  # a whole-model pass (aTLAS' fit), OUT locked, before any tensor is written
                from ..engine.checkpoint import digest

                prepared = _prepared(work.tmp, key, resume)
                if prepared is None:
                    plan.context, fit = plan.method.prepare(cfg, plan, sources, seed, progress)
                    prepared = {"key": dict(key), "context": plan.context, "fit": fit}
                else:
                    plan.context, fit = prepared["context"], prepared["fit"]
                key["fit"] = digest(fit)
        except BaseException:
            work.release()
            raise
        with work as tmp:
            if prepared is not None:  # kept beside the shards: --resume does not fit again
                _write_json_atomic(tmp / PREPARED, prepared)
            done = _restore(tmp, key, resume)
            computed = _write_shards(plan, sources, shards, tmp, key, done, seed, progress)
            donor = sources[names[plan.donor]]
            for f in donor.aux_files():
                if not (tok_files is not None and is_tokenizer_file(f.name)) and f.name not in ("merge_config.yaml",):
                    shutil.copy2(f, tmp / f.name)
            for f in tok_files or []:
                shutil.copy2(f, tmp / f.name)
            _set_config_dtype(tmp / "config.json", plan)
            (tmp / "merge_config.yaml").write_text(text if text is not None else _dump_yaml(cfg), encoding="utf-8")
            report = {
                "command": "merge",
                "output": str(out),
                "merge_method": plan.method.name,
                "reference": plan.method.reference,
                "base_model": cfg.base_model,
                "models": names,
                "config": cfg.to_dict(),
                "seed": seed if plan.method.seeded else None,
                "tensors": len(plan.tensors),
                "layers": plan.n_layers,
                "shards": len(shards),
                "shards_computed": computed,
                "resumed_from_shard": done if done else None,
                "output_bytes": total,
                **({"fit": fit} if fit is not None else {}),
                "versions": versions(),
                "wall_time_s": round(time.time() - t0, 2),
                "peak_rss_mb": peak_rss_mb(),
            }
            (tmp / "report.json").write_text(dumps(report, indent=2) + "\n")
            (tmp / PREPARED).unlink(missing_ok=True)  # a resume aid, not part of the output
    log.info("merged %d models (%s) into %s in %.1f s (peak RSS %.0f MB)", len(names), plan.method.name, out,
             report["wall_time_s"], report["peak_rss_mb"])
    return report


def split_shards(tensors: list[TensorPlan], limit: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def make_job(tp: TensorPlan, plan: Plan, sources: dict[str, CheckpointSource], seed: int) -> TensorJob:
    inputs = []
    for pi in tp.inputs:
        name = plan.models[pi.model]
        inputs.append(Input(name, pi.model, pi.params, pi.is_base, _loader(sources[name], tp.key, tp.compute_dtype, name)))
    return TensorJob(tp.key, tp.shape, inputs, tp.params, tp.compute_dtype, seed, plan.context)


def _loader(src: CheckpointSource, key: str, dtype: torch.dtype, name: str):
    def load() -> torch.Tensor:
        t = src.get(key)
        t = t.to(dtype) if t.dtype != dtype else t
        if not all_finite(t):
            raise WeightsmithError(f"model {name!r} has NaN/Inf values in {key}: it cannot be merged")
        return t
    return load


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one summing pass (a NaN or Inf anywhere makes the sum non-finite), and
    the element-wise test only when the sum is not finite (finite values may overflow it)."""
    return t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))\
        or bool(torch.isfinite(t).all())


def run_tensor(tp: TensorPlan, plan: Plan, sources: dict[str, CheckpointSource], seed: int) -> torch.Tensor:
    if tp.copy:
        return sources[plan.models[tp.inputs[0].model]].get(tp.key)
    res = plan.method.fn(make_job(tp, plan, sources, seed))
    if tuple(res.shape) != tp.shape:
        raise RuntimeError(f"{plan.method.name} returned shape {tuple(res.shape)} for {tp.key} {tp.shape}")
    if not all_finite(res):
        raise WeightsmithError(f"{plan.method.name} produced NaN/Inf in {tp.key}; check the parameters (weights summing to 0?)")
    return res.to(tp.out_dtype)


def _write_shards(plan: Plan, sources, shards, tmp: Path, key: dict, done: int, seed: int, progress: bool) -> int:
    from tqdm import tqdm

    from ..model.saving import ShardWriter

    writer = ShardWriter(tmp, len(shards))
    bar = tqdm(total=sum(t.nbytes for t in plan.tensors), unit="B", unit_scale=True, desc=f"merge ({plan.method.name})",
               disable=not progress, file=sys.stderr, leave=False)
    computed = 0
    try:
        for k, shard in enumerate(shards):
            if k < done:
                writer.adopt(k)
                bar.update(sum(t.nbytes for t in shard))
                continue
            f = writer.stream(k, [(t.key, t.out_dtype, t.shape) for t in shard])
            try:
                for t in shard:
                    f.write(t.key, run_tensor(t, plan, sources, seed))
                    bar.update(t.nbytes)
            except BaseException:
                f.abort()
                raise
            f.close()
            _commit(tmp, key, k + 1)
            computed += 1
    finally:
        bar.close()
    writer.finish()
    return computed


def _commit(tmp: Path, key: dict, committed: int) -> None:
    _write_json_atomic(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "kind": "merge", "key": key, "committed": committed})


PREPARED = "prepared.json"


def _prepared(tmp: Path, key: dict, resume: bool) -> dict | None:
    """With ``resume``, what the method's whole-model pass gave an interrupted run of the same job
    (``OUT.partial/prepared.json``: its context and report), else None: the pass runs again."""
    path = tmp / PREPARED
    if not resume or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsmithError(f"cannot resume: {path} is corrupt; pass --overwrite to start over") from None
    if not isinstance(saved, dict) or saved.get("key") != json.loads(json.dumps(key)) or "context" not in saved or "fit" not in saved:
        log.info("the interrupted run's whole-model pass (%s) was for another job: running it again", path)
        return None
    log.info("resuming with the whole-model pass of the interrupted run (%s)", path)
    return saved


def _restore(tmp: Path, key: dict, resume: bool) -> int:
    """The number of shards an interrupted run of the same job committed (0 without ``resume``)."""
    from ..engine.checkpoint import _first_difference

    path = tmp / MANIFEST
    if not resume or not path.is_file():
        return 0
    try:
        man = json.loads(path.read_text())
        k = int(man["committed"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise WeightsmithError(f"cannot resume: {path} is corrupt; pass --overwrite to start over") from None
    if man.get("format") != MANIFEST_FORMAT or man.get("kind") != "merge":
        raise WeightsmithError(f"cannot resume: {tmp} holds another kind of run; pass --overwrite to start over")
    diff = _first_difference(man.get("key", {}), key)
    if diff:
        raise WeightsmithError(f"cannot resume {tmp}: {diff} differs from the interrupted merge's; pass --overwrite to start over")
    log.info("resuming the merge in %s after %d committed shard(s)", tmp, k)
    return k


def _tokenizer_files(plan: Plan, sources, tok_path: Path | None) -> list[Path] | None:
    """The tokenizer files of ``tokenizer_source`` (None: the donor's), after checking that its
    vocabulary is the donor's — the embedding rows are merged as they are, never permuted."""
    if tok_path is None:
        return None
    from transformers import AutoTokenizer

    from ..safety import from_pretrained

    donor = sources[plan.models[plan.donor]]
    d = tok_path if tok_path.is_dir() else None
    if d is None:
        raise WeightsmithError(f"tokenizer_source {tok_path} is not a directory")
    try:
        mine, theirs = from_pretrained(AutoTokenizer, donor.dir).get_vocab(), from_pretrained(AutoTokenizer, d).get_vocab()
    except WeightsmithError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise WeightsmithError(f"cannot load the tokenizer of {d}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if mine != theirs:
        raise WeightsmithError(f"tokenizer_source {d} has another vocabulary than {plan.models[plan.donor]!r} ({len(theirs)} vs "
                               f"{len(mine)} tokens or other ids); remapping embedding rows to a new vocabulary is not supported")
    return [f for f in sorted(d.iterdir()) if f.is_file() and is_tokenizer_file(f.name)]


def _set_config_dtype(path: Path, plan: Plan) -> None:
    """The output's config.json names the dtype most of its weights are stored in."""
    from collections import Counter

    from ..api import _set_config_dtype as set_dtype

    floats = Counter()
    for t in plan.tensors:
        if t.out_dtype.is_floating_point:
            floats[t.out_dtype] += t.nbytes
    if floats and path.is_file():
        set_dtype(path, floats.most_common(1)[0][0])


def _dump_yaml(cfg: MergeConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
