"""Lesson 4 — calibrating weights without running data: ``calibrate_weights(model)``.

Weights are known before any batch runs, so their amax can be computed directly from a
histogram of each tensor (or of each output channel). This is pytorch_quantization's
``calib.calibrate_weights``: the method is the function's argument, not the one the weight
quantizer's descriptor names.

``calib`` sits below ``nn`` in the toolkit, so quantized modules are found by what they
have (a ``weight`` and a ``weight_quantizer``), not by their class.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from qcourse.calib.histogram import _check_percentile, compute_amax_mse, compute_amax_percentile
from qcourse.tensor_quant import normalized_axes
from qcourse.utils import check_bool, is_int, reduce_amax

__all__ = ["calibrate_weights", "WEIGHT_METHODS"]

#: where the mse search starts (compute_amax_mse's default, as in the reference)
_MSE_START_BIN = 128

#: the methods :func:`calibrate_weights` accepts (the reference's three)
WEIGHT_METHODS = ("max", "mse", "percentile")


def _weight_axis(name: str, quantizer, weight: torch.Tensor, perchannel: bool) -> Optional[int]:
    """The channel axis of the amax to compute: the quantizer's own axis, or None per tensor."""
    if not perchannel:
        return None
    axis = getattr(quantizer, "axis", None)
    if axis is None:
        # an amax per channel on a per-tensor quantizer would not load back into the same model
        raise ValueError(f"{name}: perchannel=True but its weight quantizer is per tensor (axis=None); "
                         "pass perchannel=False, or build the layer with a per-channel descriptor "
                         "(e.g. tensor_quant.QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)")
    axes = normalized_axes(axis, weight)
    if len(axes) != 1:
        raise ValueError(f"{name}: weight quantizer axis={axis} names {len(axes)} dims; "
                         "calibrate_weights computes one amax per slice of a single axis")
    return axes[0]


def _slice_amax(w: np.ndarray, method: str, num_bits, unsigned: bool, percentile: float,
                num_bins: int) -> float:
    """amax of one slice of ``|weight|`` from its own histogram over ``[0, max]``."""
    top = float(w.max()) if w.size else 0.0
    if method == "max" or top == 0.0:
        return top            # an all-zero slice: numpy would widen the range to (-0.5, 0.5)
    hist, edges = np.histogram(w, bins=num_bins, range=(0.0, top))
    if method == "percentile":
        return compute_amax_percentile(hist, edges, percentile)
    return compute_amax_mse(hist, edges, num_bits, unsigned)


def _weight_amax(weight: torch.Tensor, axis: Optional[int], method: str, num_bits, unsigned: bool,
                 percentile: float, num_bins: int) -> torch.Tensor:
    """amax of ``weight`` per tensor (a scalar) or per channel (keepdims shape, e.g. (C,1,1,1))."""
    if method == "max":       # no histogram needed: the exact max, computed by torch
        reduce = None if axis is None else tuple(d for d in range(weight.dim()) if d != axis)
        amax = reduce_amax(weight.detach(), axis=reduce, keepdims=True)
        return amax.reshape(()) if axis is None else amax
    w = weight.detach().abs().float().cpu().numpy()
    if axis is None:
        return torch.tensor(_slice_amax(w, method, num_bits, unsigned, percentile, num_bins))
    w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = [_slice_amax(row, method, num_bits, unsigned, percentile, num_bins) for row in w]
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return torch.tensor(amax, dtype=torch.float32).reshape(shape)


def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> list:
    """Set the amax of every weight quantizer in ``model`` from the weights themselves.

    Args:
        model: a model with quantized layers (anything with ``weight`` and ``weight_quantizer``).
        method: ``"percentile"`` (default), ``"mse"`` or ``"max"``. The histogram of
            ``|weight|`` has ``num_bins`` bins over ``[0, max]`` for each slice.
        perchannel: one amax per slice along the weight quantizer's axis (output channel);
            False: one amax for the whole tensor.
        percentile: for ``"percentile"``, in (0, 100].

    Returns the names of the calibrated modules (the reference returns None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in WEIGHT_METHODS:
        raise ValueError(f"unknown weight calibration method {method!r}; choose one of {WEIGHT_METHODS} "
                         "(entropy needs activations: use a HistogramCalibrator)")
    check_bool("perchannel", perchannel)
    _check_percentile(percentile)
    if not is_int(num_bins) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if method == "mse" and num_bins <= _MSE_START_BIN:
        raise ValueError(f"method='mse' tries amax candidates from bin {_MSE_START_BIN} up, so it needs "
                         f"num_bins > {_MSE_START_BIN}, got num_bins={num_bins}; use the default 2048")
    done = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        axis = _weight_axis(name, quantizer, weight, perchannel)
        amax = _weight_amax(weight, axis, method, quantizer.num_bits, quantizer.unsigned,
                            percentile, num_bins)
        quantizer.amax = amax
        done.append(name)
    return done
