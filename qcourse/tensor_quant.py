"""Lesson 2 — ``tensor_quant``: how a tensor is described, quantized and fake-quantized.

This module mirrors ``pytorch_quantization.tensor_quant`` so that a learner can map
the course onto NVIDIA's toolkit name for name:

* :class:`QuantDescriptor` (alias of :class:`ScaledQuantDescriptor`) — how a tensor
  should be quantized: bits, sign, narrow range, per-tensor or per-channel ``axis``,
  a fixed or learnable ``amax``, and the calibration method.
* :func:`tensor_quant` — the integer codes and the scale (``codes / scale ~= x``).
* :func:`fake_tensor_quant` — quantize then dequantize in one step: the output is still
  a float tensor, but only takes the values ``k * amax / max_bound``.
* :func:`affine_tensor_quant` / :func:`fake_affine_tensor_quant` — the asymmetric
  (zero-point) mapping that lesson 1 compares with the symmetric one.

Conventions (identical to TensorRT's and ONNX's ``QuantizeLinear``):

* ``max_bound = 2**(num_bits - 1 + unsigned) - 1`` (127 for signed 8-bit, 255 unsigned);
  ``min_bound = 0`` when unsigned, ``-max_bound`` with ``narrow_range`` and
  ``-max_bound - 1`` (the -128 code) otherwise.
* The quantization *step* (ONNX's ``y_scale``) is ``amax / max_bound`` in float32, and
  ``code = clamp(round_half_to_even(x / step), min_bound, max_bound)``. The reference
  toolkit reports ``scale = max_bound / amax`` instead; :func:`tensor_quant` returns that
  number for compatibility, but the arithmetic divides by the step exactly as ONNX Runtime
  and TensorRT do, so training-time fake quantization and the exported graph agree bit
  for bit.
* ``amax <= 2**-24`` quantizes everything to zero (scale reported as 1.0).
* FP16 inputs are computed in float32 and returned in FP16.
* Backward: the straight-through estimator with clipping — the gradient passes
  unchanged where ``|x| <= amax`` and is zero outside. When ``amax`` requires a gradient
  it receives the PACT gradient: the sum of the incoming gradient over the clipped
  elements, signed by the side they were clipped on.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "ScaledQuantDescriptor",
    "QuantDescriptor",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
    "quant_bounds",
    "tensor_quant",
    "fake_tensor_quant",
    "affine_tensor_quant",
    "fake_affine_tensor_quant",
    "TensorQuantFunction",
    "FakeTensorQuantFunction",
    "AMAX_EPSILON",
    "FP16_MAX",
]

#: amax at or below this value quantizes the tensor to zero (the smallest FP16 subnormal).
AMAX_EPSILON = 2.0 ** -24
#: Largest finite FP16 value; a scale above it cannot be represented in FP16.
FP16_MAX = 65504.0

_CALIB_METHODS = ("max", "histogram")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_num_bits(num_bits) -> None:
    if not _is_int(num_bits):
        raise TypeError(f"num_bits must be an int, got {num_bits!r} of type {type(num_bits).__name__}")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be in 2..16, got {num_bits}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def quant_bounds(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True) -> Tuple[int, int]:
    """Return ``(min_bound, max_bound)``, the smallest and largest integer code.

    >>> quant_bounds(8), quant_bounds(8, narrow_range=False), quant_bounds(8, unsigned=True)
    ((-127, 127), (-128, 127), (0, 255))
    """
    _check_num_bits(num_bits)
    max_bound = 2 ** (num_bits - 1 + int(unsigned)) - 1
    if unsigned:
        min_bound = 0
    elif narrow_range:
        min_bound = -max_bound
    else:
        min_bound = -max_bound - 1
    return min_bound, max_bound


# ----------------------------------------------------------------------------------------
# The descriptor
# ----------------------------------------------------------------------------------------
class ScaledQuantDescriptor:
    """How a tensor should be quantized (lesson 2).

    Args:
        num_bits: bits of the integer code, 2..16. Default 8.
        name: optional name, used in reprs.

    Keyword Args:
        fake_quant: quantize-dequantize (True, the only mode TensorRT export uses) or return
            integer codes (False). Default True.
        axis: ``None`` for one amax per tensor, an int or a tuple of ints for one amax per
            slice along those axes (axis 0 of a KCRS conv weight = per output channel).
        amax: a fixed amax (float, list or ndarray). ``None``: calibrated or dynamic.
        learn_amax: make amax a trainable parameter (per-tensor only). Default False.
        scale_amax: multiply amax by this factor before quantizing (for experiments).
        calib_method: ``"max"`` or ``"histogram"``. Default ``"max"``.
        unsigned: quantize to ``0..2**num_bits - 1`` (inputs must be >= 0). Default False.
        narrow_range: use ``-max_bound..max_bound`` (no -128 code). Default False.

    Every invalid value raises a ``TypeError`` or ``ValueError`` that names it.
    """

    def __init__(self, num_bits: int = 8, name: Optional[str] = None, **kwargs):
        _check_num_bits(num_bits)
        self._num_bits = int(num_bits)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self._name = name

        self._fake_quant = kwargs.pop("fake_quant", True)
        _check_bool("fake_quant", self._fake_quant)

        self._axis = self._check_axis(kwargs.pop("axis", None))

        self._learn_amax = kwargs.pop("learn_amax", False)
        _check_bool("learn_amax", self._learn_amax)
        if self._learn_amax and self._axis is not None:
            raise TypeError(
                f"learn_amax=True supports per-tensor amax only; got axis={self._axis!r}. "
                "Use axis=None, or learn_amax=False for per-channel quantization."
            )

        self._amax = self._check_amax(kwargs.pop("amax", None))

        scale_amax = kwargs.pop("scale_amax", None)
        if scale_amax is not None:
            if not isinstance(scale_amax, numbers.Real) or isinstance(scale_amax, bool):
                raise TypeError(f"scale_amax must be a float or None, got {scale_amax!r}")
            if not np.isfinite(scale_amax) or scale_amax <= 0:
                raise ValueError(f"scale_amax must be a finite number > 0, got {scale_amax}")
            scale_amax = float(scale_amax)
        self._scale_amax = scale_amax

        self._calib_method = kwargs.pop("calib_method", "max")
        if self._calib_method not in _CALIB_METHODS:
            raise ValueError(
                f"calib_method must be one of {_CALIB_METHODS}, got {self._calib_method!r}. "
                "entropy, mse and percentile are ways to compute amax from a 'histogram' "
                "calibrator: pass them to load_calib_amax(method=...)."
            )

        self._unsigned = kwargs.pop("unsigned", False)
        _check_bool("unsigned", self._unsigned)
        self._narrow_range = kwargs.pop("narrow_range", False)
        _check_bool("narrow_range", self._narrow_range)

        if kwargs:
            raise TypeError(f"Unknown QuantDescriptor arguments: {sorted(kwargs)}")

    @staticmethod
    def _check_axis(axis):
        if axis is None:
            return None
        if _is_int(axis):
            return int(axis)
        if isinstance(axis, (tuple, list)):
            if len(axis) == 0:
                raise ValueError("axis must not be an empty tuple; use axis=None for per-tensor")
            for a in axis:
                if not _is_int(a):
                    raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
            if len(set(axis)) != len(axis):
                raise ValueError(f"axis has repeated entries: {axis!r}")
            return tuple(int(a) for a in axis) if len(axis) > 1 else int(axis[0])
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")

    @staticmethod
    def _check_amax(amax):
        if amax is None:
            return None
        if isinstance(amax, torch.Tensor):
            amax = amax.detach().cpu().numpy()
        if isinstance(amax, bool) or not isinstance(amax, (numbers.Real, list, tuple, np.ndarray)):
            raise TypeError(f"amax must be a float, list or ndarray, got {type(amax).__name__}")
        arr = np.array(amax, dtype=np.float32)
        if arr.size == 0:
            raise ValueError("amax must not be empty")
        if np.isnan(arr).any():
            raise ValueError(f"amax must not be NaN, got {amax!r}; calibrate on finite data")
        if (arr < 0).any():
            raise ValueError(f"amax must be >= 0, got {amax!r}")
        if np.isinf(arr).any():
            raise ValueError(f"amax must be finite, got {amax!r}")
        return arr

    # read-only properties: predefined descriptors are shared by many layers
    num_bits = property(lambda self: self._num_bits)
    name = property(lambda self: self._name)
    fake_quant = property(lambda self: self._fake_quant)
    axis = property(lambda self: self._axis)
    amax = property(lambda self: self._amax)
    learn_amax = property(lambda self: self._learn_amax)
    scale_amax = property(lambda self: self._scale_amax)
    calib_method = property(lambda self: self._calib_method)
    unsigned = property(lambda self: self._unsigned)
    narrow_range = property(lambda self: self._narrow_range)

    def dict(self) -> dict:
        """The descriptor as keyword arguments: ``QuantDescriptor(**d.dict())`` copies it."""
        out = {"num_bits": self._num_bits}
        if self._name is not None:
            out["name"] = self._name
        if not self._fake_quant:
            out["fake_quant"] = False
        if self._axis is not None:
            out["axis"] = self._axis
        if self._amax is not None:
            out["amax"] = self._amax.tolist()
        if self._learn_amax:
            out["learn_amax"] = True
        if self._scale_amax is not None:
            out["scale_amax"] = self._scale_amax
        if self._calib_method != "max":
            out["calib_method"] = self._calib_method
        if self._unsigned:
            out["unsigned"] = True
        if self._narrow_range:
            out["narrow_range"] = True
        return out

    def replace(self, **changes) -> "ScaledQuantDescriptor":
        """A copy with some fields changed (descriptors themselves are immutable)."""
        d = self.dict()
        d.update(changes)
        return type(self)(**d)

    def __eq__(self, other):
        if not isinstance(other, ScaledQuantDescriptor):
            return NotImplemented
        return self.dict() == other.dict()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.dict().items())
        return f"QuantDescriptor({args})"


QuantDescriptor = ScaledQuantDescriptor

QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=0)
# ConvTranspose weights are (in, out/groups, k...): the output channel is axis 1.
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)


# ----------------------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------------------
# Per-tensor CPU tensors larger than this are processed in cache-sized chunks so that the
# four elementwise passes (divide, round, clamp, multiply) hit cache instead of memory.
_CHUNK = 1 << 16
_CHUNK_MIN_NUMEL = 1 << 20


def _as_amax_tensor(amax, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor):
        if isinstance(amax, bool) or not isinstance(amax, (numbers.Real, list, tuple, np.ndarray)):
            raise TypeError(f"amax must be a float or a tensor, got {type(amax).__name__}")
        amax = torch.as_tensor(np.asarray(amax, dtype=np.float32), device=like.device)
    return amax


def _validate(inputs: torch.Tensor, amax: torch.Tensor, num_bits, unsigned, narrow_range) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating point tensor, got dtype {inputs.dtype}")
    _check_num_bits(num_bits)
    _check_bool("unsigned", unsigned)
    _check_bool("narrow_range", narrow_range)
    if amax.numel() == 0:
        raise ValueError("amax is empty; calibrate the quantizer or pass a value")
    a = amax.detach()
    if torch.isnan(a).any():
        raise ValueError(f"amax must not be NaN, got {a.flatten()[:8].tolist()}; calibrate on finite data")
    amin = float(a.min())
    if amin < 0:
        raise ValueError(f"amax must be >= 0, got {amin}")
    if amax.dtype == torch.half:
        _, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
        scale = max_bound / a.float().clamp_min(AMAX_EPSILON)
        big = float(scale[a.float() > AMAX_EPSILON].max()) if bool((a.float() > AMAX_EPSILON).any()) else 0.0
        if big > FP16_MAX:
            raise ValueError(
                f"scale {big:.6g} = {max_bound}/amax overflows FP16 (max {FP16_MAX}): amax "
                f"{float(a.float().min()):.3g} is too small for an FP16 scale. Keep amax in "
                "float32 (quantizer.float()) or raise amax."
            )
    if unsigned and inputs.numel() and float(inputs.detach().min()) < 0:
        raise ValueError(
            f"unsigned quantization got a negative input (min {float(inputs.detach().min()):.6g}); "
            "use unsigned=False, or quantize only non-negative tensors (after ReLU)"
        )


def _step_and_mask(amax32: torch.Tensor, max_bound: int):
    """float32 step ``amax / max_bound`` (the ONNX y_scale) with tiny amax replaced by 1."""
    tiny = amax32 <= AMAX_EPSILON
    step = amax32 / max_bound
    if bool(tiny.any()):
        step = torch.where(tiny, torch.ones_like(step), step)
        return step, tiny
    return step, None


def _codes(x32: torch.Tensor, step: torch.Tensor, tiny, min_bound: int, max_bound: int,
           dequantize: bool) -> torch.Tensor:
    """``clamp(round(x / step))`` (times ``step`` if ``dequantize``), computed in float32."""
    if (
        step.numel() == 1
        and tiny is None
        and x32.device.type == "cpu"
        and x32.is_contiguous()
        and x32.numel() >= _CHUNK_MIN_NUMEL
    ):
        # Cache-blocked: one read and one write of the big tensor instead of four each.
        s = float(step)
        flat = x32.reshape(-1)
        out = torch.empty_like(flat)
        for start in range(0, flat.numel(), _CHUNK):
            o = out[start:start + _CHUNK]
            torch.div(flat[start:start + _CHUNK], s, out=o)
            o.round_().clamp_(min_bound, max_bound)
            if dequantize:
                o.mul_(s)
        return out.view_as(x32)
    out = torch.div(x32, step).round_().clamp_(min_bound, max_bound)
    if tiny is not None:
        out.masked_fill_(tiny.expand_as(out) if tiny.dim() else tiny, 0.0)
    if dequantize:
        out.mul_(step)
    return out


def _clip_mask_grads(ctx, grad_outputs):
    inputs, amax = ctx.saved_tensors
    amax_f = amax.to(inputs.dtype)
    inside = inputs.abs() <= amax_f
    grad_inputs = torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs))
    grad_amax = None
    if ctx.needs_input_grad[1]:
        # PACT: d clip(x, -a, a) / d a = sign(x) outside the range, 0 inside.
        g = torch.where(inside, torch.zeros_like(grad_outputs), grad_outputs * torch.sign(inputs))
        # reduce to amax's shape (amax broadcasts against inputs)
        while g.dim() > amax.dim():
            g = g.sum(0)
        for d in range(amax.dim()):
            if amax.shape[d] == 1 and g.shape[d] != 1:
                g = g.sum(d, keepdim=True)
        grad_amax = g.to(amax.dtype).reshape(amax.shape)
    return grad_inputs, grad_amax


class TensorQuantFunction(torch.autograd.Function):
    """Integer codes and the reference-style scale (``max_bound / amax``)."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        ctx.save_for_backward(inputs, amax)
        min_bound, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
        amax32 = amax.float()
        step, tiny = _step_and_mask(amax32, max_bound)
        codes = _codes(inputs.float(), step, tiny, min_bound, max_bound, dequantize=False)
        scale = max_bound / amax32
        if tiny is not None:
            scale = torch.where(tiny, torch.ones_like(scale), scale)
        ctx.mark_non_differentiable(scale)
        return codes.to(inputs.dtype), scale

    @staticmethod
    def backward(ctx, grad_outputs, grad_scale):
        grad_inputs, grad_amax = _clip_mask_grads(ctx, grad_outputs)
        return grad_inputs, grad_amax, None, None, None


