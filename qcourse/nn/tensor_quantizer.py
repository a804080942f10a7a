"""Lesson 3 — ``TensorQuantizer``: the module that sits in front of a tensor and quantizes it.

A quantizer has three switches, each independent:

* ``enable()`` / ``disable()`` — a disabled quantizer returns its input untouched;
* ``enable_quant()`` / ``disable_quant()`` — whether the forward pass quantizes;
* ``enable_calib()`` / ``disable_calib()`` — whether the forward pass feeds its calibrator.

Calibration mode is ``disable_quant(); enable_calib()``: tensors flow through unchanged
while the calibrator collects statistics; then ``load_calib_amax(method=...)`` turns
the statistics into ``amax``, stored in the ``_amax`` buffer so it is saved and loaded
with the model's ``state_dict`` and moves with ``.to(device)``.

Without a stored amax the quantizer is *dynamic*: amax is the current tensor's
``max(|x|)`` (per tensor or per channel), recomputed every call.

With ``learn_amax=True`` amax is a ``torch.nn.Parameter`` trained through the PACT
gradient of :func:`qcourse.tensor_quant.learnable_fake_tensor_quant` (lesson 7); otherwise
amax gets no gradient, whether stored or dynamic.

For ONNX export the quantizer emits a ``QuantizeLinear``/``DequantizeLinear`` pair (the
symbolic of :class:`~qcourse.tensor_quant.FakeTensorQuantFunction`), computing in PyTorch
exactly what ONNX Runtime computes. This module depends only on ``tensor_quant`` and
``calib``, as in the reference.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from qcourse import calib
from qcourse import tensor_quant as tq
from qcourse.tensor_quant import QuantDescriptor, QUANT_DESC_8BIT_PER_TENSOR

__all__ = ["TensorQuantizer", "Switches"]


class Switches(NamedTuple):
    """A quantizer's three switches, read and restored as one value (see ``TensorQuantizer.switches``)."""

    enabled: bool
    quant: bool
    calib: bool


