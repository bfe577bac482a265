"""Read any checkpoint weightsmith knows back into per-layer facts and float weights.

``open_checkpoint(path)`` detects the format — a weightsmith dequantized dir (with ``qparams/``),
compressed-tensors pack-quantized, GPTQ format, a ``.gguf`` file, or a plain float dir — and gives
``tensors()`` (name, shape, dtype, scheme, bits per weight, bytes) and ``weight(name)`` (the float
weight in Hugging Face layout). The unpackers here are written from the formats' definitions (see
the docstrings of the exporters) and share no code with the packers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsmithError
from ..model.source import CheckpointSource
from .common import Grid, packed_bits_per_weight, read_entry, read_qparams, scheme_name


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str  # storage dtype(s)
    scheme: str  # "float" or e.g. "int4 g64 sym"
    bits_per_weight: float  # storage bits per element, scales and zeros included
    nbytes: int
    # bits per element as a packed format stores the layer (codes, 16-bit scales, zeros, g_idx when
    # permuted): differs from ``bits_per_weight`` only in weightsmith's dequantized dirs
    packed_bits_per_weight: float | None = None

    def __post_init__(self):
        if self.packed_bits_per_weight is None:
            self.packed_bits_per_weight = self.bits_per_weight

    def as_dict(self) -> dict:
        return asdict(self)


def unpack_rows_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of the dense little-endian bit stream of compressed-tensors: (rows, words) → (rows, n)."""
    b = np.ascontiguousarray(packed.numpy().astype("<i4")).view(np.uint8)
    bitarr = np.unpackbits(b, axis=1, bitorder="little")[:, : n * bits].reshape(packed.shape[0], n, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy((bitarr.astype(np.int64) * weights).sum(-1))


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's packing along the last dim: (n, m) int32 → (n, m·32/bits) codes, field j of a word = column j."""
    k = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(k, dtype=torch.int64) * bits
    return ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(packed.shape[0], -1)


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise WeightsmithError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise WeightsmithError(f"{p} is neither a model directory nor a .gguf file")
    if (p / "qparams").is_dir() and (p / "report.json").is_file():
        return "weightsmith"
    cfgf = p / "config.json"
    if not cfgf.is_file():
        raise WeightsmithError(f"{p} is not a Hugging Face model directory (no config.json)")
    qc = quantization_config(_read_json(cfgf), cfgf)
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "gptq":
        return "gptq"
    if method:
        raise WeightsmithError(f"{p} uses quantization method {method!r}, which weightsmith cannot read")
    return "float"


def _read_json(path: Path) -> dict:
    from ..model.source import _read_json as read

    return read(path)


def quantization_config(config: dict, where: Path) -> dict:
    """``config["quantization_config"]`` as an object ({} when absent); a one-line error otherwise."""
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise WeightsmithError(f"{where}: quantization_config is a {type(qc).__name__}, not an object")
    return qc


def _int_field(d: dict, key: str, default, where: Path, lo: int | None = None, hi: int | None = None) -> int:
    v = d.get(key)
    if v is None:
        if default is None:
            raise WeightsmithError(f"{where}: quantization_config has no {key}")
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
        raise WeightsmithError(f"{where}: quantization_config {key} is {v!r}, not an integer{rng}")
    return v


def open_checkpoint(path: str | Path):
    fmt = detect_format(path)
    return {"gguf": GGUFView, "weightsmith": WeightsmithView, "compressed-tensors": CompressedTensorsView,
            "gptq": GPTQView, "float": FloatView}[fmt](Path(path))


_DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.int64: "I64",
       torch.int8: "I8", torch.uint8: "U8"}