class FakeTensorQuantFunction(torch.autograd.Function):
    """Quantize-dequantize: ``clamp(round(x / step)) * step`` with ``step = amax / max_bound``."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        ctx.save_for_backward(inputs, amax)
        min_bound, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
        step, tiny = _step_and_mask(amax.float(), max_bound)
        out = _codes(inputs.float(), step, tiny, min_bound, max_bound, dequantize=True)
        return out.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        grad_inputs, grad_amax = _clip_mask_grads(ctx, grad_outputs)
        return grad_inputs, grad_amax, None, None, None


def tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``inputs`` to integer codes (lesson 2).

    Args:
        inputs: float tensor (FP16 is computed in float32).
        amax: float or tensor broadcastable to ``inputs`` (per-channel: shape ``(C,1,1,1)``).
        num_bits: 2..16. unsigned: codes ``0..2**num_bits-1``. narrow_range: drop the
            most negative code (-128 for 8 bits). Defaults match pytorch_quantization.

    Returns:
        ``(codes, scale)``: codes stored in ``inputs.dtype``; ``scale = max_bound / amax``
        (1.0 where amax <= 2**-24), so ``codes / scale`` approximates ``inputs``.
    """
    amax = _as_amax_tensor(amax, inputs)
    _validate(inputs, amax, num_bits, unsigned, narrow_range)
    return TensorQuantFunction.apply(inputs, amax, num_bits, unsigned, narrow_range)


