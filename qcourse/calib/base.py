"""Lesson 4 — what every calibrator shares: the base class :class:`Calibrator`.

A calibrator watches the tensors a quantizer sees (``collect``), forgets them (``reset``)
and turns what it saw into amax (``compute_amax``). The reference toolkit gives its
calibrators a common base class (``pytorch_quantization.calib.calibrator._Calibrator``);
qcourse's does the same, and also owns the checks every calibrator applies to a batch, so
:class:`~qcourse.calib.MaxCalibrator` and :class:`~qcourse.calib.HistogramCalibrator`
never reach into each other.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from qcourse.tensor_quant import QuantDescriptor, check_num_bits, is_fp8, normalized_axes
from qcourse.utils import check_bool

__all__ = ["Calibrator", "Axis"]

Axis = Optional[Union[int, Sequence[int]]]
#: ``(ndim, kept axes (sorted, non-negative), their sizes)`` of a per-channel batch.
Layout = Tuple[int, Tuple[int, ...], Tuple[int, ...]]


class Calibrator:
    """Base class of the calibrators (lesson 4).

    Args:
        num_bits: bits of the quantizer this calibrator feeds (2..16, or (4, 3) for FP8).
        axis: ``None`` for one amax per tensor; an int or tuple of ints for one amax per
            slice along those dims.
        unsigned: the quantizer is unsigned; negative inputs are then an error.

    Subclasses implement :meth:`collect`, :meth:`reset` and :meth:`compute_amax`.
    """

    def __init__(self, num_bits: int = 8, axis: Axis = None, unsigned: bool = False):
        check_num_bits(num_bits)
        check_bool("unsigned", unsigned)
        self._num_bits = tuple(num_bits) if is_fp8(num_bits) else int(num_bits)
        self._axis = QuantDescriptor._check_axis(axis)
        self._unsigned = unsigned
        self._layout: Optional[Layout] = None

    num_bits = property(lambda self: self._num_bits)
    axis = property(lambda self: self._axis)
    unsigned = property(lambda self: self._unsigned)

    def collect(self, x: torch.Tensor) -> None:
        """Add the batch ``x`` to the statistics."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything collected."""
        raise NotImplementedError

    def compute_amax(self, *args, **kwargs):
        """amax from the statistics, or ``None`` before any data."""
        raise NotImplementedError

    # ------------------------------------------------------------------ for subclasses
    def _checked_input(self, x) -> torch.Tensor:
        """Detach ``x`` and check it is a real tensor, non-negative when ``unsigned``.

        NaN/inf are caught later, on the reduced max (NaN and inf propagate through
        ``amax``), which saves a pass over the data: see :meth:`_check_finite_max`.
        """
        who = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}.collect() needs a torch.Tensor, got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{who}.collect() needs a real-valued tensor, got dtype {x.dtype}")
        x = x.detach()
        if not x.is_floating_point():
            x = x.float()
        if self._unsigned and x.numel():
            xmin = float(x.min())
            if xmin < 0:
                raise ValueError(
                    f"{who} with unsigned=True got a negative value (min {xmin:.6g}); unsigned "
                    "quantization is for non-negative tensors (after ReLU). Use unsigned=False."
                )
        return x

    def _check_finite_max(self, amax: torch.Tensor, x: torch.Tensor) -> None:
        """Raise if the reduced ``max|x|`` shows NaN or inf in ``x``, naming how many."""
        if bool(torch.isfinite(amax).all()):
            return
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{type(self).__name__}.collect() got {n_nan} NaN and {n_inf} inf values in a tensor "
            f"of shape {tuple(x.shape)}; calibration needs finite data. Find where the model "
            "overflows (e.g. FP16) or skip this batch."
        )

    def _channel_layout(self, x: torch.Tensor) -> Layout:
        """The batch's per-channel layout, which must match the earlier batches'."""
        kept = tuple(sorted(normalized_axes(self._axis, x)))
        new = (x.dim(), kept, tuple(int(x.shape[a]) for a in kept))
        old = self._layout
        if old is not None and old != new:
            raise ValueError(
                f"{type(self).__name__}: per-channel batches must keep their channel shape; earlier "
                f"batches had {old[0]} dims with sizes {old[2]} on axes {old[1]}, this one has "
                f"{new[0]} dims with sizes {new[2]}. Call reset() before calibrating a differently "
                "shaped tensor."
            )
        return new

    @staticmethod
    def _keepdim_shape(layout: Layout) -> Tuple[int, ...]:
        """Shape of a per-channel amax: channel sizes on the kept axes, 1 elsewhere."""
        ndim, axes, sizes = layout
        shape = [1] * ndim
        for a, s in zip(axes, sizes):
            shape[a] = s
        return tuple(shape)
