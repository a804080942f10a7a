"""Lesson 3 — quantized layers: torch layers with a ``TensorQuantizer`` in front.

Every class here is a drop-in for the torch class it subclasses: same constructor
arguments (plus optional ``quant_desc_input=`` / ``quant_desc_weight=``), same weights
and state_dict keys (plus the quantizers' ``_amax`` buffers), and a forward that is
*exactly* the torch op applied to fake-quantized tensors::

    QuantConv2d(x) == F.conv2d(input_quantizer(x), weight_quantizer(weight), bias, ...)

Layers with weights quantize the input per tensor and the weight per output channel
(TensorRT's recipe); pooling layers quantize their input only.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from qcourse import tensor_quant as tq
from qcourse.tensor_quant import QuantDescriptor
from qcourse.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "QuantMixin", "QuantInputMixin", "pop_quant_desc_in_kwargs",
    "QuantConv1d", "QuantConv2d", "QuantConv3d",
    "QuantConvTranspose1d", "QuantConvTranspose2d", "QuantConvTranspose3d",
    "QuantLinear",
    "QuantMaxPool1d", "QuantMaxPool2d", "QuantMaxPool3d",
    "QuantAvgPool1d", "QuantAvgPool2d", "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d", "QuantAdaptiveAvgPool2d", "QuantAdaptiveAvgPool3d",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d",
]


def _check_desc(name, desc):
    if desc is not None and not isinstance(desc, QuantDescriptor):
        raise TypeError(f"{name} must be a QuantDescriptor or None, got {type(desc).__name__}")
    if desc is not None and not desc.fake_quant:
        # integer codes in front of a float conv would be wrong by the scale: the reference
        # refuses them with ValueError too
        raise ValueError(f"{name} has fake_quant=False, but quantized layers only fake-quantize "
                         "(their torch op needs float inputs); use fake_quant=True, or a "
                         "TensorQuantizer on its own to get integer codes")


def pop_quant_desc_in_kwargs(quant_cls, input_only: bool = False, **kwargs):
    """Take ``quant_desc_input`` / ``quant_desc_weight`` out of kwargs (class defaults if absent).

    Returns ``quant_desc_input`` (input_only) or ``(quant_desc_input, quant_desc_weight)``;
    any other keyword left over is an error.
    """
    desc_in = kwargs.pop("quant_desc_input", None)
    _check_desc("quant_desc_input", desc_in)
    desc_in = desc_in or quant_cls.default_quant_desc_input
    if input_only:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for {quant_cls.__name__}: {sorted(kwargs)}")
        return desc_in
    desc_w = kwargs.pop("quant_desc_weight", None)
    _check_desc("quant_desc_weight", desc_w)
    desc_w = desc_w or quant_cls.default_quant_desc_weight
    if kwargs:
        raise TypeError(f"unexpected keyword arguments for {quant_cls.__name__}: {sorted(kwargs)}")
    return desc_in, desc_w


class QuantInputMixin:
    """Adds ``_input_quantizer``; class-level default descriptor, settable per class."""

    default_quant_desc_input = tq.QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor):
        _check_desc("value", value)
        cls.default_quant_desc_input = value

    def init_quantizer(self, quant_desc_input: QuantDescriptor):
        self._input_quantizer = TensorQuantizer(quant_desc_input)

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None):
        """A quantized copy of ``module`` sharing its parameters (no re-initialisation)."""
        new = _copy_module_as(module, cls)
        new.init_quantizer(pop_quant_desc_in_kwargs(cls, input_only=True, quant_desc_input=quant_desc_input))
        return new


class QuantMixin(QuantInputMixin):
    """Adds ``_input_quantizer`` and ``_weight_quantizer``."""

    default_quant_desc_weight = tq.QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor):
        _check_desc("value", value)
        cls.default_quant_desc_weight = value

    def init_quantizer(self, quant_desc_input: QuantDescriptor, quant_desc_weight: QuantDescriptor):
        self._input_quantizer = TensorQuantizer(quant_desc_input)
        self._weight_quantizer = TensorQuantizer(quant_desc_weight)

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None,
                   quant_desc_weight: Optional[QuantDescriptor] = None):
        new = _copy_module_as(module, cls)
        new.init_quantizer(*pop_quant_desc_in_kwargs(cls, quant_desc_input=quant_desc_input,
                                                     quant_desc_weight=quant_desc_weight))
        return new


def _copy_module_as(module: nn.Module, cls):
    base = cls.__mro__[[issubclass(c, nn.Module) and not issubclass(c, QuantInputMixin)
                        for c in cls.__mro__].index(True)]
    if not isinstance(module, base):
        raise TypeError(f"{cls.__name__}.from_float expects a {base.__name__}, got {type(module).__name__}")
    new = cls.__new__(cls)
    for k, v in vars(module).items():
        # containers are copied so that adding quantizers does not touch the original
        new.__dict__[k] = v.copy() if isinstance(v, dict) else v
    return new


def _init_with_descs(self, base, args, kwargs, input_only=False):
    descs = {k: kwargs.pop(k) for k in ("quant_desc_input", "quant_desc_weight") if k in kwargs}
    base.__init__(self, *args, **kwargs)
    if input_only:
        self.init_quantizer(pop_quant_desc_in_kwargs(type(self), input_only=True, **descs))
    else:
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **descs))


# ----------------------------------------------------------------------------- convolutions
class _QuantConvNd(QuantMixin):
    _base = None

    def __init__(self, *args, **kwargs):
        _init_with_descs(self, self._base, args, kwargs)

    def forward(self, input):
        return self._conv_forward(self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with per-tensor input and per-output-channel weight quantization."""
    _base = nn.Conv1d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with per-tensor input and per-output-channel weight quantization."""
    _base = nn.Conv2d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` with per-tensor input and per-output-channel weight quantization."""
    _base = nn.Conv3d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL


class _QuantConvTransposeNd(QuantMixin):
    _base = None
    _nd = 0
    _fn = None

    def __init__(self, *args, **kwargs):
        _init_with_descs(self, self._base, args, kwargs)

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported for {type(self).__name__}, "
                             f"got {self.padding_mode!r}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, self._nd, self.dilation)
        return type(self)._fn(self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias,
                              self.stride, self.padding, output_padding, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d``; weight (in, out, k) quantized per output channel (axis 1)."""
    _base, _nd, _fn = nn.ConvTranspose1d, 1, F.conv_transpose1d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; weight (in, out, kh, kw) quantized per output channel (axis 1)."""
    _base, _nd, _fn = nn.ConvTranspose2d, 2, F.conv_transpose2d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d``; weight quantized per output channel (axis 1)."""
    _base, _nd, _fn = nn.ConvTranspose3d, 3, F.conv_transpose3d
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL


# ----------------------------------------------------------------------------- linear
class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with per-tensor input and per-row (output feature) weight quantization."""
    default_quant_desc_weight = tq.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
    _base = nn.Linear  # captured now: torch.nn.Linear may be patched to this class later

    def __init__(self, *args, **kwargs):
        _init_with_descs(self, self._base, args, kwargs)

    def forward(self, input):
        return F.linear(self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias)


# ----------------------------------------------------------------------------- pooling
def _input_only(base, doc):
    class _Q(QuantInputMixin, base):
        __doc__ = doc

        def __init__(self, *args, **kwargs):
            _init_with_descs(self, base, args, kwargs, input_only=True)

        def forward(self, input, *args, **kwargs):
            return base.forward(self, self._input_quantizer(input), *args, **kwargs)

    _Q.__name__ = _Q.__qualname__ = "Quant" + base.__name__
    _Q.__module__ = __name__
    return _Q


QuantMaxPool1d = _input_only(nn.MaxPool1d, "``nn.MaxPool1d`` with its input quantized per tensor.")
QuantMaxPool2d = _input_only(nn.MaxPool2d, "``nn.MaxPool2d`` with its input quantized per tensor.")
QuantMaxPool3d = _input_only(nn.MaxPool3d, "``nn.MaxPool3d`` with its input quantized per tensor.")
QuantAvgPool1d = _input_only(nn.AvgPool1d, "``nn.AvgPool1d`` with its input quantized per tensor.")
QuantAvgPool2d = _input_only(nn.AvgPool2d, "``nn.AvgPool2d`` with its input quantized per tensor.")
QuantAvgPool3d = _input_only(nn.AvgPool3d, "``nn.AvgPool3d`` with its input quantized per tensor.")
QuantAdaptiveAvgPool1d = _input_only(nn.AdaptiveAvgPool1d, "``nn.AdaptiveAvgPool1d``, input quantized.")
QuantAdaptiveAvgPool2d = _input_only(nn.AdaptiveAvgPool2d, "``nn.AdaptiveAvgPool2d``, input quantized.")
QuantAdaptiveAvgPool3d = _input_only(nn.AdaptiveAvgPool3d, "``nn.AdaptiveAvgPool3d``, input quantized.")

# instance norm: the reference quantizes its input only (the statistics stay in float)
QuantInstanceNorm1d = _input_only(nn.InstanceNorm1d, "``nn.InstanceNorm1d`` with its input quantized per tensor.")
QuantInstanceNorm2d = _input_only(nn.InstanceNorm2d, "``nn.InstanceNorm2d`` with its input quantized per tensor.")
QuantInstanceNorm3d = _input_only(nn.InstanceNorm3d, "``nn.InstanceNorm3d`` with its input quantized per tensor.")

# pytorch_quantization also exposes the layers under their torch names: quant_nn.Conv2d
Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d
Linear = QuantLinear
MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = (
    QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d)
