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
* ``num_bits=(4, 3)`` — FP8 E4M3 instead of integers: amax maps to 448 and values round to
  the nearest E4M3 number (:func:`scaled_e4m3` is the reference's name); it exports as
  opset-19 ``QuantizeLinear`` to float8.

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
  unchanged where ``|x| <= amax`` (``0 <= x <= amax`` unsigned) and is zero outside.
  :func:`tensor_quant` and :func:`fake_tensor_quant` give ``amax`` **no** gradient, as
  the reference's functions do: an amax taken from the batch (``x.abs().max()``, a dynamic
  quantizer) must not push a gradient into the element that set the maximum.
* A *learnable* range is asked for explicitly: :func:`learnable_fake_tensor_quant` (what a
  ``TensorQuantizer`` with ``learn_amax=True`` calls) gives amax the PACT gradient — the
  sum of the incoming gradient over the clipped elements, signed by the side they were
  clipped on.
* Codes are returned in the input's dtype where it holds every code exactly (float32 to
  24 bits, FP16 to 11, BF16 to 8); otherwise in float32 (16-bit codes from an FP16
  tensor would round 32767 up to 32768).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch

from qcourse.utils import check_bool, is_int

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
    "normalized_axes",
    "check_num_bits",
    "check_int_bits",
    "is_fp8",
    "FP8_E4M3",
    "FP8_E4M3_MAX",
    "scaled_e4m3",
    "legacy_fake_tensor_quant",
    "CALIBRATORS",
    "tensor_quant",
    "fake_tensor_quant",
    "affine_tensor_quant",
    "fake_affine_tensor_quant",
    "learnable_fake_tensor_quant",
    "TensorQuantFunction",
    "FakeTensorQuantFunction",
    "LearnableFakeTensorQuantFunction",
    "FakeAffineTensorQuantFunction",
    "AMAX_EPSILON",
    "FP16_MAX",
]

#: amax at or below this value quantizes the tensor to zero (the smallest FP16 subnormal).
AMAX_EPSILON = 2.0 ** -24
#: Largest finite FP16 value; a scale above it cannot be represented in FP16.
FP16_MAX = 65504.0

#: The calibrators a descriptor can ask for (``calib_method``); how a histogram becomes
#: amax (entropy, mse, percentile) is :data:`qcourse.calib.METHODS`.
CALIBRATORS = ("max", "histogram")


#: ``num_bits`` for FP8 E4M3 (4 exponent, 3 mantissa bits), as the reference spells it.
FP8_E4M3 = (4, 3)
#: Largest finite E4M3 value: an FP8 quantizer maps amax to it (``scale = 448 / amax``).
FP8_E4M3_MAX = 448


def is_fp8(num_bits) -> bool:
    """True for ``num_bits=(4, 3)`` (FP8 E4M3), False for an integer width."""
    return isinstance(num_bits, (tuple, list)) and tuple(num_bits) == FP8_E4M3 \
        and all(is_int(b) for b in num_bits)


def check_num_bits(num_bits) -> None:
    """Raise unless ``num_bits`` is an int in 2..16 or ``(4, 3)`` (FP8 E4M3)."""
    if is_fp8(num_bits):
        return
    if isinstance(num_bits, (tuple, list)):
        raise ValueError(f"num_bits as a tuple must be (4, 3) for FP8 E4M3, got {tuple(num_bits)!r}; "
                         "E5M2 and other float formats are not supported")
    if not is_int(num_bits):
        raise TypeError(f"num_bits must be an int or (4, 3), got {num_bits!r} of type {type(num_bits).__name__}")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be in 2..16 (or (4, 3) for FP8 E4M3), got {num_bits}")


def check_int_bits(num_bits, what: str) -> None:
    """Raise unless ``num_bits`` is an integer width: ``what`` counts integer levels."""
    check_num_bits(num_bits)
    if is_fp8(num_bits):
        raise ValueError(f"{what} needs an integer num_bits (2..16), got FP8 {tuple(num_bits)!r}; "
                         "calibrate FP8 with max, 'mse' or 'percentile'")