class _SafetensorsView:
    format = "float"

    def __init__(self, path: Path):
        self.path = path
        self.src = CheckpointSource(path)
        self.config = dict(self.src.config_dict)

    def close(self) -> None:
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def _nbytes(self, key: str) -> int:
        e = self.src.index[key]
        return e.end - e.start

    def _float_info(self, key: str) -> TensorInfo:
        t = self.src.index[key]
        return TensorInfo(key, list(t.shape), _DT.get(t.dtype, str(t.dtype)), "float",
                          8.0 * t.dtype.itemsize, self._nbytes(key))

    def tensors(self) -> list[TensorInfo]:
        return [self._float_info(k) for k in self.src.keys()]

    def weight(self, name: str) -> torch.Tensor:
        if name not in self.src.index:
            raise KeyError(name)
        return self.src.get(name).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, quantized layers dequantized to float32 ``.weight``."""
        names = [t.name for t in self.tensors()]
        return {n: self.weight(n) for n in names}


class FloatView(_SafetensorsView):
    format = "float"


class WeightsmithView(_SafetensorsView):
    """Our dequantized dir: float weights (on the grid) + qparams; each layer's scheme from its
    encodings (``weightsmith.encodings`` metadata, or the report's grid for legacy files)."""

    format = "weightsmith"

    def __init__(self, path: Path):
        super().__init__(path)
        report = _read_json(path / "report.json")
        grid = report.get("config", {}).get("grid") if isinstance(report.get("config"), dict) else None
        if grid is not None and not isinstance(grid, dict):
            raise WeightsmithError(f"{path / 'report.json'}: config.grid is not an object")
        self.grid = grid or {}
        self.q, self.encodings = read_qparams(path / "qparams", Grid.of(grid).as_dict() if grid else None)
        self.layers = set(self.encodings)

    def tensors(self) -> list[TensorInfo]:
        out = []
        for k in self.src.keys():
            info = self._float_info(k)
            base = k[: -len(".weight")] if k.endswith(".weight") else None
            if base in self.layers:
                encs = self.encodings[base]
                grid = next((Grid.of(e) for e in encs if e["kind"] == "grid"), None)
                n_groups, permuted = None, False
                if grid is not None:
                    n_groups = int(self.q[f"{base}.scale"].shape[1])
                    gi = read_entry(self.q[f"{base}.g_idx"]).long()
                    gs = gi.numel() if grid.group_size == -1 else grid.group_size
                    permuted = not torch.equal(gi, torch.arange(gi.numel()) // gs)
                elif any(e["kind"] == "planes" for e in encs):
                    n_groups = int(self.q[f"{base}.plane_offset"].shape[1])
                info.scheme = scheme_name(encs, permuted) + " (dequantized, qparams)"
                pb = packed_bits_per_weight(tuple(info.shape), encs, n_groups, permuted)
                if pb is not None:
                    info.packed_bits_per_weight = pb
            out.append(info)
        return out


class _PackedView(_SafetensorsView):
    """A HF dir whose quantized layers are stored as several tensors, the first ``PARTS[0]``."""

    PARTS: tuple[str, ...] = ()

    def _shape(self, base: str) -> list[int]:
        raise NotImplementedError

    def _scheme(self, base: str) -> str:
        raise NotImplementedError

    def tensors(self) -> list[TensorInfo]:
        lead = self.PARTS[0]
        layers = {k[: -len(lead) - 1] for k in self.src.keys() if k.endswith("." + lead)}
        out = []
        for k in self.src.keys():
            base, _, suffix = k.rpartition(".")
            if base not in layers:
                out.append(self._float_info(k))
            elif suffix == lead:
                shape = self._shape(base)
                parts = [f"{base}.{s}" for s in self.PARTS if f"{base}.{s}" in self.src.index]
                nb = sum(self._nbytes(p) for p in parts)
                dts = "+".join(_DT.get(self.src.dtype(p), "?") for p in parts)
                out.append(TensorInfo(f"{base}.weight", shape, dts, self._scheme(base), 8.0 * nb / (shape[0] * shape[1]), nb))
        return out


def _ct_match(name: str, target: str) -> bool:
    """compressed-tensors' name matching (``utils/match.py match_name``): ``re:`` = ``re.match``, else exact."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


class CompressedTensorsView(_PackedView):
    """pack-quantized, one or several ``config_groups``: a layer's group is the one whose targets
    match its name exactly, else by ``re:`` regex, else by class (``Linear``: every packed layer),
    as compressed-tensors resolves them; ``ignore`` excludes."""

    format = "compressed-tensors"

    def __init__(self, path: Path):
        super().__init__(path)
        where = path / "config.json"
        qc = quantization_config(self.config, where)
        cg = qc.get("config_groups")
        if cg is not None and not isinstance(cg, dict):
            raise WeightsmithError(f"{where}: quantization_config.config_groups is not an object")
        groups = list((cg or {}).values())
        if any(not isinstance(g, dict) or not isinstance(g.get("weights"), dict) for g in groups):
            raise WeightsmithError(f"{where}: quantization_config.config_groups has a group without a weights scheme")
        fmts = {g.get("format") or qc.get("format") for g in groups} | {qc.get("format")}
        if not groups or not fmts <= {"pack-quantized", None}:
            raise WeightsmithError(f"{path}: only pack-quantized compressed-tensors checkpoints are read")
        for g in groups:
            _int_field(g["weights"], "num_bits", None, where, lo=1, hi=8)
            _int_field(g["weights"], "group_size", -1, where, lo=-1)
        self.groups = [(list(g.get("targets") or []), g["weights"]) for g in groups]
        self.ignore = list(qc.get("ignore") or [])
        self._args: dict[str, dict] = {}
        if len(self.groups) == 1:  # what the single-group reader exposed
            self.args = self.groups[0][1]
            self.bits = _int_field(self.args, "num_bits", None, where, lo=1, hi=8)
            self.sym = bool(self.args.get("symmetric", True))
            self.group_size = _int_field(self.args, "group_size", -1, where, lo=-1) or -1

    PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    def args_of(self, base: str) -> dict:
        """The weights quantization args of packed layer ``base``."""
        if base not in self._args:
            if any(not t.startswith("re:") and t == base or t.startswith("re:") and _ct_match(base, t) for t in self.ignore):
                raise WeightsmithError(f"{self.path}: layer {base} is packed but listed in ignore")
            found = None
            for rank in (0, 1, 2):  # exact name, regex, class name
                for targets, w in self.groups:
                    for t in targets:
                        hit = (rank == 0 and not t.startswith("re:") and t == base) or (rank == 1 and t.startswith("re:") and _ct_match(base, t)) \
                            or (rank == 2 and t == "Linear")
                        if hit and found is None:
                            found = w
                if found is not None:
                    break
            if found is None:
                raise WeightsmithError(f"{self.path}: no config group targets the packed layer {base}")
            self._args[base] = found
        return self._args[base]

    def _grid(self, base: str) -> tuple[int, bool, int]:
        a = self.args_of(base)
        return int(a["num_bits"]), bool(a.get("symmetric", True)), int(a.get("group_size") or -1)

    def _shape(self, base: str) -> list[int]:
        return [int(x) for x in self.src.get(f"{base}.weight_shape").tolist()]

    def _scheme(self, base: str) -> str:
        bits, sym, group_size = self._grid(base)
        return f"{Grid(bits, group_size, sym).name()} (pack-quantized)"

    def weight(self, name: str) -> torch.Tensor:
        base = name[: -len(".weight")]
        if f"{base}.weight_packed" not in self.src.index:
            return super().weight(name)
        bits, sym, group_size = self._grid(base)
        out, cols = (int(x) for x in self.src.get(f"{base}.weight_shape").tolist())
        q = unpack_rows_int32(self.src.get(f"{base}.weight_packed"), bits, cols).float()
        scale = self.src.get(f"{base}.weight_scale").float()
        if sym:
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            zp = self.src.get(f"{base}.weight_zero_point")
            zero = unpack_rows_int32(zp.t().contiguous(), bits, out).t().float()
        if f"{base}.weight_g_idx" in self.src.index:
            gi = self.src.get(f"{base}.weight_g_idx").long()
        else:
            gs = cols if group_size == -1 else int(group_size)
            gi = torch.arange(cols) // gs
        return (q - zero[:, gi]) * scale[:, gi]


class GPTQView(_PackedView):
    """GPTQ format; per-module grids from GPTQModel's ``dynamic`` rules (first matching pattern wins,
    ``re.match``; ``-:`` = not quantized, ``+:`` or no prefix = these overrides of the top-level grid)."""

    format = "gptq"

    def __init__(self, path: Path):
        super().__init__(path)
        where = path / "config.json"
        qc = quantization_config(self.config, where)
        self.bits = _int_field(qc, "bits", None, where, lo=2, hi=8)
        if 32 % self.bits:
            raise WeightsmithError(f"{where}: quantization_config.bits {self.bits} does not pack into 32-bit words")
        self.sym = bool(qc.get("sym", True))
        self.group_size = _int_field(qc, "group_size", -1, where, lo=-1)
        self.v1 = qc.get("checkpoint_format", "gptq") == "gptq"
        self.dynamic = dict(qc.get("dynamic") or {})

    PARTS = ("qweight", "qzeros", "scales", "g_idx")

    def grid_of(self, base: str) -> tuple[int, int, bool]:
        """(bits, group_size, sym) of module ``base``."""
        top = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        for pat, over in self.dynamic.items():
            if pat.startswith("-:"):
                if re.match(pat[2:], base):
                    raise WeightsmithError(f"{self.path}: layer {base} is packed but a dynamic rule {pat!r} excludes it from quantization")
                continue
            if re.match(pat[2:] if pat.startswith("+:") else pat, base):
                g = {**top, **{k: v for k, v in (over or {}).items() if k in top}}
                return int(g["bits"]), int(g["group_size"]), bool(g["sym"])
        return self.bits, self.group_size, self.sym

    def _shape(self, base: str) -> list[int]:
        qw = self.src.shape(f"{base}.qweight")
        return [int(qw[1]), int(qw[0]) * 32 // self.grid_of(base)[0]]

    def _scheme(self, base: str) -> str:
        return f"{Grid(*self.grid_of(base)).name()} (GPTQ {'v1' if self.v1 else 'v2'})"

    def weight(self, name: str) -> torch.Tensor:
        base = name[: -len(".weight")]
        if f"{base}.qweight" not in self.src.index:
            return super().weight(name)
        bits = self.grid_of(base)[0]
        q = unpack_cols(self.src.get(f"{base}.qweight").t().contiguous(), bits).float()  # (out, in)
        zero = unpack_cols(self.src.get(f"{base}.qzeros"), bits).float()  # (groups, out)
        if self.v1:
            zero = zero + 1  # v1 stores zero - 1
        scale = self.src.get(f"{base}.scales").float()
        gi = self.src.get(f"{base}.g_idx").long()
        return (q - zero.t()[:, gi]) * scale.t()[:, gi]


class GGUFView:
    """A .gguf file: tensor names are GGUF's (``blk.0.attn_q.weight``); weights in GGUF row order."""

    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 - the reader raises many types on bad files
            raise WeightsmithError(f"cannot read GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.tensors_by_name = {t.name: t for t in self.reader.tensors}
        f = self.reader.fields.get("general.architecture")
        self.arch = f.contents() if f is not None else None
        self.config = {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def size_on_disk(self) -> int:
        return self.path.stat().st_size

    def field(self, key: str):
        f = self.reader.fields.get(key)
        return f.contents() if f is not None else None

    def tensors(self) -> list[TensorInfo]:
        out = []
        for t in self.reader.tensors:
            shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists the fastest dim first
            n = max(1, math.prod(shape))
            kind = t.tensor_type.name
            scheme = "float" if kind in ("F32", "F16", "BF16", "F64") else f"{kind} (GGUF)"
            out.append(TensorInfo(t.name, shape, kind, scheme, 8.0 * int(t.n_bytes) / n, int(t.n_bytes)))
        return out

    def weight(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors_by_name[name]
        shape = [int(x) for x in reversed(t.shape.tolist())]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))

    def hf_to_gguf(self, hf_key: str, n_layers: int) -> str | None:
        import gguf

        try:
            tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[str(self.arch).upper()], n_layers)
        except KeyError:
            return None
        return tmap.get_name(hf_key, try_suffixes=(".weight", ".bias"))


def load_dequantized_model(path: Path, cls, dtype=torch.float32):
    """A transformers model for a GPTQ / compressed-tensors dir built from its config and our
    dequantized weights (for when the format's own loader is not installed or cannot load it)."""
    from transformers import AutoConfig

    view = open_checkpoint(path)
    with view:
        from ..safety import from_pretrained

        cfg = from_pretrained(AutoConfig, path)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = cls.from_config(cfg, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(cfg, dtype=dtype)
        sd = view.state_dict()
        missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise WeightsmithError(f"{path}: weights do not match the model ({'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]})")
    model.tie_weights()
    return model
