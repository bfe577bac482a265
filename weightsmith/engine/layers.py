"""The layer pass of one block: each layer group through its layer steps, and what it records.

:class:`GroupQuantizer` is the callback the sequential runner calls with each group's finished
statistics (or, in a data-free run, with none): it resolves the group's settings (the recipe with
the per-layer rules applied — layers that read one input must agree), runs the layer steps
(``quant/pipeline.py``), writes the new weights into the block, folds a transform's input scale
into the producing op, and keeps per layer a :class:`LayerRecord` (its encodings) and a report row.
The block's qparams are serialised from the records once the block is done (block steps may still
edit them).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from ..config import LayerSettings, QuantizeConfig
from ..encodings import Encoding, Grid, LowRank, layer_bits, metadata
from ..errors import WeightsmithError
from ..model.adapter import get_weight, set_weight
from ..prune.check import sparsity_check
from ..quant import registry
from ..quant.pipeline import run_group
from ..quant.registry import LayerStats
from .fold import FoldSession
from .sequential import Group


@dataclass
class LayerRecord:
    name: str
    rel: str
    encodings: list[Encoding] = field(default_factory=list)
    row: dict = field(default_factory=dict)


def group_settings(cfg: QuantizeConfig, prefix: str, g: Group, extra_rules: list | None = None) -> LayerSettings:
    """The one settings of a layer group; refuses rules that give its layers different ones."""
    first = None
    for rel in g.names:
        st = cfg.layer_settings(prefix + rel, extra_rules)
        if first is None:
            first = (rel, st)
        elif st.key() != first[1].key():
            raise WeightsmithError(f"per-layer rules give {prefix}{first[0]} ({first[1].describe()}) and {prefix}{rel} ({st.describe()}) "
                                   "different settings, but they read one input (they are quantized together and fused at inference); "
                                   "give them one rule")
    return first[1]


def check_rules(cfg: QuantizeConfig, prefixes: list[str], groups: list[Group], extra_rules: list | None = None) -> None:
    """Every block with this group structure: refuse conflicting rules before any work."""
    for p in prefixes:
        for g in groups:
            group_settings(cfg, p, g, extra_rules)


def output_errors(q: torch.Tensor, rtn: torch.Tensor | None, w: torch.Tensor, stats: LayerStats) -> dict:
    """The report's output errors of rewriting ``w`` into ``q`` (and, for reference, into RTN's ``rtn``),
    from the input statistics alone (``h = XᵀX / N``; no activations):

    - ``error`` / ``rtn_error``: ``‖(M − W) X‖² / ‖W X‖²`` (:func:`~weightsmith.quant.grid.relative_error`);
    - with float-path statistics, ``float_error`` / ``rtn_float_error``:
      ``(‖W X̃ − M X‖² − ‖W X̃ − W X‖²) / ‖W X‖²`` — the quantity GPTAQ minimises, less the part
      inherited from earlier layers (the ‖W X̃‖² that would need ``X̃ᵀX̃`` cancels). Negative: the
      quantized layer is closer to the float model's output than the float weights are on these inputs.

    One product with ``h`` per matrix (``W``, each ``M − W``) and one with ``dXX`` serve every figure."""
    h = stats.H
    wh = w @ h
    den = float((wh * w).sum())
    wdx = w @ stats.dXX if stats.dXX is not None else None  # W (X̃ − X)ᵀX / N
    out: dict = {}
    for key, m in (("error", q), ("rtn_error", rtn)):
        if m is None:
            continue
        d = m - w
        dh = d @ h
        num = float((dh * d).sum())
        out[key] = num / den if den > 0 else (0.0 if not num > 0 else float("inf"))  # a zero layer reproduced exactly: 0, never NaN
        if wdx is not None and den > 0:
            # ‖XMᵀ‖² − 2 tr(W X̃ᵀX Mᵀ) − (‖XWᵀ‖² − 2 tr(W X̃ᵀX Wᵀ)) with M = W + D and X̃ᵀX = H + dXX:
            # ‖XDᵀ‖² + 2 tr(W H Dᵀ) − 2 tr(W (H + dXX) Dᵀ) = ‖XDᵀ‖² − 2 tr(W dXX Dᵀ) (H is symmetric)
            excess = num - 2 * float((wdx * d).sum())
            out[key.replace("error", "float_error")] = excess / den
    return out


def weight_error(delta: torch.Tensor, w: torch.Tensor) -> float:
    """‖ΔW‖²_F / ‖W‖²_F (0 for an all-zero layer left as it is)."""
    den = float((w * w).sum())
    num = float((delta * delta).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


class GroupQuantizer:
    """Runs the layer steps on one group of layers sharing its statistics; records encodings and metrics."""

    def __init__(self, cfg: QuantizeConfig, block_index: int, prefix: str, layers: dict, folds: FoldSession | None = None,
                 extra_rules: list | None = None, grads=None):
        self.cfg, self.block_index, self.prefix, self.layers = cfg, block_index, prefix, layers
        self.grads = grads  # {key: store with get(layer)}: the whole-model gradient passes' statistics (engine/fisher.py)
        self.folds = folds
        self.extra_rules = extra_rules
        self.records: dict[str, LayerRecord] = {}

    def settings(self, g: Group) -> LayerSettings:
        return group_settings(self.cfg, self.prefix, g, self.extra_rules)

    def __call__(self, g: Group, h: torch.Tensor | None, stats: LayerStats | None = None) -> None:
        t0 = time.perf_counter()
        settings = self.settings(g)
        mods = [self.layers[rel] for rel in g.names]
        ws = [get_weight(m).float().clone() for m in mods]
        gs = settings.grid.group_size
        if gs > ws[0].shape[1] and any("grid" in registry.get(s.name).outputs(s) for s in settings.steps):
            raise WeightsmithError(f"group size {gs} is larger than the input width {ws[0].shape[1]} of {self.prefix}{g.leader}")
        prod = self.folds.producers.get(g.leader) if self.folds is not None else None
        if self.grads and stats is not None:
            got = {key: [store.get(self.prefix + r) for r in g.names] for key, store in self.grads.items()}
            got = {key: fs for key, fs in got.items() if all(f is not None for f in fs)}
            if got:
                stats = dataclasses.replace(stats, grads=got)
        res = run_group(ws, stats, settings, where=self.prefix + g.leader,
                        foldable=prod is not None and prod.rel is not None, why_not=prod.reason if prod is not None else "")
        state = res.state
        info = dict(state.info)
        if state.input_scale is not None:  # a transform's scale: the producer of the group's input absorbs 1/s
            if self.folds is None:
                raise WeightsmithError(f"{self.prefix}{g.leader}: an input scale to fold but no fold session")
            into = self.folds.fold(g.leader, state.input_scale, self.records, self.prefix)
            info["folded_into"] = self.prefix + into
        elif self.folds is not None:
            self.folds.release(g.leader)
        secs = (time.perf_counter() - t0) / len(mods)
        sizes = state.sizes
        per_layer = [enc.split(sizes) for enc in state.encodings]
        a = 0
        for k, (rel, m, w) in enumerate(zip(g.names, mods, ws)):
            b = a + w.shape[0]
            set_weight(m, state.W[a:b])
            name = self.prefix + rel
            encs = [pl[k] for pl in per_layer]
            eff = state.effective[a:b]
            row = {"name": name, "block": self.block_index, "shape": [int(w.shape[0]), int(w.shape[1])],
                   "shares_input_with": [self.prefix + r for r in g.names if r != rel],
                   "steps": [s.name for s in settings.steps],
                   "weight_error": weight_error(eff - w, w)}
            if stats is not None and stats.H is not None:
                row.update(output_errors(eff, None if res.baseline is None else res.baseline[a:b], w, stats))
            if any(isinstance(e, Grid) for e in encs):
                g0 = next(e for e in encs if isinstance(e, Grid))
                row["grid"] = {"bits": g0.bits_, "group_size": g0.group_size, "sym": g0.sym}
            row.update({"seconds": round(secs, 4), **layer_bits((int(w.shape[0]), int(w.shape[1])), encs), **info})
            chk = sparsity_check(state.W[a:b])  # from the weights written, not the mask: e.g. a kept weight rounded to 0
            row.update({"measured_density": chk["density"], "nm": chk["nm"]})
            self.records[name] = LayerRecord(name, rel, encs, row)
            a = b

    def skip(self, g: Group) -> None:
        """A group a rule keeps in float: a report row, no encodings."""
        for rel in g.names:
            w = get_weight(self.layers[rel])
            name = self.prefix + rel
            self.records[name] = LayerRecord(name, rel, [], {"name": name, "block": self.block_index, "shape": [int(w.shape[0]), int(w.shape[1])],
                                                              "skipped": True})

    @property
    def rows(self) -> list[dict]:
        return [r.row for r in self.records.values()]

    def qparams(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The block's encodings as qparams tensors and their metadata."""
        tensors: dict[str, torch.Tensor] = {}
        for r in self.records.values():
            for e in r.encodings:
                tensors.update(e.tensors(r.name))
        return tensors, metadata({r.name: r.encodings for r in self.records.values() if r.encodings})


def scale_producer_encodings(rec: LayerRecord, inv: torch.Tensor) -> None:
    """A quantized linear producer whose output rows were divided by ``s``: keep its encodings consistent
    (grid scales and low-rank ``A`` rows scale with the rows; codes and masks do not change)."""
    for e in rec.encodings:
        if isinstance(e, Grid):
            e.scale = (e.scale * inv[:, None].to(e.scale)).contiguous()
            if e.latent is not None:
                e.latent = e.latent * inv[:, None].to(e.latent)
        elif isinstance(e, LowRank):
            e.factors = [((A * inv[:, None].to(A)).contiguous(), B) for A, B in e.factors]
