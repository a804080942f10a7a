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

# The reference's file layout, for code that imports from it
# (``from pytorch_quantization.nn.modules import _utils``): the same modules under its names.
import sys as _sys

from qcourse.nn import quant_layers as _utils  # noqa: E402
from qcourse.nn import quant_layers as quant_conv, quant_layers as quant_linear  # noqa: E402
from qcourse.nn import quant_layers as quant_pooling, quant_layers as quant_instancenorm  # noqa: E402

modules = _sys.modules[__name__]
