"""A float checkpoint read lazily, tensor by tensor, from its safetensors shards.

A Hugging Face directory is read in place; a ``.gguf`` file is dequantized once by transformers
into a temporary float32 directory (removed by :meth:`CheckpointSource.close`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from dataclasses import dataclass

from ..errors import WeightsmithError
from ..safety import check_model_dir, check_no_pickles

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".msgpack", ".h5")


class CheckpointSource:
    def __init__(self, path: str | Path):
        p = Path(path)
        self.origin = p
        self._tmp: Path | None = None
        if not p.exists():
            raise WeightsmithError(f"model path {p} does not exist")
        if p.is_file():
            if p.suffix != ".gguf":
                raise WeightsmithError(f"{p} is a file but not a .gguf; pass a Hugging Face model directory or a .gguf file")
            p = self._convert_gguf(p)
        if not (p / "config.json").is_file():
            raise WeightsmithError(f"{p} has no config.json: not a Hugging Face model directory")
        check_model_dir(p)  # no checkpoint code, no pickles
        self.dir = p
        self.config_dict = _read_json(p / "config.json")
        self.index = self._build_index(p)

    # ---- reading -------------------------------------------------------------------------------
    @staticmethod
    def _build_index(p: Path) -> dict[str, "_Entry"]:
        idx_file = p / "model.safetensors.index.json"
        if idx_file.is_file():
            weight_map = _read_json(idx_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsmithError(f"{idx_file} has no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in p.glob("*.safetensors"))
            weight_map = None
        if not files:
            check_no_pickles(p)
            raise WeightsmithError(f"{p} has no *.safetensors weights")
        index: dict[str, _Entry] = {}
        for name in files:
            f = p / name
            if not f.is_file():
                raise WeightsmithError(f"shard {f} listed in the index is missing")
            index.update(_read_header(f))
        if weight_map is not None:
            missing = [k for k, v in weight_map.items() if k not in index or index[k].file.name != v]
            if missing:
                raise WeightsmithError(f"index lists {missing[0]} in {weight_map[missing[0]]} but that shard lacks it")
        return index

    def keys(self) -> list[str]:
        return list(self.index)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor with plain file reads into a fresh torch allocation.

        Not a memory map: pages of a mapped file that a read touches count in the resident set
        until the kernel drops them, so on a checkpoint larger than RAM the process would look (and
        be accounted, by cgroups) as large as what it has read. Plain reads into an aligned torch
        buffer keep the resident set to what the engine holds, and give the same (aligned) memory
        layout in every run, which keeps results bit-identical across processes."""
        e = self.index[key]
        n = e.end - e.start
        buf = torch.empty(n, dtype=torch.uint8)
        try:
            with open(e.file, "rb", buffering=0) as fh:
                fh.seek(e.offset + e.start)
                view, got = memoryview(buf.numpy()), 0
                while got < n:
                    k = fh.readinto(view[got:])
                    if not k:
                        raise WeightsmithError(f"corrupt safetensors file {e.file}: tensor {key} is truncated")
                    got += k
        except OSError as err:
            raise WeightsmithError(f"cannot read {e.file}: {err.strerror}") from None
        if n == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        return buf.view(e.dtype).reshape(e.shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.index[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self.index[key].shape

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in {e.file for e in self.index.values()})

    def fingerprint(self) -> dict:
        """Identifies the input checkpoint for resume: per weight file its size, mtime and a hash of
        its header (names, dtypes, shapes, offsets), plus a hash of config.json. Cheap: no data read."""
        if self._tmp is not None:  # a GGUF converted into a fresh temporary directory: the file itself
            st = self.origin.stat()
            return {"origin": str(self.origin.resolve()), "files": {self.origin.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}}
        files = {}
        for f in sorted({e.file for e in self.index.values()}):
            st = f.stat()
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                head = hashlib.sha256(fh.read(n)).hexdigest()[:16]
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": head}
        cfg = hashlib.sha256((self.dir / "config.json").read_bytes()).hexdigest()[:16]
        return {"origin": str(self.origin.resolve()), "config_sha256": cfg, "files": files}

    def aux_files(self) -> list[Path]:
        """Everything but weights, indexes and reports: config, tokenizer, generation config, templates."""
        out = []
        for f in sorted(self.dir.iterdir()):
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") and f.name != "report.json":
                out.append(f)
        return out

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- GGUF ----------------------------------------------------------------------------------
    def _convert_gguf(self, f: Path) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="weightsmith-gguf-"))
        self._tmp = tmp
        try:
            gguf_to_hf(f, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None
            raise
        return tmp


@contextlib.contextmanager
def _gguf_parsed_once():
    """While converting one GGUF file, transformers parses it three times (tokenizer, config, weights:
    ~4 s each for a 49k-token vocabulary in gguf-py's reader) and rebuilds gguf-py's tensor-name map
    once per submodule of the model (~7 s for a 30-block Llama). Both are pure functions of their
    arguments: inside this context the file is parsed once and the map built once per
    (architecture, blocks). The same gguf-py and transformers code does the work; what they return is unchanged."""
    import gguf
    import gguf.gguf_reader as reader_mod

    base = reader_mod.GGUFReader
    readers: dict = {}

    class _ParsedOnce(base):
        def __new__(cls, path, mode="r"):
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = base(path, mode)
            return readers[key]  # an instance of the base class: __init__ is not run again

    # transformers imports both from the gguf package at call time
    saved = [(gguf, "GGUFReader", gguf.GGUFReader), (gguf, "get_tensor_name_map", gguf.get_tensor_name_map)]
    try:
        gguf.GGUFReader = _ParsedOnce
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1][2])
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        readers.clear()


