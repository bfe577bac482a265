"""Trust boundaries: nothing from a checkpoint executes, no pickle is ever unpickled, and no output
replaces what the user did not ask to replace.

- :func:`check_model_dir` — the one check in front of every model directory weightsmith reads
  (``CheckpointSource``, ``eval``'s loader, and :func:`from_pretrained`): it refuses a directory
  whose loading would run code shipped with it (an ``auto_map`` that transformers would follow) or
  whose weights are pickles only.
- :func:`from_pretrained` — the only way weightsmith calls transformers' ``from_pretrained``:
  the check above, then ``trust_remote_code=False`` (transformers never asks, never runs foreign
  code) and, for models, ``use_safetensors=True`` (transformers never opens a pickle).
- :func:`check_output` — an output path that is, contains or lies inside an input (symlinks
  resolved), that is a symlink, or that is a file where a directory goes (or the reverse), is
  refused before any work.
- :class:`OutputLock` — ``.OUT.lock`` beside ``OUT``, held with ``flock`` for the whole run by
  the writers (``model/saving.py`` ``AtomicDir`` and ``engine/checkpoint.py`` ``WorkDir``) before
  they delete or create anything: a second run on the same OUT is refused while the first lives.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import WeightsmithError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


# ---- nothing from a checkpoint executes ---------------------------------------------------------
def _json_object(path: Path) -> dict | None:
    """``path`` as a JSON object, None when absent; a one-line error when unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsmithError(f"{path} is not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{path} is not a JSON object (got a {type(data).__name__})")
    return data


def _code_files(auto_map) -> list[str]:
    """The Python files an ``auto_map`` points at: ``"configuration_x.XConfig"`` → ``configuration_x.py``
    (``"repo--module.Class"`` and ``[slow, fast]`` pairs included)."""
    refs = []
    for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map]):
        refs += v if isinstance(v, (list, tuple)) else [v]
    files = []
    for r in refs:
        if isinstance(r, str) and "." in r:
            mod = r.split("--", 1)[-1].rsplit(".", 1)[0]
            files.append(mod.replace(".", "/") + ".py")
    return sorted(set(files)) or ["<custom code>"]