def quant_bounds(num_bits=8, unsigned: bool = False, narrow_range: bool = True) -> Tuple[int, int]:
    """Return ``(min_bound, max_bound)``, the smallest and largest code.

    >>> quant_bounds(8), quant_bounds(8, narrow_range=False), quant_bounds(8, unsigned=True)
    ((-127, 127), (-128, 127), (0, 255))

    FP8 E4M3 is symmetric, so ``narrow_range`` changes nothing: ``(-448, 448)``.
    """
    check_num_bits(num_bits)
    if is_fp8(num_bits):
        if unsigned:
            raise ValueError("FP8 E4M3 (num_bits=(4, 3)) is signed; use unsigned=False")
        return -FP8_E4M3_MAX, FP8_E4M3_MAX
    max_bound = 2 ** (num_bits - 1 + int(unsigned)) - 1
    if unsigned:
        min_bound = 0
    elif narrow_range:
        min_bound = -max_bound
    else:
        min_bound = -max_bound - 1
    return min_bound, max_bound


def normalized_axes(axis, x: torch.Tensor) -> Tuple[int, ...]:
    """``axis`` (an int or a tuple of ints) as non-negative dims of ``x``, checked, never wrapped.

    >>> normalized_axes(-1, torch.zeros(2, 3))
    (1,)
    """
    axes = (axis,) if is_int(axis) else tuple(axis)
    norm = []
    for a in axes:
        if not -x.dim() <= a < x.dim():
            raise ValueError(
                f"quantization axis {a} is out of range for a {x.dim()}-D tensor of shape "
                f"{tuple(x.shape)}; use an axis in {-x.dim()}..{x.dim() - 1} (0 for a conv or "
                "linear weight's output channel, 1 for activations' channel)"
            )
        norm.append(a % x.dim())
    if len(set(norm)) != len(norm):
        raise ValueError(f"axis {axis} names the same dim twice for a {x.dim()}-D tensor")
    return tuple(norm)


