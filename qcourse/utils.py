"""Checks and small helpers shared by every layer of qcourse (the bottom layer: imports
nothing from qcourse).

``pytorch_quantization`` keeps its small helpers in ``utils``; so does qcourse:

* :func:`reduce_amax` — ``max(|x|)`` over some dims, the statistic every max calibrator
  and dynamic quantizer computes;
* :mod:`quant_logging` (``qcourse.utils.quant_logging``) — the reference's logging helper,
  ``reset_logger_handler()``;
* :func:`is_int`, :func:`check_bool` — argument checks whose errors name the bad value,
  so the layers above never write their own;
* :func:`atomic_write`, :func:`file_sha256` — how qcourse writes a file, and names one by content.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import numbers
import os
import tempfile
from pathlib import Path
import sys
import types

import torch

__all__ = ["is_int", "check_bool", "atomic_write", "file_sha256", "reduce_amax", "quant_logging"]


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


@contextlib.contextmanager
def atomic_write(path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success it becomes ``path`` in one rename.

    Every file qcourse writes for a user goes through here: the temporary file is fsync'ed and
    renamed over ``path`` (``os.replace`` is atomic on one file system), then the folder is
    fsync'ed so the rename survives a power cut. An error or Ctrl-C inside the block removes the
    temporary file, so ``path`` only ever holds the old file or the whole new one. The result
    gets ordinary permissions (``mkstemp`` makes files private). ``suffix`` is for writers that
    look at the extension (``torch.onnx.export``).
    """
    path = Path(path)
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
        os.replace(tmp, path)
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