class TensorQuantizer(nn.Module):
    """Quantize a tensor as its :class:`QuantDescriptor` says (lesson 3).

    Args:
        quant_desc: the descriptor (default: 8-bit per-tensor, max calibration).
        disabled: start disabled. if_quant: quantize in forward. if_clip: clip to
            ``[-amax, amax]`` before quantizing (a no-op for the output values, useful
            with ``learn_amax``). if_calib: start in calibration mode.

    The amax shape follows the descriptor's ``axis``: a scalar per-tensor, or the
    tensor's shape with every dim except ``axis`` reduced to 1 (``(C,1,1,1)`` for a
    KCRS conv weight with ``axis=0``).
    """

    #: Kept for source compatibility with pytorch_quantization, where it switched the
    #: forward to torch's fused fake-quant kernels before ONNX export. qcourse's forward
    #: already computes exactly what the exported Q/DQ pair computes, and
    #: :func:`qcourse.export.export_onnx` handles the export, so it changes nothing.
    use_fb_fake_quant = False

    #: Set by :func:`qcourse.quant_modules.enable_onnx_export` (the reference's switch): while
    #: True, a quantizer that cannot export (no amax, FP8 per channel) refuses to run
    #: instead of tracing a graph with a dynamic range.
    _enable_onnx_export = False

    def __init__(self, quant_desc: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR, disabled: bool = False,
                 if_quant: bool = True, if_clip: bool = False, if_calib: bool = False):
        super().__init__()
        if not isinstance(quant_desc, QuantDescriptor):
            raise TypeError(
                f"quant_desc must be a QuantDescriptor, got {type(quant_desc).__name__}; "
                "build one with qcourse.tensor_quant.QuantDescriptor(num_bits=8, ...)"
            )
        self._quant_desc = quant_desc
        self._num_bits = quant_desc.num_bits
        self._fake_quant = quant_desc.fake_quant
        self._axis = quant_desc.axis
        self._scale_amax = quant_desc.scale_amax
        self._learn_amax = quant_desc.learn_amax
        self._unsigned = quant_desc.unsigned
        self._narrow_range = quant_desc.narrow_range

        self._disabled = disabled
        self._if_quant = if_quant
        self._if_clip = if_clip
        self._if_calib = if_calib

        if quant_desc.amax is not None:
            amax = torch.tensor(quant_desc.amax, dtype=torch.float32)
            if self._learn_amax:
                self._amax = nn.Parameter(amax)
            else:
                self.register_buffer("_amax", amax)

        self._calibrator = calib.calibrator_from_descriptor(quant_desc)
        # the scale of the last real (fake_quant=False) quantization, as the reference keeps it
        self._scale: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- properties
    num_bits = property(lambda self: self._num_bits)
    unsigned = property(lambda self: self._unsigned)
    narrow_range = property(lambda self: self._narrow_range)
    axis = property(lambda self: self._axis)
    fake_quant = property(lambda self: self._fake_quant)
    scale_amax = property(lambda self: self._scale_amax)
    learn_amax = property(lambda self: self._learn_amax)
    quant_desc = property(lambda self: self._quant_desc)

    @property
    def calibrator(self):
        return self._calibrator

    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    @property
    def is_quant_enabled(self) -> bool:
        return self._if_quant

    @property
    def is_calib_enabled(self) -> bool:
        return self._if_calib

    @property
    def has_amax(self) -> bool:
        return hasattr(self, "_amax")

    @property
    def amax(self) -> Optional[torch.Tensor]:
        """A copy of the stored amax, or ``None`` if the quantizer is dynamic."""
        if not self.has_amax:
            return None
        return self._amax.detach().clone()

    @amax.setter
    def amax(self, value):
        value = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                           dtype=np.float32))
        self._check_amax_value(value)
        self._set_amax(value)

    @property
    def step_size(self) -> Optional[torch.Tensor]:
        """The quantization step ``amax / max_bound`` (ONNX's ``y_scale``), or None."""
        if not self.has_amax:
            return None
        return self.amax.float() / tq.quant_bounds(self._num_bits, self._unsigned, self._narrow_range)[1]

    @property
    def maxbound(self):
        """The largest code: 127 for signed 8-bit, 255 unsigned, 448 for FP8 E4M3."""
        return tq.quant_bounds(self._num_bits, self._unsigned, self._narrow_range)[1]

    @property
    def scale(self) -> Optional[torch.Tensor]:
        """``max_bound / amax`` — pytorch_quantization's definition of scale.

        A real (``fake_quant=False``) quantizer returns the scale its last forward pass used,
        as the reference does (the dynamic one included); otherwise the scale of the stored
        amax, or None without one. (The reference returns 1.0 for fake quantizers.)
        """
        if not self._fake_quant and self._scale is not None:
            return self._scale
        if not self.has_amax:
            return None
        return self.maxbound / self.amax.float()

    # ----------------------------------------------------------------- switches
    @property
    def switches(self) -> Switches:
        """``Switches(enabled, quant, calib)``: save them, change modes, assign them back."""
        return Switches(not self._disabled, self._if_quant, self._if_calib)

    @switches.setter
    def switches(self, value: Switches):
        enabled, quant, calib_ = Switches(*value)
        for name, v in (("enabled", enabled), ("quant", quant), ("calib", calib_)):
            if not isinstance(v, bool):
                raise TypeError(f"switches.{name} must be True or False, got {v!r}")
        self._disabled, self._if_quant, self._if_calib = not enabled, quant, calib_

    def enable(self):
        self._disabled = False

    def disable(self):
        self._disabled = True

    def enable_quant(self):
        self._if_quant = True

    def disable_quant(self):
        self._if_quant = False

    def enable_clip(self):
        self._if_clip = True

    def disable_clip(self):
        self._if_clip = False

    def enable_calib(self):
        self._if_calib = True

    def disable_calib(self):
        self._if_calib = False

    # ----------------------------------------------------------------- amax
    def _check_amax_value(self, value: torch.Tensor):
        # the same rules as a descriptor's amax: non-empty, finite, >= 0
        QuantDescriptor._check_amax(value)

    def _check_amax_shape(self, value: torch.Tensor):
        """An amax that cannot belong to this quantizer is refused now, not at forward time."""
        if self.has_amax and self._amax.shape != value.shape:
            raise ValueError(f"amax of shape {tuple(value.shape)} cannot replace this quantizer's "
                             f"amax of shape {tuple(self._amax.shape)}; was the checkpoint made "
                             "for another model or another quantization axis?")
        if self._axis is None and value.numel() != 1:
            raise ValueError(f"a per-tensor quantizer needs one amax, got shape {tuple(value.shape)}; "
                             "per-channel amax needs a descriptor with axis=...")
        if self._axis is not None and value.dim():
            axes = (self._axis,) if isinstance(self._axis, int) else self._axis
            keep = {a % value.dim() for a in axes if -value.dim() <= a < value.dim()}
            if len(keep) != len(axes) or any(value.shape[d] != 1 for d in range(value.dim()) if d not in keep):
                raise ValueError(f"per-channel amax of shape {tuple(value.shape)} does not fit axis="
                                 f"{self._axis}: every dim except the channel axis must be 1, e.g. (C, 1, 1, 1)")

    def _set_amax(self, value: torch.Tensor):
        value = value.detach().float()
        if self.has_amax:
            old = self._amax
            if old.shape == value.shape:
                with torch.no_grad():  # in place: an optimizer holding a learned amax keeps it
                    old.copy_(value.to(old.device))
                return
            device = old.device
            delattr(self, "_amax")
        else:
            device = self._device_hint()
        value = value.to(device)
        if self._learn_amax:
            self._amax = nn.Parameter(value)
        else:
            self.register_buffer("_amax", value)

    def _device_hint(self):
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def load_calib_amax(self, *args, strict: bool = True, **kwargs):
        """Compute amax from the calibrator and store it (lesson 4).

        Arguments go to the calibrator's ``compute_amax``: nothing for a max calibrator;
        ``method="entropy" | "mse" | "percentile"`` (and ``percentile=``, ``start_bin=``,
        ``stride=``) for a histogram calibrator.
        """
        if self._calibrator is None:
            raise RuntimeError("this quantizer has no calibrator")
        amax = self._calibrator.compute_amax(*args, **kwargs)
        if amax is None:
            msg = ("load_calib_amax: the calibrator has collected no data. Put the quantizer in "
                   "calibration mode (disable_quant(); enable_calib()) and run batches first.")
            if strict:
                raise RuntimeError(msg)
            return None
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().cpu()
        self._check_amax_value(amax)
        self._set_amax(amax)
        return self.amax

    def init_learn_amax(self):
        """Turn the stored amax into a trainable parameter (for QAT with learnable ranges)."""
        if not self.has_amax:
            raise RuntimeError("init_learn_amax needs an amax: calibrate first (load_calib_amax)")
        if self._axis is not None:
            raise TypeError(f"learnable amax is per-tensor only; this quantizer has axis={self._axis}")
        value = self._amax.detach().clone()
        del self._amax
        self._amax = nn.Parameter(value)
        self._learn_amax = True

    def reset_amax(self):
        """Forget the stored amax (the quantizer becomes dynamic again)."""
        if self.has_amax:
            delattr(self, "_amax")
        if self._calibrator is not None:
            self._calibrator.reset()

    def _dynamic_amax(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.detach().abs()
        if self._axis is None:
            return x.max().float() if x.numel() else torch.zeros((), device=x.device)
        keep = set(tq.normalized_axes(self._axis, x))
        reduce = [d for d in range(x.dim()) if d not in keep]
        return torch.amax(x, dim=reduce, keepdim=True).float() if reduce else x.float()

    def _get_amax(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.has_amax:
            amax = self._amax
            if not self._learn_amax:
                amax = amax.detach()
        else:
            amax = self._dynamic_amax(inputs)
        if self._scale_amax is not None:
            amax = amax * self._scale_amax
        if amax.device != inputs.device:
            amax = amax.to(inputs.device)
        return amax

    # ----------------------------------------------------------------- forward
    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = self._get_amax(inputs)
        if self._axis is not None:
            tq.normalized_axes(self._axis, inputs)
            if amax.dim() and amax.dim() != inputs.dim():
                raise ValueError(f"per-channel amax of shape {tuple(amax.shape)} does not broadcast "
                                 f"against an input of shape {tuple(inputs.shape)}")
        if self._fake_quant:
            # the functions carry their own ONNX symbolic: export needs nothing more here
            # only a learnable amax gets a gradient (PACT); a calibrated or dynamic one gets none
            fn = tq.learnable_fake_tensor_quant if self._learn_amax else tq.fake_tensor_quant
            return fn(inputs, amax, self._num_bits, self._unsigned, self._narrow_range)
        codes, self._scale = tq.tensor_quant(inputs, amax, self._num_bits, self._unsigned, self._narrow_range)
        return codes

    def _check_onnx_readiness(self):
        """Under ``enable_onnx_export()``: refuse what would export wrongly, say how to fix it."""
        if self._disabled or not self._if_quant:
            return
        if not self.has_amax:
            raise RuntimeError("ONNX export needs a calibrated quantizer, but this one has no amax "
                               "(its range would be traced from the example input). Calibrate and "
                               "load_calib_amax() first, or disable() this quantizer.")
        if tq.is_fp8(self._num_bits) and self._amax.numel() != 1:
            raise ValueError(f"FP8 E4M3 exports per tensor only, this quantizer has an amax of shape "
                             f"{tuple(self._amax.shape)}; use axis=None for FP8 quantizers")
        if self._if_calib:
            warnings.warn("exporting a quantizer still in calibration mode; finish calibration "
                          "(disable_calib()) for the graph to match", stacklevel=3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._enable_onnx_export:
            self._check_onnx_readiness()
        if self._disabled:
            return inputs
        if self._if_calib:
            if self._calibrator is None:
                raise RuntimeError("calibration is enabled but this quantizer has no calibrator")
            self._calibrator.collect(inputs.detach())
        outputs = inputs
        if self._if_clip:
            amax = self._get_amax(inputs)
            outputs = torch.clamp(outputs, -amax, amax) if not self._unsigned else torch.clamp(outputs, 0, amax)
        if self._if_quant:
            outputs = self._quant_forward(outputs)
        return outputs

    # ----------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_amax"
        if key in state_dict:
            value = torch.as_tensor(state_dict[key]).detach().float().cpu()
            try:
                self._check_amax_value(value)
                self._check_amax_shape(value)
            except ValueError as e:
                raise ValueError(f"state_dict entry {key!r}: {e}") from None
            if not self.has_amax:
                # a calibrated checkpoint loaded into a fresh (dynamic) quantizer
                self._set_amax(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ----------------------------------------------------------------- repr
    def _short_amax(self) -> str:
        if not self.has_amax:
            return "dynamic"
        a = self.amax
        if a.numel() == 1:
            return f"{float(a):.4f}"
        return f"[{float(a.min()):.4f}, {float(a.max()):.4f}]({a.numel()})"

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        parts = ["fp8-e4m3" if tq.is_fp8(self._num_bits) else f"{self._num_bits}bit"]
        if self._narrow_range:
            parts.append("narrow")
        if self._unsigned:
            parts.append("unsigned")
        parts.append("fake" if self._fake_quant else "real")
        parts.append("per-tensor" if self._axis is None else f"axis={self._axis}")
        parts.append(f"amax={self._short_amax()}")
        if self._learn_amax:
            parts.append("learned")
        if self._scale_amax is not None:
            parts.append(f"scale_amax={self._scale_amax}")
        if self._calibrator is not None:
            parts.append(f"calibrator={type(self._calibrator).__name__}")
        if self._if_quant:
            parts.append("quant")
        if self._if_clip:
            parts.append("clip")
        if self._if_calib:
            parts.append("calib")
        return " ".join(parts)