# ----------------------------------------------------------------------------------------
# The descriptor
# ----------------------------------------------------------------------------------------
class ScaledQuantDescriptor:
    """How a tensor should be quantized (lesson 2).

    Args:
        num_bits: bits of the integer code, 2..16, or ``(4, 3)`` for FP8 E4M3 (signed,
            amax mapped to 448). Default 8.
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
        check_num_bits(num_bits)
        self._num_bits = FP8_E4M3 if is_fp8(num_bits) else int(num_bits)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self._name = name

        self._fake_quant = kwargs.pop("fake_quant", True)
        check_bool("fake_quant", self._fake_quant)

        self._axis = self._check_axis(kwargs.pop("axis", None))

        self._learn_amax = kwargs.pop("learn_amax", False)
        check_bool("learn_amax", self._learn_amax)
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
        if self._calib_method not in CALIBRATORS:
            raise ValueError(
                f"calib_method must be one of {CALIBRATORS}, got {self._calib_method!r}. "
                "entropy, mse and percentile are ways to compute amax from a 'histogram' "
                "calibrator: pass them to load_calib_amax(method=...)."
            )

        self._unsigned = kwargs.pop("unsigned", False)
        check_bool("unsigned", self._unsigned)
        self._narrow_range = kwargs.pop("narrow_range", False)
        check_bool("narrow_range", self._narrow_range)
        if self._unsigned and is_fp8(self._num_bits):
            raise ValueError("FP8 E4M3 (num_bits=(4, 3)) is signed; use unsigned=False")

        if kwargs:
            raise TypeError(f"Unknown QuantDescriptor arguments: {sorted(kwargs)}")

    @staticmethod
    def _check_axis(axis):
        if axis is None:
            return None
        if is_int(axis):
            return int(axis)
        if isinstance(axis, (tuple, list)):
            if len(axis) == 0:
                raise ValueError("axis must not be an empty tuple; use axis=None for per-tensor")
            for a in axis:
                if not is_int(a):
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

    def to_yaml(self) -> str:
        """The descriptor as YAML (:meth:`dict`, tuples written as lists); ``from_yaml`` reads it."""
        import yaml

        d = self.dict()
        for key in ("axis", "num_bits"):   # YAML has no tuples: safe_load must read it back
            if isinstance(d.get(key), tuple):
                d[key] = list(d[key])
        return yaml.safe_dump(d, width=120)

    @classmethod
    def from_yaml(cls, yaml_str: str) -> "ScaledQuantDescriptor":
        """The descriptor :meth:`to_yaml` wrote (or any YAML mapping of its keyword arguments)."""
        import yaml

        if not isinstance(yaml_str, str):
            raise TypeError(f"from_yaml takes the YAML text, got {type(yaml_str).__name__}; "
                            "read the file first: from_yaml(path.read_text())")
        d = yaml.safe_load(yaml_str)
        if not isinstance(d, dict):
            raise ValueError(f"from_yaml needs a YAML mapping such as 'num_bits: 8', got {d!r}")
        for key in ("axis", "num_bits"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

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
    check_num_bits(num_bits)
    check_bool("unsigned", unsigned)
    check_bool("narrow_range", narrow_range)
    if amax.numel() == 0:
        raise ValueError("amax is empty; calibrate the quantizer or pass a value")
    a = amax.detach()
    if torch.isnan(a).any():
        raise ValueError(f"amax must not be NaN, got {a.flatten()[:8].tolist()}; calibrate on finite data")
    amin = float(a.min())
    if amin < 0:
        raise ValueError(f"amax must be >= 0, got {amin}")
    if torch.isinf(a).any():
        raise ValueError("amax must be finite, got inf: every code would be 0 * inf = NaN; "
                         "calibrate on finite data or pass a finite amax")
    try:
        shape = torch.broadcast_shapes(inputs.shape, amax.shape)
    except RuntimeError:
        shape = None
    if shape != inputs.shape:
        raise ValueError(
            f"amax of shape {tuple(amax.shape)} does not broadcast to the input's shape "
            f"{tuple(inputs.shape)} without changing it; per channel, give amax the input's "
            "number of dims with 1 everywhere except the channel axis, e.g. (C, 1, 1, 1)"
        )
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


def _fp8_codes(x32: torch.Tensor, step: torch.Tensor, tiny, dequantize: bool) -> torch.Tensor:
    """``saturate(e4m3(x / step))`` (times ``step`` if ``dequantize``), as ONNX QuantizeLinear-19.

    torch's cast to ``float8_e4m3fn`` rounds to nearest even like ONNX, but turns values
    past 448 into NaN where ONNX saturates, hence the clamp first.
    """
    out = torch.div(x32, step).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    out = out.to(torch.float8_e4m3fn).to(torch.float32)
    if tiny is not None:
        out.masked_fill_(tiny.expand_as(out) if tiny.dim() else tiny, 0.0)
    if dequantize:
        out.mul_(step)
    return out


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


def _inside(inputs: torch.Tensor, amax: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """Where the straight-through estimator passes the gradient: inside the range."""
    a = amax.to(inputs.dtype)
    if unsigned:
        return (inputs >= 0) & (inputs <= a)
    return inputs.abs() <= a


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient that was broadcast from ``shape`` back down to ``shape``."""
    while g.dim() > len(shape):
        g = g.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and g.shape[d] != 1:
            g = g.sum(d, keepdim=True)
    return g.reshape(shape)


def _ste(ctx, grad_outputs) -> torch.Tensor:
    """Clipped STE: the upstream gradient inside the range, zero outside."""
    inputs, amax = ctx.saved_tensors
    inside = _inside(inputs, amax, ctx.unsigned)
    return torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs))


def _forward(ctx, inputs, amax, num_bits, unsigned, narrow_range, dequantize: bool):
    """The forward pass both functions share: save what backward needs, quantize in float32."""
    ctx.save_for_backward(inputs, amax)
    ctx.unsigned = unsigned
    bounds = quant_bounds(num_bits, unsigned, narrow_range)
    step, tiny = _step_and_mask(amax.float(), bounds[1])
    if is_fp8(num_bits):
        return _fp8_codes(inputs.float(), step, tiny, dequantize), bounds, tiny
    out = _codes(inputs.float(), step, tiny, bounds[0], bounds[1], dequantize=dequantize)
    return out, bounds, tiny


