"""Lesson 9 — PyTorch-native quantization, measured next to the course's Q/DQ-for-an-engine way.

PyTorch quantizes a model for its *own* integer kernels (``torch.ao.quantization``: dynamic,
static, QAT; eager and FX front ends; now ``torchao``'s PT2E); the course quantizes for an
*external* engine (Q/DQ in ONNX for TensorRT or ONNX Runtime). The notebook calls PyTorch's
API itself; this module holds what it measures and checks with:

* PyTorch's mapping rules written out in numpy: :func:`symmetric_scale`, :func:`quantize_codes`,
  :func:`kernel_qparams` (the affine scale and zero point a dynamic kernel picks at run time)
  and :func:`dynamic_linear_reference` — what a dynamic int8 ``Linear`` computes, step by step;
* :class:`QuantStubbed`: the QuantStub / DeQuantStub wrapper eager mode needs;
* :func:`upscale_digits` and :func:`fit`: the digits as 3-channel images for a torchvision
  model, and a small deterministic training loop (ResNet-18, QAT fine-tuning);
* :func:`model_size_kb`: bytes of the tensors a model really uses;
* :func:`format_results` and :func:`plot_results`: the lesson's table and figure.
"""
from __future__ import annotations

import io
from typing import Callable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "symmetric_scale", "quantize_codes", "kernel_qparams", "dynamic_linear_reference", "QuantStubbed",
    "upscale_digits", "fit", "model_size_kb", "format_results", "plot_results",
]

_EPS = float(np.finfo(np.float32).eps)  # PyTorch's observers never return a smaller scale


def symmetric_scale(amax: float, qmin: int = -128, qmax: int = 127) -> float:
    """PyTorch's symmetric rule: ``amax / ((qmax - qmin) / 2)``, zero point 0.

    For int8 ``-128..127`` that is ``amax / 127.5``, slightly finer than TensorRT's
    ``amax / 127`` (narrow range ``-127..127``, which this gives with ``qmin=-127``).
    """
    if amax < 0:
        raise ValueError(f"amax must be >= 0, got {amax}")
    return float(np.float32(max(float(amax) / ((qmax - qmin) / 2), _EPS)))


