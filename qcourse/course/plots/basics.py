"""Figures for lessons 1 and 2 — quantization math and ``tensor_quant``.

Every ``plot_*`` function draws with matplotlib and returns the ``Figure`` (it does not
call ``plt.show()``; a notebook renders the returned figure inline). The numbers drawn
come from :mod:`qcourse.tensor_quant`, so a figure always shows what the package computes.

* :func:`bit_string` / :func:`plot_bit_layouts` — the bit fields of one number in FP32,
  FP16, BF16 and INT8 (lesson 1).
* :func:`plot_mapping` — symmetric vs asymmetric mapping of a few values onto integer
  codes (lesson 1).
* :func:`plot_quant_panels` — the staircase and its error: original / codes / dequantized
  / error (lesson 1).
* :func:`quant_error_vs_amax` / :func:`plot_mse_vs_amax` — rounding vs clipping error as
  amax moves (lesson 1).
* :func:`per_channel_errors` / :func:`plot_per_channel_error` — per-tensor vs per-channel
  weight error, one bar pair per output channel (lesson 1).
* :func:`plot_accuracy_vs_bits` — model accuracy against bit width (lessons 1 and 2).
* :func:`plot_ste` — forward staircase, straight-through gradient and PACT amax gradient
  (lesson 2).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from qcourse import tensor_quant as tq

__all__ = [
    "BIT_FORMATS",
    "bit_string",
    "plot_bit_layouts",
    "plot_mapping",
    "plot_quant_panels",
    "quant_error_vs_amax",
    "plot_mse_vs_amax",
    "per_channel_errors",
    "plot_per_channel_error",
    "plot_accuracy_vs_bits",
    "plot_ste",
]

#: Field layout (name, bits) of each format, most significant bit first.
BIT_FORMATS: Dict[str, Tuple[Tuple[str, int], ...]] = {
    "FP32": (("sign", 1), ("exponent", 8), ("mantissa", 23)),
    "FP16": (("sign", 1), ("exponent", 5), ("mantissa", 10)),
    "BF16": (("sign", 1), ("exponent", 8), ("mantissa", 7)),
    "INT8": (("sign", 1), ("magnitude (two's complement)", 7)),
}
_DTYPES = {"FP32": (torch.float32, torch.int32), "FP16": (torch.float16, torch.int16),
           "BF16": (torch.bfloat16, torch.int16), "INT8": (torch.int8, torch.int8)}
_FIELD_COLORS = {"sign": "#e07a5f", "exponent": "#81b29a", "mantissa": "#f2cc8f",
                 "magnitude (two's complement)": "#9db4e0"}


def _plt():
    import matplotlib.pyplot as plt  # imported lazily: importing qcourse stays light

    return plt


def _check_format(fmt: str) -> None:
    if fmt not in BIT_FORMATS:
        raise ValueError(f"format must be one of {sorted(BIT_FORMATS)}, got {fmt!r}")


def bit_string(value, fmt: str) -> str:
    """The bits of ``value`` stored in format ``fmt`` ("FP32", "FP16", "BF16", "INT8").

    Returns a string of '0'/'1', most significant bit first (32, 16, 16 or 8 characters).
    Floats are rounded to the format first (to nearest even, as ``tensor.to(dtype)`` does);
    an INT8 value must be an integer in -128..127 (an int8 code, not a real number).
    """
    _check_format(fmt)
    dtype, int_dtype = _DTYPES[fmt]
    nbits = sum(n for _, n in BIT_FORMATS[fmt])
    if fmt == "INT8":
        if isinstance(value, bool) or float(value) != int(value) or not -128 <= int(value) <= 127:
            raise ValueError(f"an INT8 value must be an integer code in -128..127, got {value!r}; "
                             "quantize a real number first (qcourse.tensor_quant.tensor_quant)")
        t = torch.tensor([int(value)], dtype=torch.int8)
    else:
        t = torch.tensor([float(value)], dtype=torch.float32).to(dtype)
    raw = int(t.view(int_dtype).item()) & ((1 << nbits) - 1)
    return format(raw, f"0{nbits}b")


def _stored_value(value, fmt: str) -> float:
    if fmt == "INT8":
        return float(int(value))
    return float(torch.tensor([float(value)], dtype=torch.float32).to(_DTYPES[fmt][0]).float())


def plot_bit_layouts(value: float, int8_code: Optional[int] = None, amax: Optional[float] = None,
                     dpi: int = 90):
    """Bit fields of ``value`` in FP32, FP16 and BF16, and of an INT8 code (lesson 1).

    Args:
        value: the real number to store.
        int8_code: the INT8 row's code. Default: ``tensor_quant(value, amax)`` (symmetric,
            narrow range), which needs ``amax``.
        amax: range used to quantize ``value`` when ``int8_code`` is not given.

    Each bit is a box coloured by its field; the text on the right is the value the format
    actually stores. The bit texts carry ``gid="bits-<FORMAT>"`` (one per bit, MSB first).
    """
    plt = _plt()
    if int8_code is None:
        if amax is None:
            raise ValueError("pass int8_code=..., or amax=... so the INT8 row can quantize value")
        codes, _ = tq.tensor_quant(torch.tensor([float(value)]), float(amax))
        int8_code = int(codes.item())
    rows = ["FP32", "FP16", "BF16", "INT8"]
    fig, ax = plt.subplots(figsize=(10, 2.9), dpi=dpi)
    for r, fmt in enumerate(rows):
        y = len(rows) - 1 - r
        v = int8_code if fmt == "INT8" else value
        bits = bit_string(v, fmt)
        i = 0
        for field, n in BIT_FORMATS[fmt]:
            for _ in range(n):
                ax.add_patch(plt.Rectangle((i, y), 1, 0.8, facecolor=_FIELD_COLORS[field],
                                           edgecolor="white", linewidth=0.8))
                ax.text(i + 0.5, y + 0.4, bits[i], ha="center", va="center", fontsize=7,
                        family="monospace", gid=f"bits-{fmt}")
                i += 1
        ax.text(-0.6, y + 0.4, fmt, ha="right", va="center", fontsize=10, weight="bold")
        if fmt == "INT8":
            if amax is not None:
                step = float(amax) / 127
                desc = f"code {int8_code}  (x step {step:.5g} = {int8_code * step:.6g})"
            else:
                desc = f"code {int8_code}"
        else:
            stored = _stored_value(value, fmt)
            desc = f"{stored:.9g}  (error {stored - float(value):+.2g})"
        ax.text(len(bits) + 0.6, y + 0.4, desc, ha="left", va="center", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c) for c in _FIELD_COLORS.values()]
    ax.legend(handles, list(_FIELD_COLORS), loc="upper center", bbox_to_anchor=(0.5, 0.0),
              ncol=4, fontsize=8, frameon=False)
    ax.set_xlim(-4, 46)
    ax.set_ylim(-0.1, len(rows))
    ax.axis("off")
    ax.set_title(f"The bits of {value!r} in each format", fontsize=10)
    fig.tight_layout()
    return fig


def plot_mapping(values, num_bits: int = 8, dpi: int = 90):
    """Symmetric vs asymmetric (affine) mapping of ``values`` onto integer codes (lesson 1).

    Top panel: symmetric, ``amax = max|values|``, codes ``-(2**(b-1)-1) .. 2**(b-1)-1``,
    zero point 0. Bottom panel: asymmetric over ``[min, max]`` (widened to contain 0), codes
    ``0 .. 2**b-1`` with a zero point. Each value is drawn on the real line (upper row) and
    linked to its code on the integer line (lower row); the x axis is in code units.
    The code markers carry ``gid="codes-symmetric"`` / ``gid="codes-asymmetric"``.
    """
    plt = _plt()
    x = torch.as_tensor(values, dtype=torch.float32).flatten()
    if x.numel() == 0:
        raise ValueError("values must not be empty")
    amax = float(x.abs().max())
    sym_codes, sym_scale = tq.tensor_quant(x, amax, num_bits)
    step = 1.0 / float(sym_scale)
    aff_codes, aff_scale, zp = tq.affine_tensor_quant(x, float(x.min()), float(x.max()), num_bits)
    aff_scale, zp = float(aff_scale), float(zp)
    qmax_s = 2 ** (num_bits - 1) - 1
    qmax_a = 2 ** num_bits - 1

    fig, axes = plt.subplots(2, 1, figsize=(10, 4.2), dpi=dpi)
    panels = [
        ("symmetric", axes[0], x / step, sym_codes, (-qmax_s, qmax_s), 0.0,
         f"symmetric: step = amax/{qmax_s} = {amax:.4g}/{qmax_s} = {step:.6g}, zero point 0"),
        ("asymmetric", axes[1], x / aff_scale + zp, aff_codes, (0, qmax_a), zp,
         f"asymmetric: scale = (max-min)/{qmax_a} = {aff_scale:.6g}, zero point {zp:.0f}"),
    ]
    for name, ax, pos, codes, (lo, hi), zero, title in panels:
        ax.hlines([1, 0], lo, hi, color="0.4")
        ax.vlines([lo, hi], -0.08, 1.08, color="0.4", linewidth=0.8)
        ax.plot([zero, zero], [-0.12, 1.12], color="0.6", linestyle=":")
        ax.text(zero, 0.5, " 0.0 maps here", fontsize=7, color="0.4", va="center")
        order = np.argsort(pos.numpy(), kind="stable")
        last = -np.inf
        bump = 0
        for i in order.tolist():
            p, c, v = float(pos[i]), float(codes[i]), float(x[i])
            bump = 1 - bump if p - last < 0.06 * (hi - lo) else 0   # stagger crowded labels
            last = p
            ax.annotate("", xy=(c, 0.03), xytext=(p, 0.97),
                        arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1))
            ax.text(p, 1.1 + 0.22 * bump, f"{v:g}", ha="center", va="bottom", fontsize=8,
                    color="tab:blue")
            ax.text(c, -0.1 - 0.22 * bump, f"{c:.0f}", ha="center", va="top", fontsize=8,
                    color="tab:red")
        ax.scatter(pos.numpy(), np.ones(len(pos)), color="tab:blue", zorder=3, s=18)
        ax.scatter(codes.numpy(), np.zeros(len(codes)), color="tab:red", zorder=3, s=18,
                   gid=f"codes-{name}")
        ax.set_xlim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
        ax.set_ylim(-0.6, 1.6)
        ax.set_yticks([0, 1], [f"codes\n{lo}..{hi}", "real\nvalues"], fontsize=8)
        ax.tick_params(axis="y", length=0)
        ax.set_xlabel("code units", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title, fontsize=9)
        for s in ("left", "right", "top"):
            ax.spines[s].set_visible(False)
    fig.tight_layout()
    return fig


def plot_quant_panels(x, amax: float, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True, dpi: int = 90):
    """The quantization staircase and its error, in four panels (lesson 1).

    ``x`` (any shape, flattened and sorted) is plotted against itself: (1) the original
    values, (2) the integer codes from :func:`~qcourse.tensor_quant.tensor_quant`, (3) the
    dequantized values from :func:`~qcourse.tensor_quant.fake_tensor_quant`, (4) the error
    dequantized - original, with the +-step/2 rounding band and the clipping region shaded.
    The four lines carry ``gid`` "original", "codes", "dequantized" and "error".
    """
    plt = _plt()
    xs = torch.as_tensor(x, dtype=torch.float32).detach().flatten().sort().values
    codes, scale = tq.tensor_quant(xs, float(amax), num_bits, unsigned, narrow_range)
    deq = tq.fake_tensor_quant(xs, float(amax), num_bits, unsigned, narrow_range)
    err = deq - xs
    step = 1.0 / float(scale)
    xn = xs.numpy()
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.7), dpi=dpi)
    data = [("original", xn, "original x"), ("codes", codes.numpy(), f"{num_bits}-bit codes"),
            ("dequantized", deq.numpy(), "dequantized (codes x step)"),
            ("error", err.numpy(), "error = dequantized - x")]
    colors = ["0.3", "tab:red", "tab:blue", "tab:purple"]
    for ax, (gid, y, title), color in zip(axes, data, colors):
        ax.plot(xn, y, color=color, linewidth=1.2, gid=gid)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x", fontsize=8)
        ax.tick_params(labelsize=7)
        lo = 0.0 if unsigned else -float(amax)
        if xn.min() < lo:
            ax.axvspan(xn.min(), lo, color="tab:orange", alpha=0.15, lw=0)
        if xn.max() > amax:
            ax.axvspan(float(amax), xn.max(), color="tab:orange", alpha=0.15, lw=0)
    axes[3].axhspan(-step / 2, step / 2, color="tab:green", alpha=0.15, lw=0,
                    label="rounding: |error| <= step/2")
    axes[3].plot([], [], color="tab:orange", alpha=0.4, linewidth=6, label="clipped: |x| > amax")
    axes[3].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{num_bits}-bit symmetric quantization, amax = {float(amax):.4g}, "
                 f"step = {step:.4g}", fontsize=10)
    fig.tight_layout()
    return fig


def quant_error_vs_amax(x, amaxes, num_bits: int = 8, unsigned: bool = False,
                        narrow_range: bool = True) -> Dict[str, np.ndarray]:
    """Mean squared quantization error of ``x`` for each candidate ``amax`` (lesson 1).

    The error splits exactly into two parts, each a sum over some elements divided by
    ``x.numel()`` so that ``mse == rounding + clipping``:

    * ``rounding`` — elements inside the range (``|x| <= amax``), error at most step/2;
    * ``clipping`` — elements outside it, clamped to the largest code.

    Returns a dict of float64 arrays ``amax``, ``mse``, ``rounding``, ``clipping``.
    """
    xs = torch.as_tensor(x, dtype=torch.float32).detach().flatten()
    if xs.numel() == 0:
        raise ValueError("x must not be empty")
    amaxes = np.asarray(amaxes, dtype=np.float64).ravel()
    if amaxes.size == 0 or (amaxes <= 0).any():
        raise ValueError(f"amaxes must be a non-empty list of values > 0, got {amaxes[:5]}...")
    mse = np.empty_like(amaxes)
    rnd = np.empty_like(amaxes)
    clp = np.empty_like(amaxes)
    n = xs.numel()
    for i, a in enumerate(amaxes):
        deq = tq.fake_tensor_quant(xs, float(a), num_bits, unsigned, narrow_range)
        sq = (deq - xs).double() ** 2
        outside = (xs > a) | (xs < (0.0 if unsigned else -a))
        clp[i] = float(sq[outside].sum()) / n
        rnd[i] = float(sq[~outside].sum()) / n
        mse[i] = float(sq.sum()) / n
    return {"amax": amaxes, "mse": mse, "rounding": rnd, "clipping": clp}


def _spans(mask: np.ndarray, xs: np.ndarray):
    """Contiguous runs of True in ``mask`` as (x_start, x_end) pairs (edges at midpoints)."""
    out = []
    edges = np.concatenate([[xs[0]], (xs[1:] + xs[:-1]) / 2, [xs[-1]]])
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j + 1 < len(mask) and mask[j + 1]:
                j += 1
            out.append((edges[i], edges[j + 1]))
            i = j + 1
        else:
            i += 1
    return out


def plot_mse_vs_amax(x, amaxes=None, num_bits: int = 8, unsigned: bool = False,
                     narrow_range: bool = True, title: Optional[str] = None, dpi: int = 90):
    """MSE against amax with the rounding- and clipping-dominated regions shaded (lesson 1).

    Args:
        x: the data (weights or activations), any shape.
        amaxes: candidate amax values; default 200 points from 1% to 110% of ``max|x|``.

    Lines ``gid`` "mse", "rounding", "clipping" hold the curves of
    :func:`quant_error_vs_amax`; where clipping error exceeds rounding error the region is
    shaded orange ("clipping-dominated"), elsewhere green ("rounding-dominated"). The amax
    with the lowest MSE and ``max|x|`` are marked.
    """
    plt = _plt()
    xs = torch.as_tensor(x, dtype=torch.float32).detach().flatten()
    xmax = float(xs.abs().max())
    if amaxes is None:
        amaxes = np.linspace(0.01 * xmax, 1.1 * xmax, 200)
    r = quant_error_vs_amax(xs, amaxes, num_bits, unsigned, narrow_range)
    a = r["amax"]
    fig, ax = plt.subplots(figsize=(10, 3.3), dpi=dpi)
    clip_dom = r["clipping"] > r["rounding"]
    for k, (s, e) in enumerate(_spans(clip_dom, a)):
        ax.axvspan(s, e, color="tab:orange", alpha=0.15, lw=0, gid="clipping-dominated",
                   label="clipping-dominated" if k == 0 else None)
    for k, (s, e) in enumerate(_spans(~clip_dom, a)):
        ax.axvspan(s, e, color="tab:green", alpha=0.12, lw=0, gid="rounding-dominated",
                   label="rounding-dominated" if k == 0 else None)
    floor = max(float(r["mse"][r["mse"] > 0].min()) * 1e-2, 1e-30) if (r["mse"] > 0).any() else 1e-30
    ax.plot(a, r["mse"], color="black", lw=1.8, label="total MSE", gid="mse")
    ax.plot(a, np.maximum(r["rounding"], floor), color="tab:green", lw=1, ls="--",
            label="rounding part", gid="rounding")
    ax.plot(a, np.maximum(r["clipping"], floor), color="tab:orange", lw=1, ls="--",
            label="clipping part", gid="clipping")
    best = int(np.argmin(r["mse"]))
    ax.axvline(a[best], color="tab:blue", lw=1, gid="best-amax",
               label=f"lowest MSE at amax = {a[best]:.4g}")
    ax.axvline(xmax, color="0.4", lw=1, ls=":", gid="max-abs", label=f"max|x| = {xmax:.4g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(float(r["mse"].min()) / 20, floor))
    ax.set_xlabel("amax")
    ax.set_ylabel("mean squared error")
    ax.set_title(title or f"{num_bits}-bit quantization error as amax moves", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def per_channel_errors(weight, num_bits: int = 8, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """MSE of each channel of ``weight`` under per-tensor and per-channel quantization.

    Args:
        weight: a weight tensor, e.g. a conv weight (K, C, R, S).
        axis: the channel axis (0 = output channels for conv and linear weights).

    Returns ``(per_tensor, per_channel)``, two float64 arrays of length ``weight.shape[axis]``:
    the mean squared error within each channel when one amax (``max|W|``) serves the whole
    tensor, and when each channel has its own amax (``max|W_k|``, shape (K,1,1,1)).
    """
    w = torch.as_tensor(weight, dtype=torch.float32).detach()
    if w.dim() < 2:
        raise ValueError(f"weight needs at least 2 dims (channels x values), got shape {tuple(w.shape)}")
    ax_ = axis % w.dim()
    reduce = [d for d in range(w.dim()) if d != ax_]
    amax_t = w.abs().max()
    amax_c = w.abs().amax(dim=reduce, keepdim=True)
    sq_t = (tq.fake_tensor_quant(w, amax_t, num_bits) - w).double() ** 2
    sq_c = (tq.fake_tensor_quant(w, amax_c, num_bits) - w).double() ** 2
    return sq_t.mean(dim=reduce).numpy(), sq_c.mean(dim=reduce).numpy()


def plot_per_channel_error(weight, num_bits: int = 8, axis: int = 0, name: str = "weight",
                           dpi: int = 90):
    """Bar plot of the error per output channel, per-tensor vs per-channel (lesson 1).

    Bars ``gid`` "per-tensor" and "per-channel" have the heights from
    :func:`per_channel_errors`; the y axis is logarithmic.
    """
    plt = _plt()
    e_t, e_c = per_channel_errors(weight, num_bits, axis)
    k = np.arange(len(e_t))
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=dpi)
    ax.bar(k - 0.2, e_t, width=0.4, color="tab:orange", label=f"per-tensor (mean {e_t.mean():.3g})",
           gid="per-tensor")
    ax.bar(k + 0.2, e_c, width=0.4, color="tab:blue", label=f"per-channel (mean {e_c.mean():.3g})",
           gid="per-channel")
    ax.set_yscale("log")
    ax.set_xlabel("output channel")
    ax.set_ylabel("MSE within the channel")
    ax.set_title(f"{name}: {num_bits}-bit quantization error per output channel", fontsize=10)
    ax.set_xlim(-0.7, len(k) - 0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_accuracy_vs_bits(bits: Sequence[int], curves: Mapping[str, Sequence[float]],
                          fp32: Optional[float] = None, title: str = "accuracy vs weight bits",
                          dpi: int = 90):
    """Accuracy (fraction, 0..1) against bit width, one line per setting (lessons 1, 2).

    Args:
        bits: the bit widths on the x axis.
        curves: ``{label: [accuracy for each bit width]}``; each line has ``gid=label``.
        fp32: the float model's accuracy, drawn as a dashed line (``gid="fp32"``).
    """
    plt = _plt()
    bits = list(bits)
    fig, ax = plt.subplots(figsize=(6, 3.3), dpi=dpi)
    for (label, acc), marker in zip(curves.items(), "osd^v<>"):
        acc = list(acc)
        if len(acc) != len(bits):
            raise ValueError(f"curve {label!r} has {len(acc)} values for {len(bits)} bit widths")
        ax.plot(bits, [100 * a for a in acc], marker=marker, label=label, gid=label)
    if fp32 is not None:
        ax.axhline(100 * fp32, color="0.3", ls="--", lw=1, label=f"FP32 ({100 * fp32:.1f}%)", gid="fp32")
    ax.set_xticks(bits)
    ax.set_xlabel("bits")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_ste(amax: float = 1.0, num_bits: int = 3, x=None, dpi: int = 90):
    """Forward staircase, straight-through gradient and PACT amax gradient (lesson 2).

    All three curves come from :func:`~qcourse.tensor_quant.learnable_fake_tensor_quant`
    (the forward of ``fake_tensor_quant`` plus PACT for a learnable amax) and autograd:
    ``x`` (default 601 points over +-1.5 amax) requires grad, and so does an amax broadcast
    to ``x``'s shape, so one backward of ``y.sum()`` gives each element's ``dy/dx`` (the STE:
    1 inside the range, 0 where clipped) and ``dy/damax`` (PACT: 0 inside, ``sign(x)`` where
    clipped). Lines ``gid``: "forward", "grad-x", "grad-amax".
    """
    plt = _plt()
    if x is None:
        x = torch.linspace(-1.5 * amax, 1.5 * amax, 601)
    x = torch.as_tensor(x, dtype=torch.float32).detach().flatten().sort().values.requires_grad_(True)
    a = torch.full_like(x, float(amax)).requires_grad_(True)
    y = tq.learnable_fake_tensor_quant(x, a, num_bits)
    y.sum().backward()
    xn, yn = x.detach().numpy(), y.detach().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.9), dpi=dpi)
    axes[0].plot(xn, xn, color="0.6", ls="--", lw=1, label="y = x")
    axes[0].plot(xn, yn, color="tab:blue", lw=1.5, label="fake quant", gid="forward")
    axes[0].set_title(f"forward: {num_bits}-bit staircase", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(xn, x.grad.numpy(), color="tab:green", lw=1.5, label="STE gradient", gid="grad-x")
    axes[1].plot(xn, np.zeros_like(xn), color="0.6", ls=":", lw=1, label="true slope (a.e.)")
    axes[1].set_title("backward: dy/dx (straight-through, clipped)", fontsize=9)
    axes[1].set_ylim(-0.2, 1.3)
    axes[1].legend(fontsize=7, loc="upper right")
    axes[2].plot(xn, a.grad.numpy(), color="tab:red", lw=1.5, gid="grad-amax")
    axes[2].set_title("backward: dy/d amax (PACT)", fontsize=9)
    axes[2].set_ylim(-1.3, 1.3)
    for ax in axes:
        ax.axvline(-amax, color="tab:orange", lw=0.8, ls=":")
        ax.axvline(amax, color="tab:orange", lw=0.8, ls=":")
        ax.set_xlabel("x", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
