"""Figures for lesson 5 (YOLOv7 PTQ): mAP per method, per-layer ranges, the tied quantizer groups.

As the other plot modules: each function draws with matplotlib and returns the ``Figure``; the
numbers come from :mod:`qcourse.ptq` / :mod:`qcourse.yolo.ptq` and are passed in.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import numpy as np

from qcourse.course.plots.calibration import METHOD_COLORS

__all__ = ["plot_map_bars", "plot_layer_ranges", "plot_tied_groups"]

_DPI = 90


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_map_bars(maps: Mapping[str, float], fp32: float, title: str = "mAP@0.5:0.95 per model"):
    """One bar per model (``{label: mAP}``), a dashed line at the FP32 mAP, values on the bars."""
    plt = _plt()
    labels = list(maps)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.4), dpi=_DPI)
    colors = [METHOD_COLORS.get(lbl.split()[-1], f"C{4 + i}") for i, lbl in enumerate(labels)]
    bars = ax.bar(range(len(labels)), [maps[k] for k in labels], color=colors)
    ax.axhline(fp32, color="k", ls="--", lw=1, label=f"FP32 {fp32:.4f}")
    for b, lbl in zip(bars, labels):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{maps[lbl]:.4f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    low = min(min(maps.values()), fp32)
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(max(maps.values()), fp32) + 0.05))
    ax.set_ylabel("mAP@0.5:0.95")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_layer_ranges(series: Mapping[str, Sequence[float]], layers: Sequence[str], title: str,
                      ylabel: str = "|x|", logy: bool = True, marks: Optional[Mapping[str, str]] = None):
    """Per-layer values (``{label: one value per layer}``) as lines over the layer names.

    Used for activation ranges (max vs percentile |x|, each calibration's amax) and weight
    ranges (largest vs median channel amax). ``marks``: ``{label: matplotlib marker}``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=_DPI)
    x = np.arange(len(layers))
    for i, (label, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        if len(values) != len(layers):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(layers)} layers")
        ax.plot(x, values, marker=(marks or {}).get(label, "o"), ms=3, lw=1, label=label, color=f"C{i}")
    short = [re.sub(r"^model\.", "", n).replace(".conv", "") for n in layers]
    step = max(1, len(layers) // 40)
    ax.set_xticks(x[::step], short[::step], rotation=90, fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("layer (model.N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _layer_index(name: str) -> float:
    m = re.match(r"model\.(\d+)", name)
    return float(m.group(1)) if m else float("nan")


def plot_tied_groups(groups: Mapping[str, Sequence[str]], n_layers: int,
                     title: str = "input quantizers tied by TensorRT's placement rules"):
    """The tied groups on the layer axis: one row per group, its major as a star, the tied as dots.

    Layers are placed by their index ``model.N``, so a group that spans the network (a route
    read by the neck, like model.16 <- model.50) shows as a long line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(groups) + 1.4), dpi=_DPI)
    for row, (major, tied) in enumerate(groups.items()):
        xs = [_layer_index(n) for n in tied]
        xm = _layer_index(major)
        ax.plot([min(xs + [xm]), max(xs + [xm])], [row, row], color="0.7", lw=1, zorder=1)
        ax.scatter(xs, [row] * len(xs), color="C0", s=18, zorder=2, label="tied" if row == 0 else None)
        ax.scatter([xm], [row], color="C3", marker="*", s=90, zorder=3, label="major" if row == 0 else None)
        ax.text(n_layers + 0.5, row, f"{major.replace('.conv', '')} <- "
                + ", ".join(re.sub(r"^model\.", "", t).replace(".conv", "") for t in tied), va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(-1, n_layers * 1.45)
    ax.set_xlabel("layer index N of model.N")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig
