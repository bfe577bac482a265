"""Resumable output: the work directory ``OUT.partial/``, its manifest and the per-block commit.

A run writes into ``OUT.partial/`` (a fixed name beside ``OUT``, so that it survives a crash and a
later run finds it). After each block, :meth:`Checkpointer.commit` makes the block durable:

1. the block's output shard and ``qparams/block-i`` are already written (and fsync'ed);
2. every rank writes the activations the next block needs (``state/acts-r<rank>-b<i+1>``: the
   hidden states of each of its calibration chunks, plus any extra per-chunk tensors the engine
   carries) and fsyncs them;
3. (data-parallel) a barrier: all ranks have their state on disk;
4. rank 0 replaces the manifest atomically (write, fsync, rename): ``committed = i + 1`` and the
   report rows so far. Only now does block ``i`` count as done.

A kill at any point leaves a manifest that names only complete files; ``--resume`` continues at
block ``committed``, and refuses when the manifest's key (configuration, input checkpoint
fingerprint, calibration tokens, number of ranks, output dtype) differs from the request. The
final step writes the outside-blocks shard, the index and the report, removes the state and
renames ``OUT.partial`` to ``OUT`` in one ``rename``: ``OUT`` is complete or absent.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..errors import WeightsmithError
from ..model.saving import AtomicDir, fsync_file, remove_set_aside, save_tensors
from ..model.source import _read_header

log = logging.getLogger(__name__)

MANIFEST = ".weightsmith-manifest.json"
STATE = ".weightsmith-state"
LOCK = ".weightsmith-lock"  # the lock of earlier versions, inside OUT.partial (now .OUT.lock beside OUT)
FORMAT = 1


def digest(obj) -> str:
    """A short stable hash of JSON data or of a tensor's bytes."""
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    fsync_file(tmp)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