class TensorQuantFunction(torch.autograd.Function):
    """Integer codes and the reference-style scale (``max_bound / amax``).

    Backward: clipped STE for the inputs, no gradient for amax.
    """

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        codes, (min_bound, max_bound), tiny = _forward(ctx, inputs, amax, num_bits, unsigned,
                                                       narrow_range, dequantize=False)
        scale = max_bound / amax.float()
        if tiny is not None:
            scale = torch.where(tiny, torch.ones_like(scale), scale)
        scale = _scale_in(scale, inputs.dtype)
        ctx.mark_non_differentiable(scale)
        return codes.to(_codes_dtype(inputs.dtype, min_bound, max_bound)), scale

    @staticmethod
    def backward(ctx, grad_outputs, grad_scale):
        return _ste(ctx, grad_outputs).to(ctx.saved_tensors[0].dtype), None, None, None, None


def _scale_in(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale in the input's dtype, as the reference returns it; refused where it overflows."""
    if dtype == torch.float32 or dtype == torch.float64:
        return scale.to(dtype)
    big = float(scale.max())
    if big > torch.finfo(dtype).max:
        raise ValueError(f"scale {big:.6g} = max_bound/amax overflows {dtype} (max "
                         f"{torch.finfo(dtype).max:.6g}): amax is too small for a {dtype} scale. "
                         "Quantize a float32 copy of the input (x.float()) or raise amax.")
    return scale.to(dtype)


def _onnx_qdq(g, inputs, amax, num_bits, unsigned, narrow_range):
    """The ONNX form of fake quantization: ``QuantizeLinear -> DequantizeLinear`` (lesson 3).

    ``y_scale = amax / max_bound`` in float32 and ``y_zero_point = 0`` (int8, uint8 when
    unsigned); a per-channel amax of shape ``(1, C, 1, 1)`` gives a 1-D scale with ``axis`` =
    its channel dim, a per-tensor amax a 0-d scale (the form TensorRT's parser expects). The
    scale is computed in the graph from amax; the exporter's constant folding turns it into
    one float32 constant, computed by the same torch division as the forward pass. A
    narrow-range quantizer gets ``Max(x, -127 * y_scale)`` first, so the graph never
    produces the -128 code that training never saw.
    """
    from torch.onnx import symbolic_helper

    if is_fp8(num_bits):
        return _onnx_fp8_qdq(g, inputs, amax, symbolic_helper)
    if num_bits != 8:
        raise ValueError(f"ONNX QuantizeLinear (opset 13) supports 8-bit codes only, got num_bits={num_bits}; "
                         "export 8-bit quantizers, or disable this one for export")
    sizes = symbolic_helper._get_tensor_sizes(amax) or []
    channel = [d for d, n in enumerate(sizes) if n != 1]
    if len(channel) > 1:
        raise ValueError(f"ONNX QuantizeLinear takes one channel axis, got an amax of shape {tuple(sizes)}")
    _, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
    step = g.op("Div", g.op("Cast", amax, to_i=1),  # 1 = float32
                g.op("Constant", value_t=torch.tensor(float(max_bound))))
    x = inputs
    if narrow_range and not unsigned:
        x = g.op("Max", x, g.op("Mul", step, g.op("Constant", value_t=torch.tensor(-127.0))))
    flat = [sizes[channel[0]]] if channel else []
    scale = g.op("Reshape", step, g.op("Constant", value_t=torch.tensor(flat, dtype=torch.int64)))
    zp = g.op("Constant", value_t=torch.zeros(flat, dtype=torch.uint8 if unsigned else torch.int8))
    kw = {"axis_i": channel[0]} if channel else {}
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp, **kw), scale, zp, **kw)


def _export_opset() -> int:
    """The opset of the export in progress (the TorchScript exporter's global state)."""
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:        # torch < 2.9 kept it here
        from torch.onnx._globals import GLOBALS
    return GLOBALS.export_onnx_opset_version


