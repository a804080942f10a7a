"""Lesson 3 — putting quantizers into a model, automatically or by hand.

Automatic insertion patches ``torch.nn`` so that models built afterwards get quantized
layers without changing their code::

    quant_modules.initialize()          # torch.nn.Conv2d is now QuantConv2d
    model = torchvision.models.resnet18()
    quant_modules.deactivate()          # torch.nn is restored

or, scoped: ``with quant_modules.initialize(): model = ...``. Unlike the reference,
calling ``initialize()`` twice is harmless: the originals are remembered once.

Manual insertion rewrites an existing model in place, keeping its weights, and skips the
modules whose names match an ignore list (:func:`replace_modules`). This is how the
YOLOv7 lessons leave sensitive layers in float.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from qcourse.nn import quant_layers as ql
from qcourse.nn.tensor_quantizer import TensorQuantizer
from qcourse.tensor_quant import QuantDescriptor

__all__ = [
    "DEFAULT_QUANT_MAP", "initialize", "deactivate", "is_active", "QuantModuleReplacementHelper",
    "replace_modules", "replace_to_quantization_module", "quant_map", "enable_onnx_export",
]

#: (torch.nn attribute name, quantized class). MaxPool is quantizable (``QuantMaxPool2d``)
#: but, as in pytorch_quantization, not patched by default: max-pooling commutes with
#: quantization, so a Q/DQ in front of it only costs time.
DEFAULT_QUANT_MAP: Tuple[Tuple[str, type], ...] = (
    ("Conv1d", ql.QuantConv1d), ("Conv2d", ql.QuantConv2d), ("Conv3d", ql.QuantConv3d),
    ("ConvTranspose1d", ql.QuantConvTranspose1d), ("ConvTranspose2d", ql.QuantConvTranspose2d),
    ("ConvTranspose3d", ql.QuantConvTranspose3d),
    ("Linear", ql.QuantLinear),
    ("AvgPool1d", ql.QuantAvgPool1d), ("AvgPool2d", ql.QuantAvgPool2d), ("AvgPool3d", ql.QuantAvgPool3d),
    ("AdaptiveAvgPool1d", ql.QuantAdaptiveAvgPool1d), ("AdaptiveAvgPool2d", ql.QuantAdaptiveAvgPool2d),
    ("AdaptiveAvgPool3d", ql.QuantAdaptiveAvgPool3d),
)


#: torch.nn names the reference patches but qcourse has no quantized class for (no QuantLSTM):
#: accepted in ``float_module_list``, where they change nothing.
_UNSUPPORTED_NAMES = ("LSTM", "LSTMCell")


class QuantModuleReplacementHelper:
    """Swaps ``torch.nn`` attributes for quantized classes and back.

    The reference's protocol works: ``prepare_state(float_module_list, custom_map)`` then
    ``apply_quant_modules()`` and ``restore_float_modules()``. The originals are recorded the
    first time only, so ``initialize(); initialize(); deactivate()`` restores the real torch
    classes (the reference toolkit recorded the already-patched classes on the second call
    and could never restore them).
    """

    def __init__(self):
        self.originals: Dict[str, type] = {}
        #: the reference's attributes: the default map and the entries the next apply patches
        self.default_quant_map = [(nn, name, qcls) for name, qcls in DEFAULT_QUANT_MAP]
        self.quant_map: List[Tuple[object, str, type]] = []

    @property
    def active(self) -> bool:
        return bool(self.originals)

    def prepare_state(self, float_module_list: Optional[Sequence[str]] = None,
                      custom_quant_modules: Optional[Sequence[Tuple[object, str, type]]] = None,
                      *, custom_map=None):
        """The ``(module, name, QuantClass)`` entries to patch; also kept for :meth:`apply_quant_modules`.

        ``float_module_list``: torch.nn names to leave in float; ``custom_quant_modules``:
        extra ``(module, "Name", QuantClass)`` triples (patched even if listed as float, as
        in the reference).
        """
        entries = []
        if custom_map is not None:    # the reference's name for the second argument
            custom_quant_modules = custom_map
        if isinstance(float_module_list, str):
            raise TypeError(f"float_module_list must be a list of names, got the string {float_module_list!r}; "
                            f"write [{float_module_list!r}]")
        skip = set(float_module_list or ())
        known = {name for name, _ in DEFAULT_QUANT_MAP}
        unknown = skip - known - set(_UNSUPPORTED_NAMES)
        if unknown:
            raise ValueError(f"float_module_list has names that are not quantized by default: "
                             f"{sorted(unknown)}; valid names: {sorted(known)}")
        for name, qcls in DEFAULT_QUANT_MAP:
            if name not in skip:
                entries.append((nn, name, qcls))
        for entry in custom_quant_modules or ():
            if len(entry) != 3:
                raise ValueError("custom_quant_modules entries must be (module, 'Name', QuantClass), "
                                 f"got {entry!r}")
            if not isinstance(entry[1], str) or not hasattr(entry[0], entry[1]):
                raise ValueError(f"custom_quant_modules entry {entry!r}: {entry[0]!r} has no attribute "
                                 f"{entry[1]!r} to replace; entries are (module, 'Name', QuantClass)")
            entries.append(tuple(entry))
        self.quant_map = entries
        return entries

    def apply_quant_modules(self):
        """Patch the entries of the last :meth:`prepare_state` (the reference's name)."""
        self.apply(self.quant_map)

    def restore_float_modules(self):
        """Put every patched attribute back (the reference's name; safe when nothing is patched)."""
        self.restore()

    def apply(self, entries):
        for mod, name, qcls in entries:
            key = f"{mod.__name__}.{name}"
            if key not in self.originals:
                self.originals[key] = (mod, name, getattr(mod, name))
            setattr(mod, name, qcls)

    def restore(self):
        for mod, name, orig in self.originals.values():
            setattr(mod, name, orig)
        self.originals.clear()


_HELPER = QuantModuleReplacementHelper()


class _Activation:
    """Returned by :func:`initialize`; ``with initialize(): ...`` deactivates on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        deactivate()
        return False


def initialize(float_module_list: Optional[Sequence[str]] = None,
               custom_quant_modules: Optional[Sequence[Tuple[object, str, type]]] = None):
    """Patch ``torch.nn`` so new layers are quantized ones (lesson 3).

    Args:
        float_module_list: torch.nn names to leave alone, e.g. ``["Linear"]``.
        custom_quant_modules: extra ``(module, "Name", QuantClass)`` triples to patch.
    """
    _HELPER.apply(_HELPER.prepare_state(float_module_list, custom_quant_modules))
    return _Activation()


def deactivate():
    """Restore the original ``torch.nn`` classes (safe to call when not active)."""
    _HELPER.restore()


def _torchscript_export(export):
    """``torch.onnx.export`` with ``dynamo=False`` unless the caller chose: the Q/DQ symbolic
    lives on an autograd Function, which only the TorchScript exporter reads (and torch >= 2.9
    defaults to the dynamo exporter, which also needs onnxscript)."""
    @functools.wraps(export)
    def wrapper(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return export(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def enable_onnx_export():
    """``with enable_onnx_export(): torch.onnx.export(model, ...)`` — the reference's switch.

    qcourse's quantizers always export as QuantizeLinear/DequantizeLinear; inside this block
    they also refuse to run without a calibrated amax (the graph would otherwise hold the
    range of the example input) and warn if still calibrating, and ``torch.onnx.export``
    defaults to the TorchScript exporter (``dynamo=False``), which the reference's code
    assumed. Nested use is fine; everything comes back on exit, even if the export raises.
    """
    previous, export = TensorQuantizer._enable_onnx_export, torch.onnx.export
    TensorQuantizer._enable_onnx_export = True
    torch.onnx.export = _torchscript_export(export)
    try:
        yield
    finally:
        TensorQuantizer._enable_onnx_export = previous
        torch.onnx.export = export


def is_active() -> bool:
    return _HELPER.active


# ----------------------------------------------------------------------------- manual
def quant_map() -> Dict[type, type]:
    """float class -> quantized class, for manual replacement (includes MaxPool)."""
    m = {}
    for name, qcls in DEFAULT_QUANT_MAP:
        orig = _HELPER.originals.get(f"torch.nn.{name}", (None, None, getattr(nn, name)))[2]
        m[orig] = qcls
    for name in ("MaxPool1d", "MaxPool2d", "MaxPool3d"):
        orig = _HELPER.originals.get(f"torch.nn.{name}", (None, None, getattr(nn, name)))[2]
        m[orig] = getattr(ql, "Quant" + name)
    return m


def _compile_ignore(ignore) -> List[re.Pattern]:
    if ignore is None:
        return []
    if isinstance(ignore, (str, re.Pattern)):
        ignore = [ignore]
    pats = []
    for p in ignore:
        if isinstance(p, re.Pattern):
            pats.append(p)
        elif isinstance(p, str):
            try:
                pats.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"invalid ignore pattern {p!r}: {e}") from None
        else:
            raise TypeError(f"ignore patterns must be strings or compiled regexes, got {p!r}")
    return pats


def replace_modules(model: nn.Module, ignore: Union[None, str, Iterable[str]] = None,
                    quant_desc_input: Optional[QuantDescriptor] = None,
                    quant_desc_weight: Optional[QuantDescriptor] = None,
                    mapping: Optional[Dict[type, type]] = None,
                    include_maxpool: bool = False) -> List[str]:
    """Replace float layers of ``model`` by quantized ones, in place, keeping weights.

    Args:
        model: any ``nn.Module``.
        ignore: regex pattern(s) matched (``re.match``, i.e. from the start) against each
            module's qualified name, e.g. ``[r"model\\.105\\b", r"model\\.(1|2)\\.conv"]``; a
            matching module and everything below it stays in float.
        quant_desc_input / quant_desc_weight: override the classes' default descriptors.
        mapping: float class -> quant class (default :func:`quant_map`).
        include_maxpool: also quantize MaxPool inputs (off by default, see DEFAULT_QUANT_MAP).

    Returns the names of the replaced modules. Exact types only: a subclass of
    ``nn.Conv2d`` is not replaced (its forward may differ).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pats = _compile_ignore(ignore)
    mapping = dict(mapping) if mapping is not None else quant_map()
    if not include_maxpool:
        for name in ("MaxPool1d", "MaxPool2d", "MaxPool3d"):
            mapping.pop(getattr(nn.modules.pooling, name), None)
    replaced: List[str] = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if any(p.match(full) for p in pats):
                continue
            qcls = mapping.get(type(child))
            if qcls is not None:
                if issubclass(qcls, ql.QuantMixin):
                    new = qcls.from_float(child, quant_desc_input, quant_desc_weight)
                else:
                    new = qcls.from_float(child, quant_desc_input)
                setattr(parent, child_name, new)
                replaced.append(full)
            else:
                visit(child, full)

    visit(model, "")
    return replaced


#: the name the YOLOv7 course code uses
def replace_to_quantization_module(model: nn.Module, ignore_policy=None) -> List[str]:
    """Alias of :func:`replace_modules` with the course's argument name."""
    return replace_modules(model, ignore=ignore_policy)
