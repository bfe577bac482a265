"""BlockStreamer: quantize a checkpoint block by block, from disk to disk.

For each block: load its weights, run the calibration chunks through it once (see
``sequential.py``) while the recipe's algorithm rewrites its layers, keep the outputs as the next
block's inputs, write the block's shard and quantization parameters, and free it. Peak memory is
one block plus the calibration activations, whatever the number of blocks.

When the method needs the float path (``Algorithm.needs_float_path``, e.g. GPTAQ), the
unquantized model's hidden states travel beside the quantized ones: each block also runs on them
through a float copy of itself (``sequential.FloatPath``), its layers' statistics get ``dXX``, and
its float outputs become the next block's float-path inputs. That costs a second copy of the
calibration activations, one float copy of the current block and one more forward per block;
methods without it pay nothing.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..config import QuantizeConfig
from ..errors import WeightsmithError
from ..model.adapter import LazyModel, get_weight, set_weight
from ..model.saving import ShardWriter, save_tensors, stored_dtype
from ..quant.grid import relative_error
from ..quant import registry
from ..quant.pipeline import bits_per_weight, g_idx_is_natural, run_group
from ..quant.registry import LayerStats
from .fold import FoldSession, detect_producers, needs_folding
from .sequential import FloatPath, Group, SequentialRunner, discover_groups

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .distributed import DistContext

log = logging.getLogger(__name__)

QPARAMS_DIR = "qparams"


@dataclass
class StreamResult:
    layers: list[dict] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
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


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


class GroupQuantizer:
    """Runs the configured recipe (``quant/pipeline.py``) on one group of layers sharing a Hessian; records metrics."""

    def __init__(self, cfg: QuantizeConfig, block_index: int, prefix: str, layers: dict, folds: FoldSession | None = None):
        self.cfg, self.block_index, self.prefix, self.layers = cfg, block_index, prefix, layers
        self.folds = folds
        self.rows: list[dict] = []
        self.qparams: dict[str, torch.Tensor] = {}

    def __call__(self, g: Group, h: torch.Tensor, stats: LayerStats | None = None) -> None:
        t0 = time.perf_counter()
        mods = [self.layers[rel] for rel in g.names]
        ws = [get_weight(m).float().clone() for m in mods]
        if ws[0].shape[1] < self.cfg.grid.group_size:
            raise WeightsmithError(f"group size {self.cfg.grid.group_size} is larger than the input width {ws[0].shape[1]} of {self.prefix}{g.leader}")
        prod = self.folds.producers.get(g.leader) if self.folds is not None else None
        res = run_group(ws, stats, self.cfg, where=self.prefix + g.leader,
                        foldable=prod is not None and prod.rel is not None, why_not=prod.reason if prod is not None else "")
        info = dict(res.info)
        if res.input_scale is not None:  # AWQ: the producer of the group's input absorbs 1/s
            info["awq"] = {**info.get("awq", {}), "folded_into": self.prefix + self.folds.fold(g.leader, res.input_scale, self.qparams, self.prefix)}
        elif self.folds is not None:
            self.folds.release(g.leader)
        secs = (time.perf_counter() - t0) / len(mods)
        natural = g_idx_is_natural(res.g_idx, self.cfg.grid.group_size)
        a = 0
        for rel, m, w, lr in zip(g.names, mods, ws, res.lowrank):
            b = a + w.shape[0]
            set_weight(m, res.weight[a:b])
            name = self.prefix + rel
            self.qparams[f"{name}.scale"] = res.scale[a:b].cpu().contiguous()
            self.qparams[f"{name}.zero"] = res.zero[a:b].to(torch.int32).cpu().contiguous()
            self.qparams[f"{name}.g_idx"] = res.g_idx.to(torch.int32).cpu().clone()
            if lr is not None:
                self.qparams[f"{name}.lorc_a"] = lr[0].cpu().contiguous()
                self.qparams[f"{name}.lorc_b"] = lr[1].cpu().contiguous()
            self.rows.append({
                "name": name,
                "block": self.block_index,
                "shape": [int(w.shape[0]), int(w.shape[1])],
                "shares_input_with": [self.prefix + r for r in g.names if r != rel],
                "error": relative_error(res.effective[a:b] - w, w, h),
                "rtn_error": relative_error(res.baseline[a:b] - w, w, h),
                **float_target_errors(res.effective[a:b], res.baseline[a:b], w, stats),
                "seconds": round(secs, 4),
                **bits_per_weight((int(w.shape[0]), int(w.shape[1])), self.cfg.grid.bits, int(res.scale.shape[1]), self.cfg.grid.sym,
                                  not natural, 0 if lr is None else int(lr[0].shape[1])),
                **info,
            })
            a = b


def float_chunks(cfg: QuantizeConfig, n_chunks: int) -> int:
    """How many calibration chunks carry the float path: all, or the float-path method's
    ``float_samples`` (its share of the samples, a field of its config) rounded up to whole chunks."""
    k = getattr(cfg.method, "float_samples", None)
    return n_chunks if k is None else min(n_chunks, -(-k // cfg.chunk_size))


def float_target_errors(q: torch.Tensor, rtn: torch.Tensor, w: torch.Tensor, stats: LayerStats | None) -> dict:
    """With float-path statistics: how much rewriting ``w`` into ``q`` (and, for reference, into
    RTN's ``rtn``) changes the distance to the float model's output, relative to ‖W X‖²:
    ``(‖W X̃ − Q X‖² − ‖W X̃ − W X‖²) / ‖W X‖²`` — the quantity GPTAQ minimises, less the part
    inherited from earlier layers (the ‖W X̃‖² that would need ``X̃ᵀX̃`` cancels). Negative: the
    quantized layer is closer to the float output than the float weights are on these inputs."""
    if stats is None or stats.dXX is None:
        return {}
    h, xtx = stats.H, stats.H + stats.dXX  # X̃ᵀX / N

    def excess(m: torch.Tensor) -> float:
        d = m - w  # ‖XMᵀ‖² − 2 tr(W X̃ᵀX Mᵀ) − (‖XWᵀ‖² − 2 tr(W X̃ᵀX Wᵀ)), written through D = M − W
        return float(((d @ h) * (d + 2 * w)).sum() - 2 * ((w @ xtx) * d).sum())

    den = float(((w @ h) * w).sum())
    return {"float_error": excess(q) / den, "rtn_float_error": excess(rtn) / den} if den > 0 else {}


def stream_quantize(lm: LazyModel, cfg: QuantizeConfig, ids: torch.Tensor, out: Path, progress: bool = True, *,
                    save_dtype: torch.dtype | None = None, ckpt: "Checkpointer | None" = None,
                    dist: "DistContext | None" = None) -> StreamResult:
    """Quantize every block of ``lm`` with calibration token ids ``ids`` (n, seqlen); write into ``out``.

    ``save_dtype`` casts the floating tensors written (default: each tensor's checkpoint dtype).
    ``ckpt`` commits every finished block and, on resume, restores the last committed one
    (``checkpoint.py``); ``dist`` is this rank's share of a data-parallel run (``distributed.py``):
    ``ids`` is then this rank's share, and only rank 0 writes.
    """
    res = StreamResult(blocks=len(lm.blocks))
    n_blocks = len(lm.blocks)
    writes = dist is None or dist.rank == 0
    writer = ShardWriter(out, n_blocks + 1)
    if writes:
        (out / QPARAMS_DIR).mkdir(exist_ok=True)

    lm.load_outside()
    chunks = capture_chunks(lm, ids, cfg.chunk_size)
    lm.unload_outside()  # embeddings are not needed again while the blocks stream
    fchunks = None
    if registry.get(cfg.method.name).needs_float_path:  # float path: same block-0 inputs, all chunks or the first ones
        fchunks = chunks[:float_chunks(cfg, len(chunks))]

    start = 0
    restored = ckpt.restore() if ckpt is not None else None
    if restored is not None:  # continue an interrupted run at its first uncommitted block
        start, res.layers, res.unreached = restored.block, restored.layers, restored.unreached
        if restored.chunk_state is not None:
            hidden = restored.chunk_state["hidden"]
            if len(hidden) != len(chunks):
                raise WeightsmithError(f"cannot resume: the saved state has {len(hidden)} calibration chunks, this run {len(chunks)}")
            chunks = [_replace_hidden(a, k, h.to(lm.device)) for (a, k), h in zip(chunks, hidden)]
            if fchunks is not None:  # the float path's hidden states were committed beside them
                fh = restored.chunk_state.get("float_hidden")
                if fh is None or len(fh) != len(fchunks):
                    raise WeightsmithError("cannot resume: the saved state has no float-path activations for this method")
                fchunks = [_replace_hidden(a, k, h.to(lm.device)) for (a, k), h in zip(fchunks, fh)]
        if writes:
            for k in range(start):
                writer.adopt(k)

    groups = None
    structure = None
    producers: dict = {}
    bar = tqdm(range(start, n_blocks), desc="blocks", unit="block", disable=not progress, dynamic_ncols=True, initial=start, total=n_blocks)
    for i in bar:
        block = lm.load_block(i)
        layers = {l.rel: l.module for l in lm.layers(i, cfg.ignore)}
        if structure != (type(block), tuple(layers)):
            groups, unreached = discover_groups(block, layers, *chunks[0])
            structure = (type(block), tuple(layers))
            producers = detect_producers(block, groups, *chunks[0]) if needs_folding(cfg) else {}
            if unreached:
                log.warning("layers never called by the forward, left in float: %s", ", ".join(unreached))
                res.unreached.extend(lm.block_prefix(i) + u for u in unreached)
        else:
            unreached_now = [r for r in layers if all(r not in g.names for g in groups)]
            res.unreached.extend(lm.block_prefix(i) + u for u in unreached_now)
        for g in groups:
            g.done = False
        fp = None
        if fchunks is not None:
            fblock = copy.deepcopy(block)  # float weights of this block, before any layer is rewritten
            fp = FloatPath(fblock, {rel: m for rel, m in fblock.named_modules() if rel in layers}, fchunks)
        with FoldSession(block, groups, producers, record=cfg.sequential and not cfg.low_memory) as folds:
            gq = GroupQuantizer(cfg, i, lm.block_prefix(i), layers, folds)
            on_group = gq if dist is None else dist.verified(gq, layers)
            runner = SequentialRunner(block, {r: m for r, m in layers.items() if any(r in g.names for g in groups)}, groups, on_group,
                                      cfg.sequential, cfg.low_memory, float_path=fp,
                                      reduce=dist.reduce_stats if dist is not None else None)
            outs = runner.run(chunks)
        chunks = [_replace_hidden(a, k, o) for (a, k), o in zip(chunks, outs)]
        if fp is not None:
            fchunks = [_replace_hidden(a, k, o) for (a, k), o in zip(fchunks, fp.outputs)]
            del fp, fblock
        del outs
        res.layers.extend(gq.rows)
        if writes:
            keys = lm.block_keys(i)
            sd = block.state_dict()
            writer.write(i, {keys[rel]: t.to(stored_dtype(lm.source.dtype(keys[rel]), save_dtype)) for rel, t in sd.items() if rel in keys})
            del sd  # else it holds this block's tensors through the next block (one block more at peak)
            save_tensors(gq.qparams, out / QPARAMS_DIR / f"block-{i:05d}.safetensors")
        if ckpt is not None:
            state = {"hidden": [_hidden(a, k) for a, k in chunks]}
            if fchunks is not None:
                state["float_hidden"] = [_hidden(a, k) for a, k in fchunks]
            ckpt.commit(i, state, res.layers, res.unreached)
        lm.unload_block(i)
        if gq.rows:
            bar.set_postfix(err=f"{sum(r['error'] for r in gq.rows) / len(gq.rows):.4f}")
    res.computed = n_blocks - start
    if writes:
        writer.write(n_blocks, {k: (t := lm.source.get(k)).to(stored_dtype(t.dtype, save_dtype)) for k in lm.outside_keys()})
        writer.finish()
    return res
