"""BlockStreamer: a checkpoint through a recipe block by block, from disk to disk, in passes.

:func:`stream_quantize` runs the recipe as a few pass objects a reader can follow:

- :class:`Inputs` — the calibration state carried from block to block: the quantized-path hidden
  states of every chunk and, when a step needs the float model (``dXX``, ``float_targets``), the
  float-path hidden states of the first chunks; restored from a resume state. A recipe whose steps
  need nothing (``QuantizeConfig.needs()`` empty) has no calibration at all: one probe of 8 tokens
  finds the layer groups, and the run costs about reading plus writing the checkpoint.
- :class:`BlockPass` — one block: load it, find its layer groups (by structure, once), resolve the
  per-layer rules (refused when layers reading one input disagree), run the **layer pass** (the
  sequential runner calls :class:`~weightsmith.engine.layers.GroupQuantizer` with each group's
  statistics; data-free: with none), then the **block steps** (autograd on the block's inputs,
  optionally against a float copy or the float path's outputs), and the outputs for the next block;
- writing: the block's shard and its encodings (``qparams/block-i``), then the commit.

A planner step (``--target-bpw``) adds a first pass before these (:func:`measure_pass`): the float
model's statistics per group, the planner's measurements of candidate settings, and its plan — per
layer rules that the second pass applies (see ``api.py`` for where plan and measurements are kept).
Peak memory is one block plus the calibration activations, whatever the number of blocks.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from ..config import QuantizeConfig, Rule
from ..errors import WeightsmithError
from ..model.adapter import LazyModel, get_weight
from ..model.saving import ShardWriter, save_tensors, stored_dtype
from ..quant import registry
from .fold import FoldSession, detect_producers, needs_folding
from .layers import GroupQuantizer, check_rules, group_settings
from .sequential import FloatPath, Group, SequentialRunner, discover_groups

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .distributed import DistContext

log = logging.getLogger(__name__)

QPARAMS_DIR = "qparams"
PROBE_TOKENS = 8
CALIBRATED = {"H", "input_norms", "dXX", "float_block", "float_targets", "grad", "out_fisher", "block_fisher", "weight_fisher"}
FLOAT_PATH = {"dXX", "float_targets"}


@dataclass
class StreamResult:
    layers: list[dict] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    blocks: int = 0
    computed: int = 0  # blocks computed by this run (fewer than ``blocks`` when it resumed)


def _replace_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    kw = dict(kwargs)
    kw["hidden_states"] = h
    return args, kw


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def capture_chunks(lm: LazyModel, ids: torch.Tensor, chunk_size: int) -> list[tuple[tuple, dict]]:
    chunks = []
    prev_kw: dict | None = None
    for a in range(0, ids.shape[0], chunk_size):
        args, kw = lm.capture_inputs(ids[a : a + chunk_size])
        if prev_kw is not None:  # share identical extras (masks, rotary tables) between chunks
            kw = {k: prev_kw[k] if _same(v, prev_kw.get(k)) else v for k, v in kw.items()}
        prev_kw = kw
        chunks.append((args, kw))
    return chunks


def probe_ids(lm: LazyModel) -> torch.Tensor:
    """A few token ids for the forward that finds a data-free run's layer groups (no calibration)."""
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    vocab = int(getattr(text, "vocab_size", 0) or 1000)
    return (torch.arange(PROBE_TOKENS) * 7 % vocab).unsqueeze(0)


