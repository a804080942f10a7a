"""Checks and small helpers shared by every layer of qcourse (the bottom layer: imports
nothing from qcourse).

``pytorch_quantization`` keeps its small helpers in ``utils``; so does qcourse:

* :func:`reduce_amax` — ``max(|x|)`` over some dims, the statistic every max calibrator
  and dynamic quantizer computes;
* :mod:`quant_logging` (``qcourse.utils.quant_logging``) — the reference's logging helper,
  ``reset_logger_handler()``;
* :func:`is_int`, :func:`check_bool` — argument checks whose errors name the bad value,
  so the layers above never write their own;
* :func:`atomic_write`, :func:`file_sha256` — how qcourse writes a file, and names one by content;
  :func:`is_owned`, :func:`remove_owned`, :func:`check_writable` — qcourse replaces or deletes
  only the files it wrote (listed by SHA-256 in each folder's ``.qcourse-files.json``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import numbers
import os
import tempfile
from pathlib import Path
import sys
import types

import torch

__all__ = ["is_int", "check_bool", "atomic_write", "check_writable", "is_owned", "remove_owned",
           "remove_owned_tree", "NotOwnedError", "OWNED_LIST", "file_sha256", "reduce_amax", "quant_logging"]


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name: str, value) -> None:
    """Raise ``TypeError`` unless ``value`` is exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _dims(name: str, axis, ndim: int) -> tuple:
    """``axis`` (an int or a sequence of ints) as sorted non-negative dims, checked."""
    axes = (axis,) if is_int(axis) else axis
    if not isinstance(axes, (tuple, list)) or not all(is_int(a) for a in axes):
        raise TypeError(f"{name} must be None, an int or a tuple of ints, got {axis!r}")
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for a {ndim}-D tensor; "
                             f"use dims in {-ndim}..{ndim - 1}")
    dims = sorted({int(a) % ndim for a in axes})
    if len(dims) != len(axes):
        raise ValueError(f"{name}={axis!r} names the same dim twice for a {ndim}-D tensor")
    return tuple(dims)