def _native_model_type(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def _native_tokenizer(tok_cfg: dict, model_type) -> bool:
    """Whether transformers has the tokenizer of ``tokenizer_config.json`` itself (then, with
    ``trust_remote_code=False``, it ignores the ``auto_map`` and runs none of its code)."""
    cls = tok_cfg.get("tokenizer_class")
    if cls is None:
        return _native_model_type(model_type)
    if not isinstance(cls, str):
        return False
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return any(tokenizer_class_from_name(c) is not None for c in (cls, cls.removesuffix("Fast"), cls + "Fast"))
    except Exception:  # noqa: BLE001 - a name transformers cannot resolve is not native
        return False


def check_no_custom_code(d: Path) -> None:
    """Refuse a model directory that can only be loaded by running Python code shipped with it."""
    cfg = _json_object(d / "config.json") or {}
    model_type = cfg.get("model_type")
    for name in CODE_CONFIGS:
        data = cfg if name == "config.json" else _json_object(d / name)
        if not data or "auto_map" not in data:
            continue
        native = _native_model_type(model_type) if name != "tokenizer_config.json" else _native_tokenizer(data, model_type)
        if not native:
            files = ", ".join(_code_files(data["auto_map"]))
            raise WeightsmithError(f"{d / name} asks to run code shipped with the model ({files}); weightsmith never runs "
                                   "a checkpoint's code — use a model whose architecture transformers has built in")
    if cfg and model_type is not None and not _native_model_type(model_type):
        py = sorted(p.name for p in d.glob("*.py"))
        import transformers

        raise WeightsmithError(f"unknown architecture in {d}: model_type {model_type!r} is not built into transformers "
                               f"{transformers.__version__}" + (f" (weightsmith will not run {', '.join(py)})" if py else ""))


def check_no_pickles(d: Path) -> None:
    """Refuse a model directory whose weights are pickles only (``pytorch_model.bin``, ``*.pt``, ...),
    or whose config points transformers at a weight file other than safetensors."""
    cfg = _json_object(d / "config.json") or {}
    explicit = cfg.get("transformers_weights")
    if explicit is not None and not (isinstance(explicit, str) and explicit.endswith((".safetensors", ".safetensors.index.json"))):
        raise WeightsmithError(f"{d / 'config.json'} points at the weight file {explicit!r}; weightsmith loads safetensors only")
    if any(d.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in d.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise WeightsmithError(f"{d} holds only pickle weights ({pickles[0]}); weightsmith loads safetensors only "
                               "(a pickle can run code when loaded): convert it to safetensors first")


def check_model_dir(d: str | Path) -> None:
    """The one check in front of every model directory weightsmith reads (see the module docstring)."""
    d = Path(d)
    if d.is_dir():
        check_no_custom_code(d)
        check_no_pickles(d)


MODEL_CLASS_HINTS = ("Model", "ForCausalLM", "LMHeadModel", "ForMaskedLM", "PreTrainedModel")


def from_pretrained(cls, path: str | Path, **kw):
    """``cls.from_pretrained(path, **kw)`` behind :func:`check_model_dir`, with
    ``trust_remote_code=False`` and, for a model class (not a config or tokenizer, not a GGUF),
    ``use_safetensors=True``."""
    path = Path(path)
    if not kw.get("gguf_file"):
        check_model_dir(path)
    kw["trust_remote_code"] = False
    if _is_model_class(cls) and not kw.get("gguf_file"):
        kw.setdefault("use_safetensors", True)
    return cls.from_pretrained(str(path), **kw)


def _is_model_class(cls) -> bool:
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.auto_factory import _BaseAutoModelClass
    except ImportError:  # pragma: no cover
        return False
    return isinstance(cls, type) and (issubclass(cls, PreTrainedModel) or issubclass(cls, _BaseAutoModelClass))


# ---- no lost data -------------------------------------------------------------------------------
def _real(p: str | Path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False, kind: str = "dir",
                 extra: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an output ``out`` (``kind`` "dir" or "file") that exists (unless
    ``overwrite``), that is a symlink, that is of the other kind, that is or contains the current
    directory, or that is, contains or lies inside any of ``inputs`` (symlinks resolved); ``extra``
    are further paths the run writes (``OUT.partial``), checked against the inputs the same way."""
    p = Path(out)
    if p.exists() and not p.is_symlink() and not overwrite:
        raise WeightsmithError(f"output {p} already exists (pass --overwrite to replace it)")
    if p.is_symlink():
        target = os.readlink(p)
        what = "a dangling symbolic link" if not p.exists() else "a symbolic link"
        raise WeightsmithError(f"output {p} is {what} (to {target}); give the real path of the output")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise WeightsmithError(f"output {p} exists and is not a directory; weightsmith does not replace it")
    if kind == "file" and p.is_dir():
        raise WeightsmithError(f"output {p} is a directory; give the path of the file to write")
    here = _real(os.getcwd())
    if _inside(here, _real(p)):
        raise WeightsmithError(f"output {out} is the current directory or contains it; give a new directory as output")
    for o in [p, *map(Path, extra)]:
        ro = _real(o)
        for i in inputs:
            if i is None:
                continue
            ri = _real(i)
            if _inside(ro, ri) or _inside(ri, ro):
                rel = "is" if ro == ri else "lies inside" if _inside(ro, ri) else "contains"
                raise WeightsmithError(f"output {o} {rel} the input {i}; choose an output path apart from every input")


class OutputLock:
    """``.OUT.lock`` beside ``OUT``, held with ``flock`` from construction to :meth:`release`.

    A second process asking for the same OUT is refused at once. The file is removed (while still
    held) on release; a holder checks after locking that the file it holds is the one at the path,
    so a file unlinked by an earlier holder is never mistaken for the lock. Re-entrant within one
    process (``quantize --format`` holds OUT's lock while ``export`` asks for it again)."""

    _held: dict[str, int] = {}  # lock path → fd, in this process

    def __init__(self, out: str | Path):
        out = Path(out)
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        self._key = _real(self.path)
        if self._key in OutputLock._held:  # already ours: nested, released by the outer holder
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                raise WeightsmithError(f"output directory's parent {out.parent} does not exist") from None
            except PermissionError:
                raise WeightsmithError(f"cannot write to {out.parent} (permission denied)") from None
            except OSError as e:
                if e.errno == errno.EROFS:
                    raise WeightsmithError(f"cannot write to {out.parent} (permission denied: read-only file system)") from None
                raise WeightsmithError(f"cannot create the lock {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise WeightsmithError(f"another weightsmith process is writing {out} (it holds {self.path}); "
                                       "wait for it to finish") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                OutputLock._held[self._key] = fd
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)  # the previous holder removed it between our open and our lock: take a fresh one

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                OutputLock._held.pop(self._key, None)
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