def float_chunks(cfg: QuantizeConfig, n_chunks: int) -> int:
    """How many calibration chunks carry the float path: all, or the smallest ``float_samples`` a
    float-path step asks for, rounded up to whole chunks."""
    k = cfg.float_samples()
    return n_chunks if k is None else min(n_chunks, -(-k // cfg.chunk_size))


def _forward(block, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Inputs:
    """The block inputs the run carries: quantized-path chunks, and the float path's when needed."""

    def __init__(self, lm: LazyModel, cfg: QuantizeConfig, ids: torch.Tensor | None, needs: frozenset):
        self.calibrated = ids is not None
        lm.load_outside()
        self.chunks = capture_chunks(lm, ids if ids is not None else probe_ids(lm), cfg.chunk_size)
        lm.unload_outside()  # embeddings are not needed again while the blocks stream
        self.fchunks = self.chunks[:float_chunks(cfg, len(self.chunks))] if self.calibrated and needs & FLOAT_PATH else None

    @property
    def probe(self) -> tuple[tuple, dict]:
        return self.chunks[0]

    def restore(self, state: dict) -> None:
        hidden = state["hidden"]
        if len(hidden) != len(self.chunks):
            raise WeightsmithError(f"cannot resume: the saved state has {len(hidden)} calibration chunks, this run {len(self.chunks)}")
        dev = _hidden(*self.chunks[0]).device
        self.chunks = [_replace_hidden(a, k, h.to(dev)) for (a, k), h in zip(self.chunks, hidden)]
        if self.fchunks is not None:  # the float path's hidden states were committed beside them
            fh = state.get("float_hidden")
            if fh is None or len(fh) != len(self.fchunks):
                raise WeightsmithError("cannot resume: the saved state has no float-path activations for this recipe")
            self.fchunks = [_replace_hidden(a, k, h.to(dev)) for (a, k), h in zip(self.fchunks, fh)]

    def advance(self, outs: list[torch.Tensor], fouts: list[torch.Tensor] | None) -> None:
        self.chunks = [_replace_hidden(a, k, o) for (a, k), o in zip(self.chunks, outs)]
        if fouts is not None:
            self.fchunks = [_replace_hidden(a, k, o) for (a, k), o in zip(self.fchunks, fouts)]

    def state(self) -> dict:
        st = {"hidden": [_hidden(a, k) for a, k in self.chunks]}
        if self.fchunks is not None:
            st["float_hidden"] = [_hidden(a, k) for a, k in self.fchunks]
        return st


@dataclass
class BlockContext:
    """What a block step receives (``registry`` kind ``block``): the block with its layers already
    rewritten, the records of those layers (their encodings, e.g. the grid to tune, and report rows),
    the block's quantized-path inputs, and — when the step declared the need — a float copy of the
    block (``float_block``) and the float path's outputs of this block (``float_targets``, for the
    first ``len(targets)`` chunks). Autograd is on inside the step's function when it declares
    ``grad``; it must leave the block's weights and the records consistent."""

    index: int
    prefix: str
    block: torch.nn.Module
    modules: dict  # relative name -> linear module
    records: dict  # full layer name -> LayerRecord
    inputs: list
    float_block: torch.nn.Module | None = None
    targets: list | None = None


class Structure:
    """A block's layer groups and producers, found once and reused while the block structure repeats."""

    def __init__(self):
        self.key = None
        self.groups: list[Group] = []
        self.producers: dict = {}
        self.unreached: list[str] = []


class BlockPass:
    """One block through the recipe: layer pass, block steps, outputs (see the module docstring)."""

    def __init__(self, lm: LazyModel, cfg: QuantizeConfig, needs: frozenset, rules: list[Rule], dist: "DistContext | None", grads=None):
        self.lm, self.cfg, self.needs, self.rules, self.dist = lm, cfg, needs, rules, dist
        self.grads = grads
        self.structure = Structure()
        self.block_steps = [s for s in cfg.steps if registry.get(s.name).kind == "block"]

    def _discover(self, i: int, block, layers: dict, probe, res: StreamResult) -> list[Group]:
        st = self.structure
        key = (type(block), tuple(layers))
        if st.key != key:
            st.groups, st.unreached = discover_groups(block, layers, *probe)
            st.key = key
            st.producers = detect_producers(block, st.groups, *probe) if needs_folding(self.cfg) else {}
            if st.unreached:
                log.warning("layers never called by the forward, left in float: %s", ", ".join(st.unreached))
            same = [self.lm.block_prefix(j) for j in range(i, len(self.lm.blocks))
                    if tuple(l.rel for l in self.lm.layers(j, self.cfg.ignore)) == tuple(layers)]
            check_rules(self.cfg, same, st.groups, self.rules)  # conflicting rules are refused before any work on them
        res.unreached.extend(self.lm.block_prefix(i) + u for u in layers if all(u not in g.names for g in st.groups))
        return st.groups

    def run(self, i: int, inputs: Inputs, res: StreamResult) -> GroupQuantizer:
        lm, cfg = self.lm, self.cfg
        block = lm.load_block(i)
        prefix = lm.block_prefix(i)
        layers = {l.rel: l.module for l in lm.layers(i, cfg.ignore)}
        groups = self._discover(i, block, layers, inputs.probe, res)
        active, skipped = [], []
        for g in groups:
            g.done = False
            (skipped if group_settings(cfg, prefix, g, self.rules).skip else active).append(g)
        float_copy = None
        if inputs.fchunks is not None or "float_block" in self.needs:
            float_copy = copy.deepcopy(block)  # float weights of this block, before any layer is rewritten
        fp = FloatPath(float_copy, {rel: m for rel, m in float_copy.named_modules() if rel in layers}, inputs.fchunks) \
            if inputs.fchunks is not None else None
        block_inputs = inputs.chunks
        with FoldSession(block, active, self.structure.producers, record=cfg.sequential and not cfg.low_memory) as folds:
            gq = GroupQuantizer(cfg, i, prefix, layers, folds, self.rules, grads=self.grads)
            for g in skipped:
                gq.skip(g)
            if inputs.calibrated:
                outs = self._layer_pass(block, layers, active, gq, inputs, fp)
            else:
                for g in active:  # data-free: no statistics, no forward
                    gq(g, None, None)
                    g.done = True
                outs = None
        fouts = None
        if fp is not None:
            if "dXX" not in self.needs:  # the float path only for the targets: its plain forward
                fp.outputs = [fp.forward(c) for c in range(len(fp.chunks))]
            fouts = fp.outputs
        if self.block_steps:
            ctx = BlockContext(i, prefix, block, {r: layers[r] for g in active for r in g.names}, gq.records, block_inputs,
                               float_copy if "float_block" in self.needs else None, fouts if "float_targets" in self.needs else None)
            for st in self.block_steps:
                spec = registry.get(st.name)
                if "grad" in spec.needs(st):
                    with torch.enable_grad():
                        spec.fn(ctx, st)
                else:
                    spec.fn(ctx, st)
            outs = [_forward(block, a, k) for a, k in block_inputs]  # the block changed: its outputs again
        del float_copy
        if inputs.calibrated:
            inputs.advance(outs, fouts)
        return gq

    def _layer_pass(self, block, layers: dict, groups: list[Group], gq: GroupQuantizer, inputs: Inputs, fp: FloatPath | None):
        dist = self.dist
        on_group = gq if dist is None else dist.verified(gq, layers)
        runner = SequentialRunner(block, {r: m for r, m in layers.items() if any(r in g.names for g in groups)}, groups, on_group,
                                  self.cfg.sequential, self.cfg.low_memory, float_path=fp if "dXX" in self.needs else None,
                                  reduce=dist.reduce_stats if dist is not None else None, full_stats=bool(self.needs & {"H", "dXX"}))
        return runner.run(inputs.chunks)


def stream_quantize(lm: LazyModel, cfg: QuantizeConfig, ids: torch.Tensor | None, out: Path, progress: bool = True, *,
                    save_dtype: torch.dtype | None = None, ckpt: "Checkpointer | None" = None,
                    dist: "DistContext | None" = None, rules: list[Rule] | None = None, grads=None) -> StreamResult:
    """Run the recipe ``cfg`` on every block of ``lm`` with calibration token ids ``ids`` (n, seqlen;
    None for a recipe that needs no calibration); write into ``out``.

    ``save_dtype`` casts the floating tensors written (default: each tensor's checkpoint dtype).
    ``ckpt`` commits every finished block and, on resume, restores the last committed one
    (``checkpoint.py``); ``dist`` is this rank's share of a data-parallel run (``distributed.py``):
    ``ids`` is then this rank's share, and only rank 0 writes. ``rules`` are per-layer rules added
    to the config's (a planner's plan). ``grads`` ({key: a store with ``get(layer)``, e.g. ``engine/fisher.BlockFisher``}) fills the
    groups' ``stats.grads`` for a step that needs gradients (``block_fisher``, ``weight_fisher``).
    """
    needs = cfg.needs()
    if ids is None and needs & CALIBRATED:
        raise WeightsmithError(f"the recipe {cfg.recipe} needs calibration data ({', '.join(sorted(needs & CALIBRATED))})")
    res = StreamResult(blocks=len(lm.blocks))
    n_blocks = len(lm.blocks)
    writes = dist is None or dist.rank == 0
    writer = ShardWriter(out, n_blocks + 1)
    if writes:
        (out / QPARAMS_DIR).mkdir(exist_ok=True)
    inputs = Inputs(lm, cfg, ids, needs)
    start = 0
    restored = ckpt.restore() if ckpt is not None else None
    if restored is not None:  # continue an interrupted run at its first uncommitted block
        start, res.layers, res.unreached = restored.block, restored.layers, restored.unreached
        if restored.chunk_state is not None and inputs.calibrated:
            inputs.restore(restored.chunk_state)
        if writes:
            for k in range(start):
                writer.adopt(k)
    bp = BlockPass(lm, cfg, needs, list(rules or []), dist, grads)
    bar = tqdm(range(start, n_blocks), desc="blocks", unit="block", disable=not progress, dynamic_ncols=True, initial=start, total=n_blocks)
    for i in bar:
        gq = bp.run(i, inputs, res)
        res.layers.extend(gq.rows)
        if writes:
            keys = lm.block_keys(i)
            sd = lm.blocks[i].state_dict()
            writer.write(i, {keys[rel]: t.to(stored_dtype(lm.source.dtype(keys[rel]), save_dtype)) for rel, t in sd.items() if rel in keys})
            del sd  # else it holds this block's tensors through the next block (one block more at peak)
            tensors, meta = gq.qparams()
            save_tensors(tensors, out / QPARAMS_DIR / f"block-{i:05d}.safetensors", meta)
        if ckpt is not None:
            ckpt.commit(i, inputs.state() if inputs.calibrated else {}, res.layers, res.unreached)
        lm.unload_block(i)
        errs = [r["error"] for r in gq.rows if "error" in r]
        if errs:
            bar.set_postfix(err=f"{sum(errs) / len(errs):.4f}")
    res.computed = n_blocks - start
    res.skipped = [r["name"] for r in res.layers if r.get("skipped")]
    if writes:
        writer.write(n_blocks, {k: (t := lm.source.get(k)).to(stored_dtype(t.dtype, save_dtype)) for k in lm.outside_keys()})
        writer.finish()
    return res


def measure_pass(lm: LazyModel, cfg: QuantizeConfig, ids: torch.Tensor, planner_cfg, progress: bool = True,
                 on_block: Callable[[int], None] | None = None, fisher: dict | None = None) -> list[dict]:
    """The first pass of a planner: the float model's statistics per layer group (non-sequential, one
    forward per block; ``XᵀX`` only when the planner needs ``H``, else the input norms), and the
    planner's measurements for each group (then, if it has one, its ``finish_block`` per block).
    ``fisher`` (layer → per-output Fisher, ``engine/fisher.py``) fills ``stats.out_fisher``."""
    spec = registry.get(planner_cfg.name)
    lm.load_outside()
    chunks = capture_chunks(lm, ids, cfg.chunk_size)
    lm.unload_outside()
    out: list[dict] = []
    structure = None
    bar = tqdm(range(len(lm.blocks)), desc="measure", unit="block", disable=not progress, dynamic_ncols=True)
    for i in bar:
        block = lm.load_block(i)
        prefix = lm.block_prefix(i)
        layers = {l.rel: l.module for l in lm.layers(i, cfg.ignore)}
        if structure is None or structure[0] != (type(block), tuple(layers)):
            groups, _ = discover_groups(block, layers, *chunks[0])
            structure = ((type(block), tuple(layers)), groups)
        groups = structure[1]
        for g in groups:
            g.done = False

        def measure(g: Group, h, stats) -> None:
            settings = group_settings(cfg, prefix, g)
            if settings.skip:
                return
            ws = [get_weight(layers[r]).float() for r in g.names]
            W = torch.cat(ws, 0)
            if fisher is not None:
                stats = dataclasses.replace(stats, out_fisher=torch.cat([fisher[prefix + r] for r in g.names]))
            out.append({"layers": [prefix + r for r in g.names], "block": i, "numel": int(W.numel()), "rows": [int(w.shape[0]) for w in ws],
                        "measure": spec.planner.measure(W, stats, settings.grid, planner_cfg, [int(w.shape[0]) for w in ws], cfg)})

        first = len(out)
        runner = SequentialRunner(block, {r: m for r, m in layers.items() if any(r in g.names for g in groups)}, groups, measure,
                                  sequential=False, rewrites=False, full_stats=bool(spec.planner.needs_of(planner_cfg) & {"H", "dXX"}))
        outs = runner.run(chunks)
        if spec.planner.finish_block is not None:  # measurements against the whole block (OWL's block mean)
            spec.planner.finish_block(out[first:], planner_cfg)
        chunks = [_replace_hidden(a, k, o) for (a, k), o in zip(chunks, outs)]
        lm.unload_block(i)
        if on_block is not None:
            on_block(i)
    return out