def gguf_to_hf(f: Path, dest: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers into a float32 HF directory ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..safety import from_pretrained

    log.info("dequantizing %s to a float32 checkpoint", f.name)
    try:
        with _gguf_parsed_once():
            tok = from_pretrained(AutoTokenizer, f.parent, gguf_file=f.name)
            model = from_pretrained(AutoModelForCausalLM, f.parent, gguf_file=f.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the gguf reader raises many types
        raise WeightsmithError(f"cannot read GGUF file {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsmithError(f"{p} is not valid JSON: {e}") from None
    except OSError as e:
        raise WeightsmithError(f"cannot read {p}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{p} is not a JSON object (got a {type(data).__name__})")
    return data


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    offset: int  # start of the data section
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


MAX_HEADER = 100 * 2**20


def _read_header(f: Path) -> dict[str, _Entry]:
    """Parse a safetensors header and check all of it against the file, before any tensor is read:
    a JSON object of entries with a known dtype, a shape of non-negative integers and data offsets
    that hold exactly dtype × shape bytes, lie one after the other from 0 with no gap or overlap,
    and end where the file ends. Any other file is refused in one line."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little")
            if len(raw) < 8 or n <= 0 or n > min(size - 8, MAX_HEADER):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise WeightsmithError(f"cannot read {f}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsmithError(f"corrupt safetensors file {f}: {_first(e, 'unreadable header')}") from None
    try:
        out = _parse_header(f, header, 8 + n)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsmithError(f"corrupt safetensors file {f}: {_first(e, 'malformed header')}") from None
    end = max((e.end for e in out.values()), default=0)
    if size < 8 + n + end:
        raise WeightsmithError(f"corrupt safetensors file {f}: truncated ({size} bytes, header promises {8 + n + end})")
    if size > 8 + n + end:
        raise WeightsmithError(f"corrupt safetensors file {f}: {size - 8 - n - end} bytes after the last tensor's data "
                               "(offsets do not cover the file)")
    return out


def _first(e: BaseException, default: str) -> str:
    return str(e).splitlines()[0] if str(e) else default


def _parse_header(f: Path, header, offset: int) -> dict[str, _Entry]:
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict):
            raise ValueError(f"entry {k} is not an object")
        dt, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise ValueError(f"unsupported dtype {dt!r} for {k}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {k} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise ValueError(f"tensor {k} has invalid data_offsets {offs!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _DTYPES[dt].itemsize
        if offs[1] - offs[0] != nbytes:
            raise ValueError(f"tensor {k}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but {dt} × {shape} needs {nbytes}")
        out[k] = _Entry(f, offset, offs[0], offs[1], _DTYPES[dt], tuple(shape))
    pos = 0
    for k, e in sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != pos:
            raise ValueError(f"tensor {k}'s data starts at {e.start}, not at {pos} where the previous one ends "
                             "(offsets not contiguous)")
        pos = e.end
    return out
