"""Lesson 3 — quantized modules (``from qcourse import nn as quant_nn``).

``quant_nn.TensorQuantizer`` and the quantized layers ``quant_nn.QuantConv2d``,
``quant_nn.QuantLinear``, ``quant_nn.QuantMaxPool2d``, ``quant_nn.QuantAdaptiveAvgPool2d``, …
under the names pytorch_quantization uses.
"""
from qcourse.nn.tensor_quantizer import Switches, TensorQuantizer
from qcourse.nn.quant_layers import *  # noqa: F401,F403
from qcourse.nn.quant_layers import __all__ as _layers_all
from qcourse.nn.custom import QuantAdd, QuantConcat, QuantMultiAdd

__all__ = ["TensorQuantizer", "Switches", "QuantAdd", "QuantConcat", "QuantMultiAdd", *_layers_all]
