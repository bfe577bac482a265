"""What every exporter reads: a weightsmith output directory (dequantized float weights exactly on
the grid + ``qparams/``), turned back into integer codes, and the helpers that write a packed copy.

Convention of the qparams (see ``quant/grid.py``): ``w[r, c] = (q[r, c] - zero[r, g]) * scale[r, g]``
with ``g = g_idx[c]`` and unsigned codes ``q`` in ``[0, 2**bits - 1]``. The codes are recovered as
``round(w / scale + zero)`` and checked: a weight farther than 5 % of its scale from the grid point
means the directory was edited after quantization, and is refused.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..model.saving import ShardWriter
from ..model.source import CheckpointSource, _read_header

QPARAMS_DIR = "qparams"
KNOWN_QPARAMS = ("scale", "zero", "g_idx")
OFF_GRID_TOL = 0.05  # of a scale step


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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        gi = self.g_idx.long()
        return self.scale[:, gi] * (self.q.float() - self.zero[:, gi].float())

    def natural_groups(self, group_size: int) -> bool:
        """Whether column ``c`` belongs to group ``c // group_size`` (no act-order permutation)."""
        gs = self.q.shape[1] if group_size == -1 else group_size
        return bool(torch.equal(self.g_idx.long(), torch.arange(self.q.shape[1]) // gs))


class QuantizedCheckpoint:
    """A ``weightsmith quantize`` output directory, read lazily layer by layer."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.is_dir():
            raise WeightsmithError(f"{p} is not a directory written by `weightsmith quantize`")
        report = p / "report.json"
        qdir = p / QPARAMS_DIR
        if not qdir.is_dir() or not report.is_file():
            raise WeightsmithError(f"{p} is not a weightsmith-quantized checkpoint (no {QPARAMS_DIR}/ and report.json); quantize it first with `weightsmith quantize`")
        try:
            self.report = json.loads(report.read_text(encoding="utf-8"))
            grid = self.report["config"]["grid"]
            self.bits, self.group_size, self.sym = int(grid["bits"]), int(grid["group_size"]), bool(grid["sym"])
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsmithError(f"{report} is not a weightsmith report ({type(e).__name__}: {e})") from None
        self.method = self.report.get("config", {}).get("method", {})
        self.dir = p
        self.source = CheckpointSource(p)
        self._q: dict[str, tuple] = {}
        for f in sorted(qdir.glob("*.safetensors")):
            for key, entry in _read_header(f).items():
                self._q[key] = entry
        if not self._q:
            raise WeightsmithError(f"{qdir} holds no quantization parameters: the checkpoint is not quantized")
        suffixes = {k.rsplit(".", 1)[1] for k in self._q}
        extra = sorted(suffixes - set(KNOWN_QPARAMS))
        if extra:
            raise WeightsmithError(f"{p} has quantization parameters no packed format can hold ({', '.join(extra)}); "
                                   "only plain integer grids (scale, zero, g_idx) can be exported — use the dequantized directory as is")
        self.layers = sorted(k[: -len(".scale")] for k in self._q if k.endswith(".scale"))
        for n in self.layers:
            for s in KNOWN_QPARAMS:
                if f"{n}.{s}" not in self._q:
                    raise WeightsmithError(f"{qdir}: layer {n} has no {s}")
            if f"{n}.weight" not in self.source.index:
                raise WeightsmithError(f"{p}: quantized layer {n} has no weight {n}.weight in the checkpoint")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.source.close()

    def _qget(self, key: str) -> torch.Tensor:
        e = self._q[key]
        with open(e.file, "rb") as fh:
            fh.seek(e.offset + e.start)
            buf = bytearray(fh.read(e.end - e.start))
        if len(buf) != e.end - e.start:
            raise WeightsmithError(f"corrupt safetensors file {e.file}: {key} is truncated")
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape) if buf else torch.empty(e.shape, dtype=e.dtype)

    def layer(self, name: str) -> QuantLayer:
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
        maxq = 2**self.bits - 1
        if int(zero.min()) < 0 or int(zero.max()) > maxq:
            raise WeightsmithError(f"layer {name}: zero points outside [0, {maxq}] (corrupt qparams or a different bit width)")
        gi = g_idx.long()
        s, z = scale[:, gi], zero[:, gi].float()
        qf = torch.round(w / s + z)
        off = (w - (qf - z) * s).abs() / s
        if not torch.isfinite(off).all() or float(off.max()) > OFF_GRID_TOL or float(qf.min()) < 0 or float(qf.max()) > maxq:
            raise WeightsmithError(f"layer {name}: the weights are not on the grid of its qparams (was the checkpoint modified after quantization?)")
        return QuantLayer(name, qf.to(torch.int32), scale, zero, g_idx, self.bits, w_raw.dtype)

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