class WorkDir(AtomicDir):
    """``with WorkDir(out, overwrite, resume) as work:`` — like :class:`AtomicDir`, but the work
    directory is ``OUT.partial`` and survives an interruption so that ``resume`` can continue it.

    The lock (``.OUT.lock`` beside OUT) is taken at construction, before ``OUT.partial`` is
    touched, and held until the end of the ``with`` (or :meth:`release`). On a clear error (bad
    input, disk full) the work directory is removed: nothing is left behind. On anything else (a
    kill, Ctrl-C, out of memory, a bug) it stays if at least one block was committed.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, create: bool = True):
        super().__init__(out, overwrite)
        self.resume, self.create = resume, create
        self.tmp = self.out.parent / f"{self.out.name}.partial"
        self._created = False
        if create and (self.tmp.is_symlink() or (self.tmp.exists() and not self.tmp.is_dir())):
            self.release()
            raise WeightsmithError(f"{self.tmp} exists and is not a directory weightsmith wrote; remove it first")

    @property
    def manifest_path(self) -> Path:
        return self.tmp / MANIFEST

    def __enter__(self) -> Path:
        if not self.create:  # a data-parallel rank other than 0: rank 0 owns the directory
            return self.tmp
        try:
            if self.tmp.exists():
                if not self.resume and not self.overwrite:
                    raise WeightsmithError(f"{self.tmp} holds an interrupted run: pass --resume to continue it or --overwrite to start over")
                if not self.resume:
                    shutil.rmtree(self.tmp)
            elif self.resume:
                log.warning("--resume: no interrupted run in %s, starting from the first block", self.tmp)
            self._created = not self.tmp.exists()
            self.tmp.mkdir(exist_ok=True)
        except BaseException:
            self.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.create:
            return False
        try:
            return self._exit(exc_type, exc)
        finally:
            self.release()

    def _exit(self, exc_type, exc) -> bool:
        if exc_type is None:
            self._finalize()
            return False
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        clear = issubclass(exc_type, WeightsmithError) or full
        if not self.manifest_path.exists() or (clear and self._created):
            shutil.rmtree(self.tmp, ignore_errors=True)
            if full:
                raise WeightsmithError(f"disk full while writing {self.out}; nothing was left behind") from None
            return False
        # a resumed run keeps the state it found; an interrupted one keeps what it committed
        # (after Ctrl-C / SIGTERM the CLI's last line says so; a warning above it would say it twice)
        log.log(logging.INFO if issubclass(exc_type, KeyboardInterrupt) else logging.WARNING,
                "the blocks committed so far are kept in %s; run again with --resume to continue", self.tmp)
        if full:
            raise WeightsmithError(f"disk full while writing {self.out}; the committed blocks are kept in {self.tmp} (--resume)") from None
        return False

    def _finalize(self) -> None:
        """Everything is written: drop the resume state and rename into place in one step (still
        holding the lock). An OUT that appeared meanwhile is replaced only with ``overwrite``;
        without it the finished run stays in OUT.partial."""
        if os.path.lexists(self.out) and not self.overwrite:
            raise WeightsmithError(f"output {self.out} appeared while this run was writing it; it was not replaced. The finished "
                                   f"run is kept in {self.tmp}: move {self.out} away and rerun with --resume (or pass --overwrite)")
        shutil.rmtree(self.tmp / STATE, ignore_errors=True)
        (self.tmp / LOCK).unlink(missing_ok=True)  # written by earlier versions inside the work directory
        old = self.set_aside_existing()
        os.rename(self.tmp, self.out)  # OUT appears complete, or not at all
        (self.out / MANIFEST).unlink(missing_ok=True)  # a kill just before this leaves one small hidden file
        remove_set_aside(old)


@dataclass
class Restored:
    block: int  # the first block still to do
    chunk_state: dict[str, list[torch.Tensor]] | None  # per-chunk tensors at the input of ``block`` (None: all done)
    layers: list[dict] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)


class Checkpointer:
    """Commits finished blocks into the work directory and restores them (see the module docstring).

    ``key`` identifies the job (config, input fingerprint, calibration, ranks, output dtype); a
    manifest with another key is refused. ``barrier`` synchronises data-parallel ranks.
    """

    def __init__(self, work: Path, key: dict, n_blocks: int, *, rank: int = 0, world: int = 1,
                 resume: bool = False, barrier: Callable[[], None] | None = None):
        self.work, self.key, self.n_blocks = work, key, n_blocks
        self.rank, self.world, self.resume = rank, world, resume
        self.barrier = barrier or (lambda: None)
        self.state = work / STATE
        self.threads = torch.get_num_threads()

    def _acts(self, rank: int, block: int) -> Path:
        return self.state / f"acts-r{rank}-b{block:05d}.safetensors"

    # ---- resume --------------------------------------------------------------------------------
    def restore(self) -> Restored | None:
        """The committed state of an interrupted run of the same job, or None to start afresh."""
        path = self.work / MANIFEST
        if not self.resume or not path.exists():
            return None
        try:
            man = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsmithError(f"cannot resume: {path} is corrupt; pass --overwrite to start over") from None
        if man.get("format") != FORMAT:
            raise WeightsmithError(f"cannot resume: {path} was written by another weightsmith version; pass --overwrite to start over")
        diff = _first_difference(man.get("key", {}), self.key)
        if diff:
            raise WeightsmithError(f"cannot resume {self.work}: {diff} differs from the interrupted run's; pass --overwrite to start over")
        if man.get("threads") != self.threads:
            log.warning("resuming with %d torch threads, the interrupted run had %s: results may differ in the last bits "
                        "(float summation order)", self.threads, man.get("threads"))
        try:
            k = int(man["committed"])
        except (KeyError, TypeError, ValueError):
            raise WeightsmithError(f"cannot resume: {path} is corrupt; pass --overwrite to start over") from None
        log.info("resuming %s at block %d of %d", self.work, k, self.n_blocks)
        if k >= self.n_blocks:  # every block is done; only the final files were missing
            return Restored(k, None, man.get("layers", []), man.get("unreached", []))
        f = self._acts(self.rank, k)
        if not f.is_file():
            raise WeightsmithError(f"cannot resume: the state file {f} of committed block {k - 1} is missing (on a multi-node run the "
                                   "output must be on a filesystem shared by all ranks); pass --overwrite to start over")
        try:
            _read_header(f)  # the whole header checked against the file: a truncated state file is one line, not a traceback
            flat = load_file(f)
        except WeightsmithError as e:
            raise WeightsmithError(f"cannot resume: the state file of committed block {k - 1} is unreadable ({e}); "
                                   "pass --overwrite to start over") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise WeightsmithError(f"cannot resume: the state file {f} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                   "pass --overwrite to start over") from None
        state: dict[str, list[torch.Tensor]] = {}
        for name in sorted(flat, key=lambda s: (s.rsplit(".", 1)[0], int(s.rsplit(".", 1)[1]))):
            state.setdefault(name.rsplit(".", 1)[0], []).append(flat[name].clone())  # clone: an aligned buffer of our own
        return Restored(k, state, man.get("layers", []), man.get("unreached", []))

    # ---- commit --------------------------------------------------------------------------------
    def commit(self, block: int, chunk_state: dict[str, list[torch.Tensor]], layers: list[dict], unreached: list[str]) -> None:
        """Block ``block`` is written: save the inputs of ``block + 1`` and advance the manifest."""
        self.state.mkdir(exist_ok=True)
        nxt = block + 1
        if nxt < self.n_blocks:  # after the last block nothing is left to carry
            flat = {f"{name}.{c}": t for name, ts in chunk_state.items() for c, t in enumerate(ts) if t is not None}
            save_tensors(flat, self._acts(self.rank, nxt))
        self.barrier()  # every rank's state is on disk before the manifest points at it
        if self.rank == 0:
            _write_json_atomic(self.work / MANIFEST, {
                "format": FORMAT, "key": self.key, "threads": self.threads, "committed": nxt,
                "n_blocks": self.n_blocks, "layers": layers, "unreached": unreached,
            })
        for f in self.state.glob(f"acts-r{self.rank}-b*.safetensors"):
            if int(f.stem.rsplit("-b", 1)[1]) < block:  # superseded by a manifest every rank has passed
                f.unlink(missing_ok=True)


def _first_difference(a, b, path: str = "") -> str | None:
    """A readable description of the first difference between two JSON trees, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    if a != b:
        return f"{_describe(path)} ({_short(a)} then, {_short(b)} now)"
    return None


def _describe(path: str) -> str:
    top = path.split(".", 1)[0]
    what = {"config": "the configuration", "input": "the input checkpoint", "calibration": "the calibration data",
            "world_size": "the number of ranks", "save_dtype": "the output dtype"}.get(top, top)
    return f"{what} [{path}]" if "." in path else what


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."