def fake_tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """Quantize and dequantize ``inputs`` (lesson 2): a float tensor on the INT8 grid.

    Same arguments as :func:`tensor_quant`. Output dtype = input dtype. The result equals
    ONNX ``DequantizeLinear(QuantizeLinear(x, amax/max_bound, 0))`` element for element.
    """
    amax = _as_amax_tensor(amax, inputs)
    _validate(inputs, amax, num_bits, unsigned, narrow_range)
    return FakeTensorQuantFunction.apply(inputs, amax, num_bits, unsigned, narrow_range)


# ----------------------------------------------------------------------------------------
# Asymmetric (affine) quantization, for lesson 1's comparison
# ----------------------------------------------------------------------------------------
def _affine_params(min_range, max_range, num_bits):
    _check_num_bits(num_bits)
    lo = torch.as_tensor(min_range, dtype=torch.float32)
    hi = torch.as_tensor(max_range, dtype=torch.float32)
    if torch.isnan(lo).any() or torch.isnan(hi).any():
        raise ValueError(f"min_range/max_range must not be NaN, got {lo.tolist()}, {hi.tolist()}")
    if (lo > hi).any():
        raise ValueError(f"min_range must be <= max_range, got {lo.tolist()} > {hi.tolist()}")
    # the range must contain 0 so that 0.0 (padding, ReLU zeros) is exactly representable
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    qmax = 2 ** num_bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point, qmax


def affine_tensor_quant(inputs: torch.Tensor, min_range, max_range, num_bits: int = 8):
    """Asymmetric quantization to unsigned codes ``0..2**num_bits-1`` (lesson 1).

    ``scale = (max - min) / (2**num_bits - 1)``, ``zero_point = round(-min / scale)``,
    ``code = clamp(round(x / scale) + zero_point, 0, 2**num_bits - 1)``. The range is first
    widened to contain 0. Returns ``(codes, scale, zero_point)`` (float tensors).
    """
    scale, zero_point, qmax = _affine_params(min_range, max_range, num_bits)
    x = inputs.float()
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return codes, scale, zero_point


def fake_affine_tensor_quant(inputs: torch.Tensor, min_range, max_range, num_bits: int = 8):
    """Asymmetric quantize-dequantize: ``(code - zero_point) * scale`` (lesson 1)."""
    codes, scale, zero_point = affine_tensor_quant(inputs, min_range, max_range, num_bits)
    return ((codes - zero_point) * scale).to(inputs.dtype)
