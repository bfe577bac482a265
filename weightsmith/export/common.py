"""What every exporter reads: a weightsmith output directory (dequantized float weights exactly on
the grid + ``qparams/``), turned back into integer codes, and the helpers that write a packed copy.

Convention of the qparams (see ``quant/grid.py``): ``w[r, c] = (q[r, c] - zero[r, g]) * scale[r, g]``
with ``g = g_idx[c]`` and unsigned codes ``q`` in ``[0, 2**bits - 1]``. The codes are recovered as
``round(w / scale + zero)`` and checked: a weight farther than 5 % of its scale from the grid point
means the directory was edited after quantization, and is refused.

**Encodings.** Each layer's result is its dense weight plus a list of typed encodings, declared per
qparams file in the safetensors ``__metadata__`` key ``weightsmith.encodings`` (a JSON string
``{layer: [enc, ...]}``):

* ``{"kind": "grid", "bits": b, "group_size": g, "sym": s}`` — tensors ``.scale`` f32 (out, n_groups),
  ``.zero`` int32 (out, n_groups), ``.g_idx`` int32 (in,); every layer may have its own grid;
* ``{"kind": "lowrank", "rank": r}`` — ``.lowrank_a`` (out, r), ``.lowrank_b`` (r, in) (legacy:
  ``.lorc_a`` / ``.lorc_b``); the dense weight is then off the grid by ``A·B``;
* ``{"kind": "sparsity", "pattern": "unstructured" | "2:4" | "N:M", "density": d}`` — ``.mask``
  uint8 (out, ceil(in/8)), ``numpy.packbits(mask, axis=1, bitorder="little")``, 1 = kept; a layer may
  have only this one (pruned: dense float weights with exact zeros);
* ``{"kind": "factored", "pattern": "2:4", "block_size": bs, "core_density": d}`` — ``.armor_a``
  (out, bs), ``.armor_b`` (in, bs) f32 bands of block-diagonal ``A``, ``B``, ``.armor_core`` f32
  (out, in) the N:M-sparse core: the dense weight is ``A·core·B`` (ARMOR), with no zeros of its own;
* ``{"kind": "planes", "bits": b, "group_size": g}`` — ``.plane_scale`` f32 (out, n_groups, b), ``.plane_offset``
  f32 (out, n_groups): hierarchical linear levels (HLQ), ``w = offset + Σ_i plane_scale_i · bit_i(q)``.

Files without the metadata (written before encodings) are read as before: every layer with a
``.scale`` is a grid with the report's ``config.grid``, and ``lorc_a`` / ``lorc_b`` are a low-rank
encoding. Each exporter declares the encoding kinds it ``HOLDS`` and refuses any other with
``check_holds`` (kind and layer named).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.saving import ShardWriter
from ..model.source import CheckpointSource, _read_header

QPARAMS_DIR = "qparams"
ENCODINGS_KEY = "weightsmith.encodings"
OFF_GRID_TOL = 0.05  # of a scale step
# the qparams tensors of each encoding kind: (required suffixes, alternatives); the first that is present is used
ENCODING_TENSORS = {
    "grid": (("scale", "zero", "g_idx"),),
    "lowrank": (("lowrank_a", "lowrank_b"), ("lorc_a", "lorc_b")),
    "sparsity": (("mask",),),
    "factored": (("armor_a", "armor_b", "armor_core"),),
    "planes": (("plane_scale", "plane_offset"),),
}


@dataclass(frozen=True)
class Grid:
    """One layer's integer grid."""

    bits: int
    group_size: int  # -1 = one group per output row
    sym: bool

    @classmethod
    def of(cls, enc: dict) -> "Grid":
        return cls(int(enc["bits"]), int(enc["group_size"]), bool(enc["sym"]))

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    def name(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.sym else 'asym'}"


