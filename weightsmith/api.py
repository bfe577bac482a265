"""The Python API: ``quantize(model, config, calibration, out=...)`` and ``evaluate(...)``."""
from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .config import QuantizeConfig, build_config
from .errors import WeightsmithError
from .model.adapter import LazyModel
from .model.source import CheckpointSource
from .engine.streamer import CALIBRATED
from .quant import registry
from .report import peak_rss_mb, summarize, versions, write_report

log = logging.getLogger(__name__)


def _release_freed_memory_promptly() -> None:
    """glibc keeps freed blocks below a dynamic threshold (up to 32 MB) in its heap, so activation
    buffers freed block after block stay resident. A fixed 128 KiB mmap threshold returns them to
    the system at once; it changes no result. No-op elsewhere than glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _as_config(config: QuantizeConfig | dict | None) -> QuantizeConfig:
    if isinstance(config, QuantizeConfig):
        return config
    return build_config(config or {})


SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantize(
    model: str | Path,
    config: QuantizeConfig | dict | None = None,
    calibration: str | Path | torch.Tensor | None = None,
    *,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    save_dtype: str | None = None,
    allow_large_weights: bool = False,
) -> dict:
    """Quantize the checkpoint at ``model`` (HF directory or .gguf) into the HF directory ``out``.

    ``calibration`` is a text file / .jsonl / directory (overrides ``config.calib.path``), a
    LongTensor of token windows (n, seqlen), or None (use ``config.calib``; with no path there,
    text sampled from the model). Returns the report, also written to ``out/report.json``.

    The run works in ``OUT.partial/`` and commits every finished block there; ``resume=True``
    continues an interrupted run of the same job (see ``engine/checkpoint.py``). ``save_dtype``
    (``bfloat16``/``float16``/``float32``) stores the floating tensors in that dtype instead of the
    checkpoint's. A weight of NaN/Inf stops the run, and so does one of magnitude above
    ``validate.WEIGHT_LIMIT`` unless ``allow_large_weights``. Under ``torchrun`` (``WORLD_SIZE`` > 1) the calibration samples are shared
    between the ranks (``engine/distributed.py``); rank 0 writes the output.
    """
    t0 = time.time()
    _release_freed_memory_promptly()
    cfg = _as_config(config)
    if isinstance(calibration, (str, Path)):
        cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"path": str(calibration)})})
    from .safety import check_output
    from .validate import check_device, check_regexes

    check_device(cfg.device)
    check_regexes(cfg.ignore)
    out = Path(out)
    check_output(out, [model, cfg.calib.path], overwrite=overwrite, extra=[out.parent / f"{out.name}.partial"])
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise WeightsmithError(f"save dtype {save_dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    sdt = SAVE_DTYPES.get(save_dtype) if save_dtype else None
    from .engine import distributed

    dist = distributed.init_from_env(cfg.device)
    try:
        if dist is not None and dist.device.type == "cuda":
            cfg = cfg.model_copy(update={"device": str(dist.device)})
        return _quantize(model, cfg, calibration, Path(out), overwrite, progress, resume, sdt, dist, t0, allow_large_weights)
    finally:
        distributed.shutdown(dist)


def _quantize(model, cfg: QuantizeConfig, calibration, out: Path, overwrite: bool, progress: bool, resume: bool,
              sdt: torch.dtype | None, dist, t0: float, allow_large_weights: bool = False) -> dict:
    from .engine.checkpoint import Checkpointer, WorkDir, digest
    from .engine.streamer import stream_quantize

    rank0 = dist is None or dist.rank == 0
    progress = progress and rank0
    with CheckpointSource(model) as source, contextlib.ExitStack() as stack:
        lm = LazyModel(source, cfg.device)
        if allow_large_weights:
            lm.weight_limit = None
        from .validate import check_seqlen

        if cfg.needs() & CALIBRATED:
            check_seqlen(lm.model, int(calibration.shape[-1]) if isinstance(calibration, torch.Tensor) and calibration.ndim
                         else cfg.calib.seqlen)

        def make_work() -> WorkDir:
            w = WorkDir(out, overwrite, resume)  # takes the lock on OUT before anything is touched
            try:
                done = sum(f.stat().st_size for f in w.tmp.rglob("*") if f.is_file()) if resume and w.tmp.is_dir() else 0
                w.check_space(_output_bytes(source, lm, cfg, calibration, sdt) - done)  # a resume needs only the rest
            except BaseException:
                w.release()
                raise
            return w

        needs = cfg.needs()
        planner = next((s for s in cfg.steps if registry.get(s.name).kind == "planner"), None)
        if planner is not None and dist is not None:
            raise WeightsmithError(f"{planner.name} (a planner) does not run data-parallel yet; run it in one process")
        work = _on_rank0(dist, make_work)
        if work is not None:
            stack.callback(work.release)  # held through calibration, until the work directory is closed
        if needs & CALIBRATED:
            ids, calib_source = _on_rank0(dist, lambda: _calibration(cfg, source, lm, calibration, progress)) or (None, None)
            if dist is not None:
                ids = dist.broadcast_ids(ids)
        else:  # a data-free recipe: no calibration text is read, sampled or run
            ids, calib_source = None, {"kind": "none", "why": f"no step of {cfg.recipe} needs calibration data"}
            if calibration is not None or cfg.calib.path is not None:
                log.info("the recipe %s needs no calibration data: the calibration given is not used", cfg.recipe)
        key = {"config": {k: v for k, v in cfg.to_dict().items() if k != "device"}, "input": source.fingerprint(),
               "calibration": digest(ids) if ids is not None else None, "world_size": 1 if dist is None else dist.world,
               "save_dtype": str(sdt).removeprefix("torch.") if sdt else None}
        if dist is not None and ids is not None:
            ids = dist.share(ids)
        tmp = _on_rank0(dist, lambda: stack.enter_context(work))
        rules, plan = None, None
        if planner is not None:
            rules, plan = _plan(lm, cfg, planner, ids, tmp, key, resume, progress)
            key["plan"] = digest([r.model_dump() for r in rules])
        if not rank0:  # rank 0 has made OUT.partial; on a filesystem not shared with it, keep this rank's state locally
            tmp = out.parent / f"{out.name}.partial"
            if not tmp.is_dir():
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weightsmith-rank-")))
        ckpt = Checkpointer(tmp, key, len(lm.blocks), rank=0 if dist is None else dist.rank,
                            world=1 if dist is None else dist.world, resume=resume,
                            barrier=dist.barrier if dist is not None else None)
        grads = _gradients(lm, cfg, ids, tmp, progress, source, rules) if needs & {"block_fisher", "weight_fisher"} else None
        res = stream_quantize(lm, cfg, ids, tmp, progress=progress, save_dtype=sdt, ckpt=ckpt, dist=dist, rules=rules, grads=grads)
        if not rank0:
            return {"rank": dist.rank, "blocks_computed": res.computed}
        for f in source.aux_files():
            shutil.copy2(f, tmp / f.name)
        if sdt is not None:
            _set_config_dtype(tmp / "config.json", sdt)
        report = {
            "command": "quantize",
            "model": str(model),
            "output": str(out),
            "config": cfg.to_dict(),
            "save_dtype": key["save_dtype"],
            "versions": versions(),
            "calibration": calib_source,
            "ranks": key["world_size"],
            "blocks": res.blocks,
            "blocks_computed": res.computed,
            "resumed_from_block": res.blocks - res.computed if res.computed < res.blocks else None,
            "unquantized_layers": res.unreached,
            "skipped_layers": res.skipped,
            **({"plan": plan} if plan is not None else {}),
            "wall_time_s": round(time.time() - t0, 2),
            "peak_rss_mb": peak_rss_mb(),
            "summary": summarize(res.layers, cfg.steps),
            "layers": res.layers,
        }
        write_report(tmp, report)
    log.info("wrote %s in %.1f s (peak RSS %.0f MB)", out, report["wall_time_s"], report["peak_rss_mb"])
    return report


PLAN_FILE = "plan.json"


def _gradients(lm: LazyModel, cfg: QuantizeConfig, ids: torch.Tensor, tmp: Path, progress: bool, source=None,
               rules: list | None = None) -> dict:
    """The gradient needs (``block_fisher``, ``weight_fisher``): the whole-model gradient passes
    (``engine/fisher.py``) for the step that asks, with what its config's ``gradient_request()`` gives
    (block size, windows, memory per pass, a domain calibration source) — or the step's own
    ``gradients`` hook when it registered one (its statistics over several rounds, say)."""
    from .engine.fisher import block_fisher, weight_fisher

    names = [l.name for i in range(len(lm.blocks)) for l in lm.layers(i, cfg.ignore)]
    out: dict = {}
    for need in ("block_fisher", "weight_fisher"):
        asking = [s for s in cfg.steps if need in registry.get(s.name).needs(s)]
        if not asking:
            continue
        if len(asking) > 1:
            raise WeightsmithError(f"two steps of the recipe need the {need.replace('_', ' ')}; give one of them")
        step = asking[0]
        req = step.gradient_request()
        n = int(req.get("samples") or ids.shape[0])
        hook = registry.get(step.name).gradients
        if hook is not None:
            out.update(hook(lm, cfg, step, ids[:n], names, tmp / "fisher", progress, list(rules or [])))
            continue
        if need == "block_fisher":
            out[need] = block_fisher(lm, ids[:n], names, req["block"], memory_mb=req["memory_mb"], directory=tmp / "fisher", progress=progress)
            continue
        if not req.get("domain_calib"):
            raise WeightsmithError(f"{req.get('step', 'the step')} needs a domain calibration text: give domain_calib=PATH (--domain-calib PATH)")
        dcfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"path": str(req["domain_calib"])})})
        dom, _ = _calibration(dcfg, source, lm, None, progress)
        out["grad_general"], out["fisher_general"] = weight_fisher(lm, ids[:n], names, progress=progress, desc="general gradients")
        out["grad_domain"], out["fisher_domain"] = weight_fisher(lm, dom[:n], names, progress=progress, desc="domain gradients")
    return out


def _plan(lm: LazyModel, cfg: QuantizeConfig, planner, ids: torch.Tensor, tmp: Path, key: dict, resume: bool, progress: bool):
    """Measure → plan: the planner's first pass and its per-layer rules, kept in ``OUT.partial/plan.json``
    (with the job key it was made for), so a resumed run applies the same plan without measuring again."""
    import json

    from .config import Rule
    from .engine.checkpoint import _write_json_atomic
    from .engine.streamer import measure_pass

    path = tmp / PLAN_FILE
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsmithError(f"cannot resume: {path} is corrupt; pass --overwrite to start over") from None
        if saved.get("key") == key:
            log.info("resuming with the plan measured before (%s)", path)
            return [Rule(**r) for r in saved["rules"]], saved["plan"]
    t0 = time.time()
    spec = registry.get(planner.name)
    fisher = None
    if "out_fisher" in spec.planner.needs_of(planner):
        from .engine.fisher import output_fisher

        req = planner.gradient_request() if hasattr(planner, "gradient_request") else {}
        n = int(req.get("samples") or ids.shape[0])
        names = [l.name for i in range(len(lm.blocks)) for l in lm.layers(i, cfg.ignore)]
        fisher = output_fisher(lm, ids[:n], names, progress=progress, labels=req.get("labels", "data"))
    measurements = measure_pass(lm, cfg, ids, planner, progress, fisher=fisher)
    rules, summary = spec.planner.plan(measurements, planner, cfg)
    plan = {**summary, "measure_seconds": round(time.time() - t0, 2)}
    _write_json_atomic(path, {"key": key, "rules": rules, "plan": plan, "measurements": measurements})
    return [Rule(**r) for r in rules], plan


def _on_rank0(dist, fn):
    """``fn()`` (on rank 0 only in a data-parallel run); if it raises, every rank stops, none waits."""
    err, val = None, None
    if dist is None or dist.rank == 0:
        try:
            val = fn()
        except WeightsmithError as e:
            err = e
    if dist is not None:
        try:
            dist.agree(err is None, "rank 0 stopped with an error (see its message)")
        except WeightsmithError:
            if err is None:
                raise
    if err is not None:
        raise err
    return val


def _output_bytes(source: CheckpointSource, lm: LazyModel, cfg: QuantizeConfig, calibration: Any, sdt: torch.dtype | None) -> int:
    """Disk the run needs: the output tensors in their stored dtype, and two generations of the
    resume state (the hidden states of all calibration tokens, float32, and of the samples that
    also carry the float path when the method has one)."""
    from .engine.streamer import CALIBRATED, FLOAT_PATH, float_chunks
    from .model.saving import stored_dtype

    weights = 0
    for key in source.keys():
        n = 1
        for d in source.shape(key):
            n *= d
        weights += n * stored_dtype(source.dtype(key), sdt).itemsize
    needs = cfg.needs()
    if not needs & CALIBRATED:
        samples, tokens = 0, 0
    elif isinstance(calibration, torch.Tensor):  # not validated yet: any shape
        samples, tokens = (int(calibration.shape[0]) if calibration.ndim else 1), calibration.numel()
    else:
        samples, tokens = cfg.calib.nsamples, cfg.calib.nsamples * cfg.calib.seqlen
    if needs & FLOAT_PATH and samples:  # float_hidden is committed beside hidden
        tokens += tokens * min(samples, float_chunks(cfg, -(-samples // cfg.chunk_size)) * cfg.chunk_size) // samples
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    state = 2 * tokens * int(getattr(text, "hidden_size", 0) or 0) * 4
    return int(weights * 1.02) + state + 2**20


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Record the stored dtype in the output's config.json (what transformers loads by default)."""
    import json

    if path.is_file():
        data = json.loads(path.read_text())
        name = str(dtype).removeprefix("torch.")
        data["dtype" if "dtype" in data or "torch_dtype" not in data else "torch_dtype"] = name
        path.write_text(json.dumps(data, indent=2) + "\n")


