"""Lesson 3 — custom quantized layers built from descriptors.

torch has no module for ``a + b`` or ``torch.cat``, so automatic insertion cannot see them.
A custom layer owns its :class:`TensorQuantizer` objects and decides which tensors share
one. Sharing matters for TensorRT: when both inputs of an ``Add`` (or all inputs of a
``Concat``) carry the same scale, TensorRT fuses the op into INT8 without reformatting.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qcourse.tensor_quant import QuantDescriptor
from qcourse.nn.tensor_quantizer import TensorQuantizer

__all__ = ["QuantAdd", "QuantConcat", "QuantMultiAdd"]


class QuantAdd(nn.Module):
    """``x + y`` with both inputs quantized by ONE shared quantizer (same scale)."""

    def __init__(self, quant_desc: QuantDescriptor = QuantDescriptor(num_bits=8, calib_method="histogram")):
        super().__init__()
        self._input_quantizer = TensorQuantizer(quant_desc)

    def forward(self, x, y):
        return self._input_quantizer(x) + self._input_quantizer(y)


class QuantConcat(nn.Module):
    """``torch.cat(xs, dim)`` with every input quantized by ONE shared quantizer."""

    def __init__(self, dim: int = 1,
                 quant_desc: QuantDescriptor = QuantDescriptor(num_bits=8, calib_method="histogram")):
        super().__init__()
        self.dim = dim
        self._input_quantizer = TensorQuantizer(quant_desc)

    def forward(self, xs: Sequence[torch.Tensor]):
        return torch.cat([self._input_quantizer(x) for x in xs], self.dim)


class QuantMultiAdd(nn.Module):
    """``w * x + y`` with ``w`` quantized per channel (axis 1) and ``x``, ``y`` sharing an
    input quantizer — the custom layer the course builds from two descriptors."""

    def __init__(self, input_desc: QuantDescriptor = QuantDescriptor(num_bits=8, calib_method="histogram"),
                 weight_desc: QuantDescriptor = QuantDescriptor(num_bits=8, axis=1, calib_method="histogram")):
        super().__init__()
        self._input_quantizer = TensorQuantizer(input_desc)
        self._weight_quantizer = TensorQuantizer(weight_desc)

    def forward(self, w, x, y):
        return self._weight_quantizer(w) * self._input_quantizer(x) + self._input_quantizer(y)