def scheme_name(encs: list[dict], permuted: bool = False) -> str:
    """A layer's scheme in words: ``int4 g64 sym``, ``int8 per-channel asym + lowrank r8``, ``float``,
    ``float + sparsity 2:4 50%`` (``act-order`` when the grid's g_idx is permuted)."""
    grid = next((e for e in encs if e.get("kind") == "grid"), None)
    parts = [Grid.of(grid).name() + (" act-order" if permuted else "") if grid else "float"]
    for e in encs:
        k = e.get("kind")
        if k == "lowrank":
            parts.append(f"lowrank r{e.get('rank', '?')}")
        elif k == "sparsity":
            d = e.get("density")
            parts.append(f"sparsity {e.get('pattern', '?')}" + ("" if d is None else f" {100 * float(d):.0f}%"))
        elif k == "planes":
            g = e.get("group_size")
            parts[0] = f"hlq{e.get('bits', '?')} " + ("per-channel" if g == -1 else f"g{g}")
        elif k != "grid":
            parts.append(str(k))
    return " + ".join(parts)


def _file_metadata(f: Path) -> dict | None:
    """The ``weightsmith.encodings`` of one qparams file (None: a legacy file without it)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))  # _read_header has validated it
    raw = (header.get("__metadata__") or {}).get(ENCODINGS_KEY)
    if raw is None:
        return None
    try:
        encs = json.loads(raw)
        if not isinstance(encs, dict) or not all(isinstance(v, list) and all(isinstance(e, dict) and "kind" in e for e in v)
                                                  for v in encs.values()):
            raise ValueError("not a mapping of layer to a list of encodings with a kind")
        for layer, v in encs.items():
            for e in v:
                if e["kind"] == "grid":
                    Grid.of(e)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsmithError(f"{f}: metadata {ENCODINGS_KEY} is not valid ({type(e).__name__}: {e})") from None
    return encs


def read_qparams(qdir: Path, legacy_grid: dict | None) -> tuple[dict[str, object], dict[str, list[dict]]]:
    """All qparams tensor entries of ``qdir`` and every layer's encodings (metadata, or the legacy
    rule: ``.scale`` → a grid ``legacy_grid``, ``lorc_a``/``lorc_b`` → low rank). Every tensor must
    belong to a declared encoding and every encoding must have its tensors."""
    entries: dict[str, object] = {}
    encodings: dict[str, list[dict]] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        header = _read_header(f)
        entries.update(header)
        meta = _file_metadata(f)
        if meta is None:  # legacy: infer from the tensor names
            layers: dict[str, set] = {}
            for key in header:
                base, _, suffix = key.rpartition(".")
                layers.setdefault(base, set()).add(suffix)
            for base in sorted(layers):
                sufs = layers[base]
                extra = sorted(sufs - {"scale", "zero", "g_idx", "lorc_a", "lorc_b"})
                if extra:
                    raise WeightsmithError(f"{qdir}: layer {base} has quantization parameters no packed format can hold ({', '.join(extra)}) "
                                           f"and the file {f.name} declares no encodings ({ENCODINGS_KEY}); use the dequantized directory as is")
                encs = []
                if "scale" in sufs:
                    if legacy_grid is None:
                        raise WeightsmithError(f"{f}: no {ENCODINGS_KEY} metadata and no config.grid in report.json: the grid of {base} is unknown")
                    encs.append({"kind": "grid", **legacy_grid})
                if sufs & {"lorc_a", "lorc_b"}:
                    a = header.get(f"{base}.lorc_a")
                    encs.append({"kind": "lowrank", "rank": int(a.shape[1]) if a is not None and len(a.shape) == 2 else None})
                if not encs:
                    raise WeightsmithError(f"{qdir}: layer {base} has {', '.join(sorted(sufs))} but no scale")
                encodings[base] = encs
        else:
            for base, encs in meta.items():
                if base in encodings:
                    raise WeightsmithError(f"{qdir}: layer {base} is declared in two qparams files")
                encodings[base] = [dict(e) for e in encs]
            owned = {f"{b}.{s}" for b, encs in meta.items() for e in encs for s in _first_present(header, b, ENCODING_TENSORS.get(e["kind"], ()))}
            stray = sorted(set(header) - owned)
            if stray:
                raise WeightsmithError(f"{f}: tensor {stray[0]} belongs to no encoding declared in its {ENCODINGS_KEY} metadata")
    for base, encs in encodings.items():
        kinds = [e["kind"] for e in encs]
        dup = sorted(k for k, c in Counter(kinds).items() if c > 1)
        if dup:
            raise WeightsmithError(f"{qdir}: layer {base} has two {dup[0]} encodings")
        for e in encs:
            alts = ENCODING_TENSORS.get(e["kind"])
            if alts is None:
                continue  # an encoding kind this version does not know: the exporters refuse it by kind
            if not any(all(f"{base}.{s}" in entries for s in suf) for suf in alts):
                fam = _first_present(entries, base, alts) or alts[0]
                want = " + ".join(fam)
                have = [s for s in fam if f"{base}.{s}" in entries]
                raise WeightsmithError(f"{qdir}: layer {base}: its {e['kind']} encoding has no {want}"
                                       + (f" (only {', '.join(have)})" if have else ""))
    return entries, encodings


def read_entry(e) -> torch.Tensor:
    """One tensor of a safetensors file, by its header entry (plain file read, no memory map)."""
    with open(e.file, "rb") as fh:
        fh.seek(e.offset + e.start)
        buf = bytearray(fh.read(e.end - e.start))
    if len(buf) != e.end - e.start:
        raise WeightsmithError(f"corrupt safetensors file {e.file}: a tensor is truncated")
    return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape) if buf else torch.empty(e.shape, dtype=e.dtype)


def _first_present(header: dict, base: str, alts: tuple) -> tuple:
    for suf in alts:
        if any(f"{base}.{s}" in header for s in suf):
            return suf
    return ()


def encoding_tensor_names(entries: dict, base: str, kind: str) -> tuple[str, ...]:
    """The qparams suffixes that hold ``kind`` for layer ``base`` (e.g. ``("lorc_a", "lorc_b")``)."""
    return _first_present(entries, base, ENCODING_TENSORS.get(kind, ()))


@dataclass
class QuantLayer:
    """One quantized linear layer as integer codes: ``w = (q - zero[:, g_idx]) * scale[:, g_idx]``."""

    name: str  # full key without ``.weight``
    q: torch.Tensor  # (out, in) int32 codes in [0, 2**bits - 1]
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) int32
    g_idx: torch.Tensor  # (in,) int32
    bits: int
    dtype: torch.dtype  # dtype of the dequantized weight on disk
    group_size: int = -1  # this layer's grid (every layer may have its own)
    sym: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym)

    def dequantize(self) -> torch.Tensor:
        gi = self.g_idx.long()
        return self.scale[:, gi] * (self.q.float() - self.zero[:, gi].float())

    def natural_groups(self, group_size: int | None = None) -> bool:
        """Whether column ``c`` belongs to group ``c // group_size`` (no act-order permutation)."""
        group_size = self.group_size if group_size is None else group_size
        gs = self.q.shape[1] if group_size == -1 else group_size
        return bool(torch.equal(self.g_idx.long(), torch.arange(self.q.shape[1]) // gs))


def check_holds(ckpt: "QuantizedCheckpoint", fmt: str, holds: set[str] | frozenset[str]) -> None:
    """Refuse, in one line, the first layer with an encoding ``fmt`` cannot store."""
    for name in ckpt.encoded:
        for e in ckpt.encodings(name):
            if e["kind"] not in holds:
                keys = encoding_tensor_names(ckpt._q, name, e["kind"])
                where = f" (qparams {'/'.join(keys)})" if keys else ""
                n = sum(1 for m in ckpt.encoded if any(x["kind"] == e["kind"] for x in ckpt.encodings(m)))
                more = f", as do {n - 1} other layer(s)" if n > 1 else ""
                raise WeightsmithError(f"{fmt} cannot store a {e['kind']} encoding: layer {name}{where} has one{more} "
                                       f"({fmt} holds {', '.join(sorted(holds))} encodings); use the dequantized directory as is")


class QuantizedCheckpoint:
    """A ``weightsmith quantize`` output directory, read lazily layer by layer.

    ``layers``: the layers with a grid (what packed formats pack), sorted; ``encoded``: every layer
    with any encoding; ``encodings(name)``: its encodings; ``grid(name)``: its grid (or None)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.is_dir():
            raise WeightsmithError(f"{p} is not a directory written by `weightsmith quantize`")
        report = p / "report.json"
        qdir = p / QPARAMS_DIR
        if not qdir.is_dir() or not report.is_file():
            raise WeightsmithError(f"{p} is not a weightsmith-quantized checkpoint (no {QPARAMS_DIR}/ and report.json); quantize it first with `weightsmith quantize`")
        legacy = None
        try:
            self.report = json.loads(report.read_text(encoding="utf-8"))
            cfg = self.report["config"]
            grid = cfg.get("grid")
            if grid is not None:
                legacy = Grid.of(grid).as_dict()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsmithError(f"{report} is not a weightsmith report ({type(e).__name__}: {e})") from None
        method = cfg.get("method", {})  # reports before Engine 2: the quantizer's options; since: a list of steps
        steps = cfg.get("steps") if isinstance(cfg.get("steps"), list) else []
        quant = [s for s in steps if isinstance(s, dict) and ("act_order" in s or s.get("name") == "rtn")]
        self.method = quant[0] if quant else method if isinstance(method, dict) else {}
        self.dir = p
        self.source = CheckpointSource(p)
        self._q, self._enc = read_qparams(qdir, legacy)
        if not self._enc:
            raise WeightsmithError(f"{qdir} holds no quantization parameters: the checkpoint is not quantized")
        self.encoded = sorted(self._enc)
        self._grids = {n: Grid.of(e) for n in self.encoded for e in self._enc[n] if e["kind"] == "grid"}
        self.layers = sorted(self._grids)
        for n in self.encoded:
            if f"{n}.weight" not in self.source.index:
                raise WeightsmithError(f"{p}: quantized layer {n} has no weight {n}.weight in the checkpoint")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.source.close()

    # ---- per-layer grids ------------------------------------------------------------------------------------------

    def encodings(self, name: str) -> list[dict]:
        """The layer's encodings (copies), e.g. ``[{"kind": "grid", "bits": 4, "group_size": 64, "sym": True}]``."""
        return [dict(e) for e in self._enc.get(name, [])]

    def grid(self, name: str) -> Grid | None:
        return self._grids.get(name)

    def grids(self) -> dict[str, Grid]:
        """Every grid layer's grid."""
        return dict(self._grids)

    def distinct_grids(self) -> list[Grid]:
        """The grids in use, the most common (by layers) first; ties in the order of first use."""
        c = Counter(self._grids[n] for n in self.layers)
        first = {g: i for i, g in reversed(list(enumerate(self._grids[n] for n in self.layers)))}
        return sorted(c, key=lambda g: (-c[g], first[g]))

    @property
    def uniform(self) -> Grid | None:
        """The one grid of every quantized layer, or None when they differ (or none has a grid)."""
        g = set(self._grids.values())
        return next(iter(g)) if len(g) == 1 else None

    def _uniform(self, what: str):
        g = self.uniform
        if g is None:
            raise WeightsmithError(f"{self.dir}: the layers have different grids ({', '.join(x.name() for x in self.distinct_grids())}) or none; "
                                   f"there is no single {what} — read it per layer (ckpt.grid(name))")
        return getattr(g, what)

    @property
    def bits(self) -> int:
        return self._uniform("bits")

    @property
    def group_size(self) -> int:
        return self._uniform("group_size")

    @property
    def sym(self) -> bool:
        return self._uniform("sym")

    def grid_summary(self) -> list[dict]:
        """``[{bits, group_size, sym, layers}]`` for each grid in use, the most common first."""
        c = Counter(self._grids.values())
        return [{**g.as_dict(), "layers": c[g]} for g in self.distinct_grids()]

    # ---- tensors ---------------------------------------------------------------------------------------------------

    def _qget(self, key: str) -> torch.Tensor:
        try:
            return read_entry(self._q[key])
        except WeightsmithError:
            raise WeightsmithError(f"corrupt safetensors file {self._q[key].file}: {key} is truncated") from None

    def mask(self, name: str) -> torch.Tensor | None:
        """The layer's sparsity mask as bool (out, in), or None."""
        if f"{name}.mask" not in self._q:
            return None
        import numpy as np

        cols = self.source.shape(f"{name}.weight")[1]
        packed = self._qget(f"{name}.mask").numpy().astype(np.uint8)
        return torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little")[:, :cols].astype(bool))

    def layer(self, name: str) -> QuantLayer:
        grid = self._grids.get(name)
        if grid is None:
            raise WeightsmithError(f"layer {name} has no grid encoding ({scheme_name(self._enc.get(name, []))}): it has no integer codes")
        w_raw = self.source.get(f"{name}.weight")
        scale = self._qget(f"{name}.scale").float()
        zero = self._qget(f"{name}.zero").to(torch.int32)
        g_idx = self._qget(f"{name}.g_idx").to(torch.int32)
        w = w_raw.float()
        if w.ndim != 2 or w.shape != (scale.shape[0], g_idx.shape[0]):
            if w.ndim == 2 and w.shape == (g_idx.shape[0], scale.shape[0]):
                raise WeightsmithError(f"layer {name} stores its weight transposed (a GPT-2 style Conv1D); packed formats hold nn.Linear weights only")
            raise WeightsmithError(f"layer {name}: weight shape {tuple(w.shape)} does not match its qparams (scale {tuple(scale.shape)}, g_idx {tuple(g_idx.shape)})")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[1]):
            raise WeightsmithError(f"layer {name}: g_idx points outside its {scale.shape[1]} groups (corrupt qparams)")
        maxq = 2**grid.bits - 1
        if int(zero.min()) < 0 or int(zero.max()) > maxq:
            raise WeightsmithError(f"layer {name}: zero points outside [0, {maxq}] (corrupt qparams or a different bit width)")
        gi = g_idx.long()
        s, z = scale[:, gi], zero[:, gi].float()
        qf = torch.round(w / s + z)
        off = (w - (qf - z) * s).abs() / s
        if not torch.isfinite(off).all() or float(off.max()) > OFF_GRID_TOL or float(qf.min()) < 0 or float(qf.max()) > maxq:
            raise WeightsmithError(f"layer {name}: the weights are not on the grid of its qparams (was the checkpoint modified after quantization?)")
        m = self.mask(name)
        if m is not None and (m.shape != w.shape or bool((w[~m] != 0).any())):
            raise WeightsmithError(f"layer {name}: weights outside its sparsity mask are not zero (corrupt qparams or a modified checkpoint)")
        return QuantLayer(name, qf.to(torch.int32), scale, zero, g_idx, grid.bits, w_raw.dtype, grid.group_size, grid.sym)

    def planes(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None:
        """An HLQ layer's ``(codes int32 (out, in), plane_scale (out, groups, bits), offset (out, groups),
        group_size, bits)``, the codes read back as each weight's level (None: the layer has no planes
        encoding). Refused when a weight is farther than 5 % of its group's smallest level gap from
        every level (the checkpoint was modified)."""
        from ..encodings import Planes, nearest_level

        enc = next((e for e in self._enc.get(name, []) if e["kind"] == "planes"), None)
        if enc is None:
            return None
        bits, gs = int(enc["bits"]), int(enc["group_size"])
        ps = self._qget(f"{name}.plane_scale").float()
        off = self._qget(f"{name}.plane_offset").float()
        w = self.source.get(f"{name}.weight").float()
        cols = w.shape[-1] if w.ndim == 2 else -1
        g = cols if gs == -1 else gs
        if (w.ndim != 2 or not 1 <= bits <= 8 or g <= 0 or ps.shape != (w.shape[0], -(-cols // g), bits)
                or off.shape != ps.shape[:2]):
            raise WeightsmithError(f"layer {name}: weight {tuple(w.shape)} does not match its planes parameters "
                                   f"(plane_scale {tuple(ps.shape)}, plane_offset {tuple(off.shape)}, {bits} bits, group {gs})")
        levels = Planes(bits, gs, ps, off).levels()  # (out, groups, L)
        srt = levels.sort(-1).values
        gap = (srt[..., 1:] - srt[..., :-1]).amin(-1).clamp_min(1e-30) if levels.shape[-1] > 1 else srt[..., 0].abs() + 1
        codes = torch.empty(w.shape, dtype=torch.int32)
        for k in range(levels.shape[1]):
            sl = slice(k * g, min(cols, (k + 1) * g))
            c = nearest_level(w[:, sl], levels[:, k])
            dist = (w[:, sl] - levels[:, k].gather(1, c)).abs()
            if not torch.isfinite(dist).all() or bool((dist > OFF_GRID_TOL * gap[:, k, None]).any()):
                raise WeightsmithError(f"layer {name}: the weights are not on the levels of its planes parameters "
                                       "(was the checkpoint modified after quantization?)")
            codes[:, sl] = c.to(torch.int32)
        return codes, ps, off, gs, bits

    def other_keys(self) -> list[str]:
        """Checkpoint tensors that are not quantized weights (embeddings, norms, biases, head)."""
        qw = {f"{n}.weight" for n in self.layers}
        return [k for k in self.source.keys() if k not in qw]

    def shards(self) -> list[list[str]]:
        """The checkpoint's keys grouped by the shard file that holds them (one block per shard)."""
        by: dict[Path, list[str]] = {}
        for k, e in self.source.index.items():
            by.setdefault(e.file, []).append(k)
        return [by[f] for f in sorted(by)]

    def config_dict(self) -> dict:
        return dict(self.source.config_dict)


def write_hf_packed(ckpt: QuantizedCheckpoint, out: Path, pack_layer, quantization_config: dict) -> None:
    """Write ``out`` as a HF directory: every quantized layer replaced by ``pack_layer(layer)``'s
    tensors (keys relative to the layer name), other tensors as they are, shard for shard; the
    config with ``quantization_config``; tokenizer and other small files copied."""
    layers = set(ckpt.layers)
    shards = ckpt.shards()
    writer = ShardWriter(out, len(shards))
    for k, keys in enumerate(shards):
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            base = key[: -len(".weight")] if key.endswith(".weight") else None
            if base in layers:
                for suffix, t in pack_layer(ckpt.layer(base)).items():
                    tensors[f"{base}.{suffix}"] = t
            else:
                tensors[key] = ckpt.source.get(key)
        writer.write(k, tensors)
    writer.finish()
    copy_aux(ckpt, out)
    cfg = ckpt.config_dict()
    cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_aux(ckpt: QuantizedCheckpoint, out: Path) -> None:
    """Tokenizer, generation config, templates — and the quantization report, for provenance."""
    for f in ckpt.source.aux_files():
        if f.name != "config.json":
            shutil.copy2(f, out / f.name)
    shutil.copy2(ckpt.dir / "report.json", out / "report.json")


def unquantized_linears(ckpt: QuantizedCheckpoint) -> list[str]:
    """Names of the model's linear layers (``nn.Linear``, built on the meta device) left in float."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..model.adapter import model_class

    from ..safety import from_pretrained

    cfg = from_pretrained(AutoConfig, ckpt.dir)
    with init_empty_weights():
        model = model_class(cfg)._from_config(cfg)
    quantized = set(ckpt.layers)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


def packed_bits_per_weight(shape: tuple[int, int], encs: list[dict], n_groups: int | None, permuted: bool) -> float | None:
    """Bits per weight of a layer as packed formats store it (``encodings.grid_bits``/``lowrank_bits``:
    codes, 16-bit scales, zeros of asymmetric grids, a 32-bit g_idx when act-order permutes it, 16-bit
    low-rank factors); sparsity held as dense zeros costs nothing. None for a layer without grid
    (stored as float)."""
    from ..encodings import grid_bits, lowrank_bits

    grid = next((Grid.of(e) for e in encs if e.get("kind") == "grid"), None)
    planes = next((e for e in encs if e.get("kind") == "planes"), None)
    if planes is not None and n_groups is not None:  # codes, and per row and group a 16-bit scale per plane and an offset
        b = int(planes["bits"])
        return (b * shape[0] * shape[1] + 16 * shape[0] * int(n_groups) * (b + 1)) / (shape[0] * shape[1])
    if grid is None or n_groups is None:
        return None
    rank = sum(int(e.get("rank") or 0) for e in encs if e.get("kind") == "lowrank")
    parts = {**grid_bits(tuple(shape), grid.bits, int(n_groups), grid.sym, permuted), **lowrank_bits(tuple(shape), rank)}
    return sum(parts.values()) / (shape[0] * shape[1])
