"""Lesson 4 — calibrators: turning activation statistics into amax.

A quantizer in calibration mode passes each tensor to its calibrator's ``collect(x)``;
afterwards ``compute_amax(...)`` gives the amax it will quantize with.

* :class:`Calibrator` — the base class: arguments and the checks every batch goes through.
* :class:`MaxCalibrator` — running ``max|x|`` (per tensor or per channel).
* :class:`HistogramCalibrator` — a histogram of ``|x|``, then
  ``compute_amax("entropy" | "mse" | "percentile")``.
* :func:`compute_amax_entropy`, :func:`compute_amax_mse`, :func:`compute_amax_percentile`
  — the three methods on any histogram; :func:`kl_divergences` and :func:`mse_errors`
  give their whole curves for plots.
* :func:`calibrator_from_descriptor` — the calibrator a :class:`QuantDescriptor` asks for.
* :func:`calibrate_weights` — every weight quantizer's amax straight from the weights
  (percentile, mse or max), no data needed.

Names and signatures follow ``pytorch_quantization.calib``.
"""
from qcourse.calib.base import Calibrator
from qcourse.calib.max import MaxCalibrator
from qcourse.calib.histogram import (
    METHODS,
    HistogramCalibrator,
    check_histogram,
    compute_amax_entropy,
    compute_amax_mse,
    compute_amax_percentile,
    kl_divergences,
    mse_errors,
)
from qcourse.calib.weights import WEIGHT_METHODS, calibrate_weights

__all__ = [
    "Calibrator",
    "MaxCalibrator",
    "HistogramCalibrator",
    "compute_amax_entropy",
    "compute_amax_mse",
    "compute_amax_percentile",
    "kl_divergences",
    "mse_errors",
    "check_histogram",
    "calibrator_from_descriptor",
    "METHODS",
    "calibrate_weights",
    "WEIGHT_METHODS",
]


def calibrator_from_descriptor(desc, **kwargs):
    """The calibrator ``desc.calib_method`` names, built from the descriptor's fields.

    ``"max"`` -> ``MaxCalibrator(desc.num_bits, desc.axis, desc.unsigned)``;
    ``"histogram"`` -> ``HistogramCalibrator(desc.num_bits, desc.axis, desc.unsigned, **kwargs)``
    (``kwargs`` such as ``num_bins=`` or ``skip_zeros=`` go to the histogram calibrator;
    ``track_amax=`` to the max calibrator).
    """
    for field in ("calib_method", "num_bits", "axis", "unsigned"):
        if not hasattr(desc, field):
            raise TypeError(
                f"calibrator_from_descriptor needs a QuantDescriptor, got {type(desc).__name__} "
                f"without .{field}"
            )
    if desc.calib_method == "max":
        return MaxCalibrator(desc.num_bits, desc.axis, desc.unsigned, **kwargs)
    if desc.calib_method == "histogram":
        return HistogramCalibrator(desc.num_bits, desc.axis, desc.unsigned, **kwargs)
    raise ValueError(f"unknown calib_method {desc.calib_method!r}; use 'max' or 'histogram'")