def _calibration(cfg: QuantizeConfig, source: CheckpointSource, lm: LazyModel, calibration: Any, progress: bool):
    vocab = getattr(lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config, "vocab_size", None)
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        if ids.ndim != 2 or ids.numel() == 0:
            raise WeightsmithError("calibration tensor must be (nsamples, seqlen) token ids")
        if vocab is not None and int(ids.max()) >= vocab:
            raise WeightsmithError(f"calibration token id {int(ids.max())} >= vocab size {vocab}")
        return ids, {"kind": "tensor", "nsamples": ids.shape[0], "seqlen": ids.shape[1]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calib import build_calibration
    from .safety import from_pretrained

    try:
        tok = from_pretrained(AutoTokenizer, source.dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise WeightsmithError(f"cannot load the tokenizer of {source.origin}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def load_model():
        from .eval.loading import model_kind

        if model_kind(lm.config) != "causal":
            raise WeightsmithError(f"no calibration text given and {source.origin} is not a causal LM that can write its own; pass --calib FILE")
        return from_pretrained(AutoModelForCausalLM, source.dir, dtype=torch.float32).eval()

    calib = build_calibration(cfg.calib, tok, load_model, progress=progress, vocab_size=vocab, fingerprint=source.fingerprint())
    gc.collect()
    return calib.ids, calib.source
