"""Lesson 4 — max calibration: amax is the largest ``|x|`` seen over all calibration batches.

:class:`MaxCalibrator` mirrors ``pytorch_quantization.calib.MaxCalibrator``. It keeps a
running maximum of ``|x|``, either one number per tensor or one per channel (``axis``),
and hands it to the quantizer as amax. It is the cheapest calibrator and the most
sensitive to outliers: a single large activation stretches the quantization step for
every other value (lesson 4 shows this against the histogram methods).

Differences from the reference, on purpose:

* NaN or inf in a calibration batch raises a ``ValueError`` naming how many there are
  (a running max would silently turn into NaN or inf).
* ``unsigned=True`` with a negative input raises a ``ValueError`` naming the minimum —
  the quantizer itself rejects such inputs, so calibrating on them would only hide the
  problem. (The reference logs a message and calibrates on ``|x|``.) Signed calibrators
  use ``|x|`` as the reference does.
* Per-tensor amax is a 0-d tensor (it broadcasts against any input); per-channel amax
  keeps the input's rank, e.g. ``(C, 1, 1, 1)`` for a KCRS conv weight with ``axis=0``.

What every calibrator shares (arguments, input checks, channel layout) is in the base
class :class:`~qcourse.calib.base.Calibrator`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from qcourse.calib.base import Axis, Calibrator
from qcourse.utils import check_bool

__all__ = ["MaxCalibrator"]


class MaxCalibrator(Calibrator):
    """Track the running maximum of ``|x|`` (lesson 4).

    Args:
        num_bits: bits of the quantizer this calibrator feeds (2..16). Max calibration
            does not depend on it; it is kept so every calibrator has the same signature.
        axis: ``None`` for one amax per tensor; an int or tuple of ints for one amax per
            slice along those dims (every other dim is reduced).
        unsigned: the quantizer is unsigned; negative inputs are then an error.
        track_amax: keep every batch's amax in :attr:`amaxs` (for plots).

    ``compute_amax()`` returns a float32 tensor on the device of the collected data:
    0-d per tensor, or the input's shape with reduced dims set to 1 per channel.
    It returns ``None`` when nothing has been collected (like the reference).
    """

    def __init__(self, num_bits: int = 8, axis: Axis = None, unsigned: bool = False,
                 track_amax: bool = False):
        super().__init__(num_bits, axis, unsigned)
        check_bool("track_amax", track_amax)
        self._track_amax = track_amax
        self._amaxs: List = []
        self._calib_amax: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ properties
    track_amax = property(lambda self: self._track_amax)

    @property
    def amaxs(self) -> List:
        """Per-batch amax values (numpy arrays, in collection order); needs ``track_amax=True``."""
        if not self._track_amax:
            raise AttributeError(
                "amaxs is only kept with track_amax=True; create "
                "MaxCalibrator(num_bits, axis, unsigned, track_amax=True)"
            )
        return self._amaxs

    # ------------------------------------------------------------------ collection
    def collect(self, x: torch.Tensor) -> None:
        """Update the running max with the batch ``x`` (any shape, any float dtype).

        Raises ``ValueError`` on NaN/inf, on negative values when ``unsigned``, and when a
        per-channel batch's channel shape differs from the earlier batches'. Empty
        tensors are ignored.
        """
        x = self._checked_input(x)
        layout = None
        if self._axis is None:
            if x.numel() == 0:
                return
            local = x.abs().amax().float()
        else:
            layout = self._channel_layout(x)
            if x.numel() == 0:
                return
            ndim, axes, _ = layout
            reduce = [d for d in range(ndim) if d not in axes]
            xa = x.abs()
            local = (torch.amax(xa, dim=reduce, keepdim=True) if reduce else xa).float()
        self._check_finite_max(local, x)
        self._layout = layout
        if self._calib_amax is None:
            self._calib_amax = local.clone()
        else:
            if local.device != self._calib_amax.device:
                local = local.to(self._calib_amax.device)
            torch.maximum(self._calib_amax, local, out=self._calib_amax)
        if self._track_amax:
            self._amaxs.append(local.detach().cpu().numpy())

    def reset(self) -> None:
        """Forget everything collected (and the tracked per-batch amaxes)."""
        self._calib_amax = None
        self._layout = None
        self._amaxs = []

    def compute_amax(self, *args, **kwargs) -> Optional[torch.Tensor]:
        """The max of ``|x|`` over every collected batch (float32), or ``None`` if none.

        Takes no arguments: max calibration has a single answer. Passing a method (as for
        :class:`~qcourse.calib.HistogramCalibrator`) raises ``TypeError``.
        """
        if args or kwargs:
            given = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
            raise TypeError(
                f"MaxCalibrator.compute_amax() takes no arguments, got ({given}). Methods such as "
                "'entropy', 'mse' and 'percentile' belong to a histogram calibrator: use "
                "QuantDescriptor(calib_method='histogram')."
            )
        if self._calib_amax is None:
            return None
        return self._calib_amax.clone()

    def __repr__(self) -> str:
        amax = "None"
        if self._calib_amax is not None:
            a = self._calib_amax
            amax = f"{float(a):.6g}" if a.numel() == 1 else (
                f"[{float(a.min()):.6g}, {float(a.max()):.6g}]({a.numel()})")
        s = (f"MaxCalibrator(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned}, "
             f"amax={amax}, track_amax={self._track_amax}")
        if self._track_amax:
            s += f", batches={len(self._amaxs)}"
        return s + ")"