def reduce_amax(input: torch.Tensor, axis=None, keepdims: bool = True, exclude_axis=None) -> torch.Tensor:
    """``max(|input|)`` over ``axis`` (numpy's convention), without gradient.

    Args:
        input: a tensor.
        axis: the dims to reduce: None (all: a 0-d result, as pytorch_quantization returns
            whatever ``keepdims`` says), an int or a tuple of ints.
        keepdims: keep each reduced dim with size 1 (True, the default) or drop it.
        exclude_axis: the dims to keep instead (reduce all others): ``exclude_axis=0`` on a
            KCRS weight gives the per-output-channel amax, shape ``(K, 1, 1, 1)``. Not with
            ``axis``.

    Raises ``ValueError`` for out-of-range or repeated dims and for an empty tensor.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    check_bool("keepdims", keepdims)
    if input.numel() == 0:
        raise ValueError(f"reduce_amax of an empty tensor (shape {tuple(input.shape)}) has no maximum")
    if exclude_axis is not None:
        if axis is not None:
            raise ValueError(f"give axis (dims to reduce) or exclude_axis (dims to keep), not both: "
                             f"axis={axis!r}, exclude_axis={exclude_axis!r}")
        keep = _dims("exclude_axis", exclude_axis, input.dim())
        axis = tuple(d for d in range(input.dim()) if d not in keep)
        if not axis:               # every dim kept: the amax of each element is |x|
            return input.detach().abs()
    with torch.no_grad():
        x = input.detach().abs()
        if axis is None:
            return torch.amax(x) if x.dim() else x
        return torch.amax(x, dim=_dims("axis", axis, input.dim()), keepdim=keepdims)


def _reset_logger_handler() -> None:
    """Remove every handler of the root logger (the reference's fix for code that added its own)."""
    root = logging.getLogger()
    while root.handlers:
        root.removeHandler(root.handlers[0])


# ``pytorch_quantization.utils.quant_logging`` is a module; so is this, registered under its
# dotted name so that ``import qcourse.utils.quant_logging`` works like ``from qcourse.utils
# import quant_logging``.
quant_logging = types.ModuleType(f"{__name__}.quant_logging", "Logging helpers of pytorch_quantization.")
quant_logging.reset_logger_handler = _reset_logger_handler
quant_logging.__all__ = ["reset_logger_handler"]
sys.modules[quant_logging.__name__] = quant_logging


#: the file in each folder qcourse writes to that lists, by SHA-256, the files qcourse wrote there
OWNED_LIST = ".qcourse-files.json"
_OWNED_LIST_MAX = 16 << 20  # bytes: a list of a few hundred names; anything larger is not ours


class NotOwnedError(ValueError):
    """A file qcourse was about to replace or delete was not written by qcourse (or changed since)."""


def _check_replaceable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file: pass a file path", str(path))
    if (path.exists() or path.is_symlink()) and not is_owned(path):
        raise NotOwnedError(f"{path} exists and was not written by qcourse (or was changed since): qcourse "
                            "replaces only its own files; move it away or pass another output path")


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on ``folder`` (flock on the folder itself: no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        yield
        return
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_owned(folder: Path) -> dict:
    """The folder's list of qcourse's files ``{name: sha256}`` (empty where there is none or it is damaged)."""
    path = folder / OWNED_LIST
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        data = load_json(path, _OWNED_LIST_MAX, "qcourse's list of its files", "move it away")
    except (InputFileError, OSError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def _write_owned(folder: Path, files: dict) -> None:
    path = folder / OWNED_LIST
    if not files:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(prefix=f"{OWNED_LIST}.", suffix=".tmp", dir=str(folder))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"about": "files written by qcourse in this folder, by SHA-256: qcourse replaces or deletes "
                            "only these, and only while unchanged", "files": dict(sorted(files.items()))}, f,
                  indent=1)
    os.replace(tmp, path)


def is_owned(path) -> bool:
    """True when ``path`` is a file qcourse wrote (through :func:`atomic_write`) and nobody changed since."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    digest = _read_owned(path.parent).get(path.name)
    return digest is not None and digest == file_sha256(path)


def remove_owned(path) -> bool:
    """Delete ``path`` if qcourse wrote it and it is unchanged; True when it was deleted.

    A file qcourse did not write (or that was edited) is left where it is, and so is a folder.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _folder_lock(path.parent):
        if not is_owned(path):
            return False
        path.unlink()
        files = _read_owned(path.parent)
        files.pop(path.name, None)
        _write_owned(path.parent, files)
    return True


def remove_owned_tree(folder) -> bool:
    """Delete qcourse's unchanged files under ``folder`` (at every depth), then each folder left empty.

    Anything else (a user's file, an edited one, a link) stays where it is, and so do the folders
    holding it; True when ``folder`` itself is gone. Entries of the folders' lists whose files are
    gone (moved elsewhere) are dropped.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.is_symlink():
            remove_owned_tree(sub)
        elif sub.name != OWNED_LIST:
            remove_owned(sub)
    with _folder_lock(folder):
        files = _read_owned(folder)
        present = {name: digest for name, digest in files.items() if (folder / name).is_file()}
        if present != files:
            _write_owned(folder, present)
    with contextlib.suppress(OSError):  # not empty: something qcourse did not write is left in it
        folder.rmdir()
    return not folder.exists()


def check_writable(*paths) -> None:
    """Refuse, before any work, to write over files qcourse did not write (see :func:`atomic_write`)."""
    for path in paths:
        _check_replaceable(Path(path))


@contextlib.contextmanager
def atomic_write(path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success it becomes ``path`` in one rename.

    Every file qcourse writes for a user goes through here: the temporary file is fsync'ed and
    renamed over ``path`` (``os.replace`` is atomic on one file system), then the folder is
    fsync'ed so the rename survives a power cut. An error or Ctrl-C inside the block removes the
    temporary file, so ``path`` only ever holds the old file or the whole new one. The result
    gets ordinary permissions (``mkstemp`` makes files private). ``suffix`` is for writers that
    look at the extension (``torch.onnx.export``).

    Ownership: qcourse never replaces a file it did not write. Each folder it writes to keeps a
    list of its files by SHA-256 (``.qcourse-files.json``); an existing ``path`` that is not on
    that list, or was changed since, raises :class:`NotOwnedError` (checked before the block
    runs and again, under a lock on the folder, before the rename), and a folder raises
    ``IsADirectoryError``. :func:`remove_owned` deletes by the same rule.
    """
    path = Path(path)
    _check_replaceable(path)  # before the work: a refusal costs nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        digest = file_sha256(tmp)
        with _folder_lock(path.parent):
            _check_replaceable(path)  # again: someone may have put a file there meanwhile
            os.replace(tmp, path)
            files = _read_owned(path.parent)
            files[path.name] = digest
            _write_owned(path.parent, files)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        dfd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB pieces: checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- files and sizes from users
# Every file a user hands to qcourse (annotations, results to resume, ONNX models, checkpoints) is
# bounded before it is read: its size is checked against what a real file of its kind can weigh, and
# JSON is parsed from those bytes only, so a huge or hostile file is refused in one line instead of
# filling the memory or overflowing the stack.
__all__ += ["InputFileError", "format_bytes", "check_file_size", "read_bounded", "load_json",
            "NotEnoughMemoryError", "available_memory", "check_memory", "INPUT_MEMORY_SHARE"]

class InputFileError(ValueError):
    """A file given to qcourse that it does not read: larger than a file of its kind can be, not
    JSON, or nested deeper than one. The message is ``"{path} {problem}; {fix}"``; the three parts
    are attributes, for callers that say it in their own words."""

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} {problem}; {fix}")


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a leading digit: ``"1.5 GiB"``, ``"512 bytes"``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def check_file_size(path, limit: int, what: str, fix: str) -> int:
    """The size of ``path`` in bytes; :class:`InputFileError` when it is larger than ``limit``.

    Only the file system is asked (``stat``): nothing of the file is read. ``what`` names the kind
    of file and what a real one weighs, e.g. ``"a COCO annotation file (instances_train2017.json:
    448 MiB)"``; ``fix`` says what to pass instead. A missing file raises ``FileNotFoundError``.
    """
    size = os.stat(path).st_size
    if size > limit:
        raise InputFileError(path, f"is {format_bytes(size)}, more than the {format_bytes(limit)} qcourse "
                                   f"reads of {what}", fix)
    return size


