"""Output written shard by shard into a temporary directory that is renamed into place at the end."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import WeightsmithError


class AtomicDir:
    """``with AtomicDir(out, overwrite) as tmp:`` — write into ``tmp``; ``out`` appears only on success.

    The lock ``.OUT.lock`` (``safety.OutputLock``) is taken here, before anything is deleted or
    created, and held until the end of the ``with`` (or :meth:`release`, for a caller that stops
    before entering it). The final rename replaces an ``out`` that exists at that moment only with
    ``overwrite``: a directory someone else created there meanwhile is left alone."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        from ..safety import OutputLock, check_output

        self.out = Path(out)
        self.overwrite = overwrite
        check_output(self.out, overwrite=overwrite)
        parent = self.out.parent
        if not parent.exists():
            raise WeightsmithError(f"output directory's parent {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise WeightsmithError(f"cannot write to {parent} (permission denied)")
        self.tmp = parent / f".{self.out.name}.tmp-{os.getpid()}"
        self.lock = OutputLock(self.out)

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        self.lock.release()

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.out.parent).free
        if free < needed:
            self.release()
            raise WeightsmithError(f"not enough disk space in {self.out.parent}: need {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise WeightsmithError(f"disk full while writing {self.out}; nothing was left behind") from None
                return False
            try:
                old = self.set_aside_existing()
            except WeightsmithError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            os.rename(self.tmp, self.out)
            remove_set_aside(old)
            return False
        finally:
            self.release()

    def set_aside_existing(self) -> Path | None:
        """Before the final rename: an ``out`` that exists now is renamed aside (to be removed after
        the rename) with ``overwrite``, and refused without it."""
        if not os.path.lexists(self.out):
            return None
        if not self.overwrite:
            raise WeightsmithError(f"output {self.out} appeared while this run was writing it; it was not replaced "
                                   "(pass --overwrite to replace it)")
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        os.rename(self.out, old)
        return old


def remove_set_aside(old: Path | None) -> None:
    """Remove what :meth:`AtomicDir.set_aside_existing` renamed aside, whatever it is (a symlink,
    a file or a directory), so that no ``.OUT.old-<pid>`` stays behind."""
    if old is None:
        return
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Writes ``model-0000k-of-0000n.safetensors`` shards and the index that maps keys to them."""

    def __init__(self, out: Path, n_shards: int):
        self.out, self.n = out, n_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(k)
        tensors = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
        _save(tensors, self.out / name)
        self._register(name, {key: t.numel() * t.element_size() for key, t in tensors.items()})

    def stream(self, k: int, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> "StreamingShard":
        """Shard ``k`` written one tensor at a time (see :class:`StreamingShard`); registered when closed."""
        name = self.shard_name(k)
        return StreamingShard(self.out / name, entries, on_close=lambda sizes: self._register(name, sizes))

    def adopt(self, k: int) -> None:
        """Take over shard ``k`` written by an earlier (interrupted) run of the same job."""
        from .source import _read_header

        name = self.shard_name(k)
        self._register(name, {key: e.end - e.start for key, e in _read_header(self.out / name).items()})

    def _register(self, name: str, sizes: dict[str, int]) -> None:
        for key, size in sizes.items():
            self.weight_map[key] = name
            self.total += size

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class StreamingShard:
    """A safetensors file written tensor by tensor, so that a shard never has to be held in memory:
    the header (every name, dtype and shape, known in advance) is written first, then each tensor's
    bytes in the declared order as :meth:`write` receives them; :meth:`close` checks that all came
    and fsyncs. The file is the one ``safetensors.save_file`` would write for the same tensors, up to
    the order of the data (here: the declared order)."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 on_close=None):
        self.path, self.on_close = path, on_close
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        pos = 0
        self.sizes: dict[str, int] = {}
        self.order = [(k, dt, tuple(shape)) for k, dt, shape in entries]
        for k, dt, shape in self.order:
            n = dt.itemsize
            for d in shape:
                n *= d
            header[k] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.sizes[k] = n
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.next = 0
        try:
            self.fh = open(path, "wb")
            self.fh.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            raise WeightsmithError(f"cannot write {path}: {e.strerror}") from None

    def write(self, key: str, t: torch.Tensor) -> None:
        k, dt, shape = self.order[self.next]
        if key != k or t.dtype != dt or tuple(t.shape) != shape:
            raise RuntimeError(f"StreamingShard: got {key} {t.dtype} {tuple(t.shape)}, expected {k} {dt} {shape}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        try:
            self.fh.write(memoryview(data.numpy()))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            raise WeightsmithError(f"cannot write {self.path}: {e.strerror}") from None
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"StreamingShard: {self.path} closed after {self.next} of {len(self.order)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.on_close is not None:
            self.on_close(self.sizes)

    def abort(self) -> None:
        self.fh.close()


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    try:
        save_file(tensors, str(path), metadata=metadata or {"format": "pt"})  # one key: safetensors writes a map's keys in no fixed order
        fsync_file(path)  # a committed block must survive a crash of the machine, not only of the process
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise WeightsmithError(f"cannot write {path}: {e.strerror}") from None
    except Exception as e:  # safetensors wraps I/O errors in its own type
        if "No space left" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device") from None
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stored_dtype(dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: ``save_dtype`` for floating tensors when given, else its own."""
    return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    _save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, path, metadata)