def _onnx_fp8_qdq(g, inputs, amax, symbolic_helper):
    """FP8 E4M3 fake quantization as ``QuantizeLinear -> DequantizeLinear`` with a float8 zero point.

    ONNX gained float8 QuantizeLinear in opset 19 (``saturate=1`` by default: values past
    448 become 448, as the forward pass clamps). ``y_scale = amax / 448``; per tensor only,
    the form TensorRT reads for FP8.
    """
    opset = _export_opset()
    if opset < 19:
        raise ValueError(f"FP8 E4M3 QuantizeLinear needs ONNX opset 19 or later, this export uses "
                         f"opset {opset}; pass opset_version=19 to torch.onnx.export "
                         "(or opset=19 to qcourse.export.export_onnx)")
    sizes = symbolic_helper._get_tensor_sizes(amax) or []
    if any(n != 1 for n in sizes):
        raise ValueError(f"FP8 E4M3 export is per tensor only (as in TensorRT), got an amax of shape "
                         f"{tuple(sizes)}; use axis=None for FP8 quantizers")
    step = g.op("Div", g.op("Cast", amax, to_i=1),  # 1 = float32
                g.op("Constant", value_t=torch.tensor(float(FP8_E4M3_MAX))))
    scale = g.op("Reshape", step, g.op("Constant", value_t=torch.tensor([], dtype=torch.int64)))
    zp = g.op("Constant", value_t=torch.zeros((), dtype=torch.float8_e4m3fn))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", inputs, scale, zp), scale, zp)