def read_bounded(path, limit: int, what: str, fix: str) -> bytes:
    """The bytes of ``path``, refused (:class:`InputFileError`) beyond ``limit`` bytes.

    The size is checked before reading (:func:`check_file_size`), and the read stops one byte past
    ``limit``: a file that grew meanwhile, a pipe or a device (whose size ``stat`` does not know)
    cannot make it read more.
    """
    check_file_size(path, limit, what, fix)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputFileError(path, f"holds more than the {format_bytes(limit)} qcourse reads of {what}", fix)
    return data


def load_json(path, limit: int, what: str, fix: str):
    """The JSON value in ``path``, read with :func:`read_bounded`.

    Invalid JSON, bytes that are not text, and nesting deeper than Python's parser follows (a
    ``RecursionError`` otherwise) raise :class:`InputFileError` naming the file, the problem and
    ``fix``.
    """
    data = read_bounded(path, limit, what, fix)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    except UnicodeDecodeError as e:
        problem = f"is not a text (JSON) file ({e})"
    except RecursionError:
        problem = "nests its JSON lists or objects deeper than Python's parser follows (a damaged or hostile file)"
    raise InputFileError(path, problem, fix)


class NotEnoughMemoryError(ValueError):
    """Work refused before it starts because its input alone would take too much of the memory."""


#: the share of the available memory that one batch of input may take: a network's activations
#: take many times its input, so a batch past this share cannot run
INPUT_MEMORY_SHARE = 0.25


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None where there is none."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            rel = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes of memory that new work can still get here, or None where it cannot be told.

    Linux's estimate (``MemAvailable`` in ``/proc/meminfo``), lowered to the room left under this
    process's cgroup limit (a container's); elsewhere the physical memory (``os.sysconf``).
    """
    avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def check_memory(nbytes: int, what: str, fix: str, share: float = INPUT_MEMORY_SHARE) -> None:
    """Refuse (:class:`NotEnoughMemoryError`) work whose input of ``nbytes`` bytes would take more
    than ``share`` of :func:`available_memory`, before anything is allocated.

    ``what`` names the input (``"a batch of 32 images of 640x640 pixels"``), ``fix`` says how to
    make it smaller. Where the available memory cannot be told, nothing is refused.
    """
    avail = available_memory()
    if avail is not None and nbytes > share * avail:
        raise NotEnoughMemoryError(
            f"{what} takes {format_bytes(nbytes)}, more than {share:.0%} of the {format_bytes(avail)} of memory "
            f"available here (the model needs the rest and more); {fix}")
