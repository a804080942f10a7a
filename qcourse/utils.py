"""Checks shared by every layer of qcourse (the bottom layer: imports nothing from qcourse).

``pytorch_quantization`` keeps its small helpers in ``utils``; so does qcourse. Each check
raises an error that names the bad value, so the layers above never write their own.
"""
from __future__ import annotations

import numbers

__all__ = ["is_int", "check_bool"]


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name: str, value) -> None:
    """Raise ``TypeError`` unless ``value`` is exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