class FakeTensorQuantFunction(torch.autograd.Function):
    """Quantize-dequantize: ``clamp(round(x / step)) * step`` with ``step = amax / max_bound``.

    Backward: clipped STE for the inputs, no gradient for amax. ONNX export: a
    QuantizeLinear/DequantizeLinear pair (:func:`_onnx_qdq`).
    """

    @staticmethod
    def symbolic(g, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        return _onnx_qdq(g, inputs, amax, num_bits, unsigned, narrow_range)

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        out, _, _ = _forward(ctx, inputs, amax, num_bits, unsigned, narrow_range, dequantize=True)
        return out.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        return _ste(ctx, grad_outputs), None, None, None, None


class LearnableFakeTensorQuantFunction(FakeTensorQuantFunction):
    """:class:`FakeTensorQuantFunction` whose amax is trained: the PACT gradient.

    ``d clip(x, -a, a) / d a`` is 0 inside the range and ``sign(x)`` where x is clipped, so
    amax receives the upstream gradient summed over the clipped elements, with their sign.
    """

    @staticmethod
    def backward(ctx, grad_outputs):
        grad_inputs = _ste(ctx, grad_outputs)
        inputs, amax = ctx.saved_tensors
        grad_amax = None
        if ctx.needs_input_grad[1]:
            outside = ~_inside(inputs, amax, ctx.unsigned)
            g = torch.where(outside, grad_outputs * torch.sign(inputs), torch.zeros_like(grad_outputs))
            grad_amax = _reduce_to(g, amax.shape).to(amax.dtype)
        return grad_inputs, grad_amax, None, None, None


def _codes_dtype(dtype: torch.dtype, min_bound: int, max_bound: int) -> torch.dtype:
    """The input's float dtype if it holds every code exactly, else float32."""
    exact_up_to = round(2 / torch.finfo(dtype).eps)   # 2**24 float32, 2**11 fp16, 2**8 bf16
    return dtype if max(max_bound, -min_bound) <= exact_up_to else torch.float32


def tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``inputs`` to integer codes (lesson 2).

    Args:
        inputs: float tensor (FP16 is computed in float32).
        amax: float or tensor broadcastable to ``inputs`` (per-channel: shape ``(C,1,1,1)``).
        num_bits: 2..16. unsigned: codes ``0..2**num_bits-1``. narrow_range: drop the
            most negative code (-128 for 8 bits). Defaults match pytorch_quantization.

    Returns:
        ``(codes, scale)``: codes stored in ``inputs.dtype`` where it holds every code
        exactly, else float32; ``scale = max_bound / amax`` (1.0 where amax <= 2**-24), so
        ``codes / scale`` approximates ``inputs``.

    Backward: the clipped straight-through estimator for ``inputs``; ``amax`` gets no
    gradient (use :func:`learnable_fake_tensor_quant` to train it).
    """
    amax = _as_amax_tensor(amax, inputs)
    _validate(inputs, amax, num_bits, unsigned, narrow_range)
    return TensorQuantFunction.apply(inputs, amax, num_bits, unsigned, narrow_range)


def fake_tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """Quantize and dequantize ``inputs`` (lesson 2): a float tensor on the INT8 grid.

    Same arguments as :func:`tensor_quant`. Output dtype = input dtype. The result equals
    ONNX ``DequantizeLinear(QuantizeLinear(x, amax/max_bound, 0))`` element for element.
    Backward: the clipped straight-through estimator; no gradient to ``amax``.
    """
    amax = _as_amax_tensor(amax, inputs)
    _validate(inputs, amax, num_bits, unsigned, narrow_range)
    return FakeTensorQuantFunction.apply(inputs, amax, num_bits, unsigned, narrow_range)


def learnable_fake_tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                                narrow_range: bool = True) -> torch.Tensor:
    """:func:`fake_tensor_quant` with a trainable range (lesson 7, QAT with learnable amax).

    The forward pass is identical. Backward: the clipped STE for ``inputs`` and the PACT
    gradient for ``amax`` (the upstream gradient summed over the clipped elements, times
    their sign), reduced to amax's shape.
    """
    amax = _as_amax_tensor(amax, inputs)
    _validate(inputs, amax, num_bits, unsigned, narrow_range)
    return LearnableFakeTensorQuantFunction.apply(inputs, amax, num_bits, unsigned, narrow_range)


def scaled_e4m3(inputs: torch.Tensor, amax=None, E: int = 4, M: int = 3) -> torch.Tensor:
    """FP8 E4M3 fake quantization under the reference's name: ``fake_tensor_quant(x, amax, (4, 3))``.

    ``amax=None`` quantizes with scale 1 (amax 448), as the reference does.
    """
    if (E, M) != FP8_E4M3:
        raise ValueError(f"only E4M3 is supported (E=4, M=3), got E={E}, M={M}")
    return fake_tensor_quant(inputs, FP8_E4M3_MAX if amax is None else amax, FP8_E4M3)


#: The reference's CPU fallback under its own name: qcourse has one implementation.
legacy_fake_tensor_quant = fake_tensor_quant


# ----------------------------------------------------------------------------------------
# Asymmetric (affine) quantization, for lesson 1's comparison
# ----------------------------------------------------------------------------------------
def _affine_params(min_range, max_range, num_bits):
    check_num_bits(num_bits)
    # the range is a setting, not something to train through: no gradient flows into it
    lo = torch.as_tensor(min_range, dtype=torch.float32).detach()
    hi = torch.as_tensor(max_range, dtype=torch.float32).detach()
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
    return scale, zero_point, qmax, lo, hi


class FakeAffineTensorQuantFunction(torch.autograd.Function):
    """Asymmetric quantize-dequantize with the clipped STE (lesson 1).

    Backward: the upstream gradient where ``min_range <= x <= max_range`` (the range after
    it is widened to contain 0), zero outside; no gradient to the range.
    """

    @staticmethod
    def forward(ctx, inputs, lo, hi, scale, zero_point, qmax):
        x = inputs.float()
        ctx.save_for_backward(x, lo, hi)
        codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
        return ((codes - zero_point) * scale).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        x, lo, hi = ctx.saved_tensors
        inside = (x >= lo) & (x <= hi)
        return torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs)), None, None, None, None, None


def affine_tensor_quant(inputs: torch.Tensor, min_range, max_range, num_bits: int = 8):
    """Asymmetric quantization to unsigned codes ``0..2**num_bits-1`` (lesson 1).

    ``scale = (max - min) / (2**num_bits - 1)``, ``zero_point = round(-min / scale)``,
    ``code = clamp(round(x / scale) + zero_point, 0, 2**num_bits - 1)``. The range is first
    widened to contain 0. Returns ``(codes, scale, zero_point)`` (float tensors, no gradient:
    use :func:`fake_affine_tensor_quant` to train through it).
    """
    scale, zero_point, qmax, _, _ = _affine_params(min_range, max_range, num_bits)
    x = inputs.detach().float()
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return codes, scale, zero_point


def fake_affine_tensor_quant(inputs: torch.Tensor, min_range, max_range, num_bits: int = 8):
    """Asymmetric quantize-dequantize: ``(code - zero_point) * scale`` (lesson 1).

    Backward: the clipped straight-through estimator — gradient 1 where
    ``min_range <= x <= max_range`` (the range widened to contain 0), 0 outside.
    """
    scale, zero_point, qmax, lo, hi = _affine_params(min_range, max_range, num_bits)
    return FakeAffineTensorQuantFunction.apply(inputs, lo, hi, scale, zero_point, qmax)
