"""Figures for lesson 7 (QAT): the loss curves, FP32 / PTQ / QAT per setting, and the weights QAT moved.

As the other plot modules: each function draws with matplotlib and returns the ``Figure``; the
numbers come from :mod:`qcourse.qat` / :mod:`qcourse.yolo.qat` and are passed in.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_loss_curves", "plot_qat_table", "plot_boundary_flips", "boundary_distance"]

_DPI = 90
#: one color per row of the FP32 / PTQ / QAT table, the same in every figure of the lesson
ROW_COLORS = {"fp32": "0.55", "ptq": "C3", "qat": "C2"}


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(curves: Mapping[str, Sequence[float]], title: str = "QAT loss per optimizer step",
                     smooth: int = 5):
    """One panel per curve (``{label: per-step losses}``): the losses, and their running mean over ``smooth`` steps.

    Each curve gets its own panel because the losses have different units (a sum of
    feature-map MSEs vs the YOLO loss); what matters is each one's trend.
    """
    if not curves:
        raise ValueError("no loss curve to plot: pass {label: [loss per step, ...]}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 steps, got {smooth}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.0), dpi=_DPI, squeeze=False)
    for i, (ax, (label, losses)) in enumerate(zip(axes[0], curves.items())):
        y = np.asarray(losses, dtype=float)
        if y.size == 0:
            raise ValueError(f"curve {label!r} has no step")
        x = np.arange(1, y.size + 1)
        ax.plot(x, y, color=f"C{i}", alpha=0.35, lw=1, label="per step")
        k = min(smooth, y.size)
        mean = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], mean, color=f"C{i}", lw=2, label=f"mean of {k}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_qat_table(settings: Mapping[str, Mapping[str, float]], title: str = "FP32 / PTQ / QAT, mAP@0.5:0.95"):
    """Grouped bars: one group per setting (``{"W8A8": {"fp32": m, "ptq": m, "qat": m}, ...}``).

    The value is printed on every bar; within a group the share of the PTQ loss that QAT won
    back is written above the group when PTQ lost something.
    """
    if not settings:
        raise ValueError("no setting to plot: pass {setting: {'fp32': mAP, 'ptq': mAP, 'qat': mAP}}")
    rows = ("fp32", "ptq", "qat")
    for name, r in settings.items():
        missing = [k for k in rows if k not in r]
        if missing:
            raise ValueError(f"setting {name!r} lacks {', '.join(missing)}; give fp32, ptq and qat mAP")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(settings), 3.4), dpi=_DPI)
    width, x = 0.26, np.arange(len(settings))
    for j, row in enumerate(rows):
        values = [settings[s][row] for s in settings]
        bars = ax.bar(x + (j - 1) * width, values, width, color=ROW_COLORS[row], label=row.upper())
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    top = max(max(r[k] for k in rows) for r in settings.values())
    for i, r in enumerate(settings.values()):
        lost = r["fp32"] - r["ptq"]
        if lost > 0:
            ax.text(i, top + 0.03, f"QAT won back {100 * (r['qat'] - r['ptq']) / lost:.0f} %", ha="center",
                    fontsize=8)
    low = min(min(r[k] for k in rows) for r in settings.values())
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, top + 0.08))
    ax.set_xticks(x, list(settings))
    ax.set_ylabel("mAP@0.5:0.95")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def boundary_distance(w, scale) -> np.ndarray:
    """How far each weight sits from the nearest rounding boundary, in quantization steps (0 .. 0.5).

    ``w / scale`` lands between two codes; the boundary between them is at ``k + 0.5``. A weight
    at distance 0 sits on the boundary (the smallest push flips its code); at 0.5 it sits on a
    code. ``scale`` broadcasts against ``w`` (one per output channel for per-channel weights).
    """
    u = np.asarray(w, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    return np.abs(np.abs(u - np.floor(u)) - 0.5)


def plot_boundary_flips(distance: Sequence[float], flipped: Sequence[bool], title: str, bins: int = 25):
    """Where the weights QAT moved to another code sat before QAT: distance to the rounding boundary.

    Two normalized histograms of :func:`boundary_distance` (all weights vs the ones whose code
    changed): if the STE moves weights by small steps, the flips crowd near distance 0.
    """
    d = np.asarray(distance, dtype=float).ravel()
    f = np.asarray(flipped, dtype=bool).ravel()
    if d.shape != f.shape:
        raise ValueError(f"distance has {d.size} weights but flipped has {f.size}; pass one flag per weight")
    if not f.any():
        raise ValueError("no weight changed code: nothing to compare (train longer, or pick another layer)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=_DPI)
    edges = np.linspace(0, 0.5, bins + 1)
    ax.hist(d, bins=edges, density=True, color="0.6", alpha=0.7, label=f"all weights ({d.size})")
    ax.hist(d[f], bins=edges, density=True, histtype="step", lw=2, color="C2",
            label=f"changed code during QAT ({int(f.sum())})")
    ax.set_xlabel("distance to the rounding boundary before QAT (steps)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