def quantize_codes(x, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes ``clamp(round(x * (1/scale)) + zero_point)`` as PyTorch's CPU kernels round them.

    They multiply by the float32 inverse of the scale (not divide) and round half to even.
    """
    x = np.asarray(x, dtype=np.float32)
    inv = np.float32(1.0) / np.float32(scale)
    return np.clip(np.rint(np.float32(zero_point) + inv * x), qmin, qmax).astype(np.int64)


_SMALL_SCALE = 6.1e-5  # FBGEMM raises smaller run-time scales to this (and widens the range to match)


def kernel_qparams(xmin: float, xmax: float, qmin: int = 0, qmax: int = 255) -> Tuple[float, int]:
    """``(scale, zero_point)`` a dynamic kernel picks at run time (FBGEMM's ``ChooseQuantizationParams``).

    The affine rule (range widened to contain 0, ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = qmin - round(min / scale)``) in float64 with the scale rounded to float32
    at the end, a floor of 6.1e-5 on the scale, and the zero point taken from whichever end
    of the range rounds with less error: the details that make it agree with the kernel bit
    for bit. ``qmax = 127`` is x86's ``reduce_range``.
    """
    if xmin > xmax:
        raise ValueError(f"xmin must be <= xmax, got {xmin} > {xmax}")
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got {qmin} and {qmax}")
    lo, hi = min(float(xmin), 0.0), max(float(xmax), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if np.float32(scale) == 0 or np.isinf(np.float32(1) / np.float32(scale)):
        scale = 0.1
    if scale < _SMALL_SCALE:
        if lo == 0.0:
            hi = _SMALL_SCALE * (qmax - qmin)
        elif hi == 0.0:
            lo = -_SMALL_SCALE * (qmax - qmin)
        else:
            lo, hi = lo * _SMALL_SCALE / scale, hi * _SMALL_SCALE / scale
        scale = _SMALL_SCALE
    zp_lo, zp_hi = qmin - lo / scale, qmax - hi / scale
    zp = zp_lo if abs(qmin) - abs(lo / scale) < abs(qmax) - abs(hi / scale) else zp_hi
    return float(np.float32(scale)), int(np.clip(np.rint(zp), qmin, qmax))


def dynamic_linear_reference(x, weight, bias=None, reduce_range: bool = True):
    """What ``torch.ao.nn.quantized.dynamic.Linear`` (x86 / fbgemm) computes, by hand (lesson 9).

    1. weights, once: per-tensor symmetric int8 (:func:`symmetric_scale` of ``max|w|``);
    2. the input, at every call: affine uint8 from *this batch's* min and max
       (``0..127`` with ``reduce_range``, x86's default), chosen as the kernel does;
    3. an integer matrix product: ``acc = sum((q_x - zp_x) * q_w)``, exact in int64;
    4. back to float: ``y = s_x * s_w * acc + bias``.

    ``x`` (N, in), ``weight`` (out, in), ``bias`` (out,) or None. Returns ``(y, parts)`` with
    ``y`` float64 (N, out) and ``parts`` the intermediate scales, zero point and codes.
    """
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    s_w = symmetric_scale(float(np.abs(w).max()))
    q_w = quantize_codes(w, s_w, 0, -128, 127)
    qmax = 127 if reduce_range else 255
    s_x, zp_x = kernel_qparams(float(x.min()), float(x.max()), 0, qmax)
    q_x = quantize_codes(x, s_x, zp_x, 0, qmax)
    acc = (q_x - zp_x) @ q_w.T
    y = np.float64(s_x) * np.float64(s_w) * acc
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y, {"s_w": s_w, "q_w": q_w, "s_x": s_x, "zp_x": zp_x, "q_x": q_x, "acc": acc}


class QuantStubbed(nn.Module):
    """``QuantStub -> model -> DeQuantStub``: where eager mode quantizes the input and dequantizes the output.

    Eager mode only converts modules, so the float-to-int8 boundary must be a module too.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub  # the deprecated API, only when used

        self.quant = QuantStub()
        self.model = model
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.model(self.quant(x)))


def upscale_digits(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Digits (N, 1, 8, 8) in [0, 1] as (N, 3, size, size) images: bilinear upscaling, grey to RGB."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W), got shape {tuple(x.shape)}")
    up = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp(0, 1).repeat(1, 3, 1, 1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0,
        batch_size: int = 64, weight_decay: float = 0.0,
        after_epoch: Optional[Callable[[int, nn.Module], None]] = None) -> nn.Module:
    """Train ``model`` on ``(x, y)`` with AdamW and a one-cycle schedule peaking at ``lr``; deterministic.

    ``after_epoch(epoch, model)`` runs after each epoch (QAT uses it to freeze observers).
    Returns the model, left in train mode (QAT models are converted from there).
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got {epochs} and {lr}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model


def _used_state(model: nn.Module) -> dict:
    """The state a model's forward reads: all of it, or for an FX graph only what the graph reaches.

    ``torch.export`` / ``convert_pt2e`` graphs keep the float weights as attributes after
    they have been replaced by int8 constants; counting them would make the int8 model look
    larger than the float one.
    """
    state = model.state_dict()
    if not isinstance(model, torch.fx.GraphModule):
        return state
    roots = {str(n.target) for n in model.graph.nodes if n.op in ("get_attr", "call_module")}
    return {k: v for k, v in state.items() if k in roots or any(k.startswith(r + ".") for r in roots)}


def model_size_kb(model: nn.Module) -> float:
    """Size in KiB of ``torch.save`` of the tensors the model uses (int8 tensors count 1 byte each)."""
    buf = io.BytesIO()
    torch.save(_used_state(model), buf)
    return len(buf.getvalue()) / 1024


def format_results(rows: Mapping[str, Mapping[str, float]], reference: Optional[str] = None) -> str:
    """A text table: one row per variant with ``accuracy``, ``size_kb`` and ``latency_ms``.

    With ``reference`` (a row name) two more columns give size and speed relative to it.
    """
    name_w = max([len(n) for n in rows] + [7])
    head = f"{'variant':{name_w}s}  accuracy   size KB  latency ms"
    if reference is not None:
        if reference not in rows:
            raise ValueError(f"reference {reference!r} is not a row; rows are {list(rows)}")
        head += "   smaller   faster"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        line = f"{name:{name_w}s}  {r['accuracy']:8.4f}  {r['size_kb']:8.1f}  {r['latency_ms']:10.2f}"
        if reference is not None:
            ref = rows[reference]
            line += f"  {ref['size_kb'] / r['size_kb']:7.2f}x  {ref['latency_ms'] / r['latency_ms']:6.2f}x"
        lines.append(line)
    return "\n".join(lines)


def plot_results(rows: Mapping[str, Mapping[str, float]], title: str = ""):
    """Three bar panels sharing the variant axis: accuracy, size (KB) and latency (ms). Returns the Figure.

    The bars carry gids ``accuracy``, ``size_kb`` and ``latency_ms`` (one bar per row, in order).
    """
    import matplotlib.pyplot as plt

    names = list(rows)
    if not names:
        raise ValueError("rows is empty: give it {variant: {'accuracy', 'size_kb', 'latency_ms'}}")
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.35 * len(names) + 1.4), dpi=90, sharey=True)
    ypos = np.arange(len(names))
    panels = (("accuracy", "test accuracy", "C2"), ("size_kb", "size (KB)", "C0"),
              ("latency_ms", "CPU latency (ms, median)", "C1"))
    for ax, (key, label, color) in zip(axes, panels):
        values = [float(rows[n][key]) for n in names]
        for k, v in enumerate(values):
            ax.barh(ypos[k], v, color=color, gid=key)
            ax.text(v, ypos[k], f" {v:,.0f}" if v >= 1000 else f" {v:.4g}", va="center", fontsize=7)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values) * 1.3 if max(values) > 0 else 1)
    accs = [float(rows[n]["accuracy"]) for n in names]
    axes[0].set_xlim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.03) + 0.02)
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
