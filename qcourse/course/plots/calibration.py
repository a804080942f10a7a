"""Figures for lessons 3-4: per-channel amax, activation histograms with each calibrator's
amax, the entropy/MSE search curves, and method-by-method comparisons.

Every function draws with matplotlib and returns the ``Figure`` (the notebooks display it;
tests inspect its artists). Inputs are plain numbers, arrays or tensors: the helpers compute
nothing about quantization themselves — the notebook gets the numbers from ``qcourse.calib``
and ``qcourse.workflow`` and passes them in.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from qcourse.calib import check_histogram

__all__ = [
    "METHOD_COLORS",
    "plot_per_channel_amax",
    "plot_histogram_with_amax",
    "plot_activation_histograms",
    "plot_amax_search",
    "plot_method_comparison",
]

#: One colour per calibration method, shared by every figure of lesson 4.
METHOD_COLORS = {"max": "C3", "entropy": "C0", "mse": "C2", "percentile": "C1"}
_DPI = 90


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _color(label: str, i: int) -> str:
    return METHOD_COLORS.get(str(label).split()[0].lower(), f"C{(i + 4) % 10}")


def _as_1d(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_hist(hist, bin_edges, name: str = "hist") -> Tuple[np.ndarray, np.ndarray]:
    """The calibrators' histogram checks, with float counts for drawing."""
    h, e = check_histogram(hist, bin_edges, name=name)
    return h.astype(np.float64), e


def _check_amaxes(amaxes, where: str) -> dict:
    if amaxes is None:
        return {}
    if not isinstance(amaxes, Mapping):
        raise TypeError(f"{where} must map a label to an amax, e.g. {{'max': 2.3}}, got "
                        f"{type(amaxes).__name__}")
    out = {}
    for label, v in amaxes.items():
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"amax for {label!r} must be finite and >= 0, got {v}")
        out[str(label)] = v
    return out


def _draw_histogram(ax, h, e, amaxes, log: bool, title: Optional[str], legend: bool):
    from matplotlib.patches import StepPatch

    # One StepPatch (fill + outline: the outline keeps one-bin spikes visible), added without
    # the per-vertex data-limit and layout bookkeeping of ax.stairs: with 2048+ bins that
    # bookkeeping took seconds per panel. The limits are set from the data directly.
    patch = StepPatch(h, e, baseline=0, fill=True, facecolor="0.72", edgecolor="0.3", lw=0.7,
                      label="|x| histogram")
    patch.set_in_layout(False)
    ax.add_artist(patch)
    right = max(e[-1], max(amaxes.values(), default=e[-1]))
    pad = 0.02 * (right - e[0]) if right > e[0] else 1.0
    ax.set_xlim(e[0] - pad, right + pad)
    positive = h[h > 0]
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.5, positive.max() * 2 if len(positive) else 1.0)
    else:
        ax.set_ylim(0, positive.max() * 1.05 if len(positive) else 1.0)
    for i, (label, a) in enumerate(amaxes.items()):
        ax.axvline(a, color=_color(label, i), lw=1.6, ls=("-", "--", "-.", ":")[i % 4],
                   label=f"{label}: {a:.4g}")
    ax.set_xlabel("|x|")
    ax.set_ylabel("count (log)" if log else "count")
    if title:
        ax.set_title(title, fontsize=10)
    if legend and (amaxes or ax.get_legend_handles_labels()[0]):
        ax.legend(fontsize=8, loc="upper right")


def plot_per_channel_amax(amax, per_tensor: Optional[float] = None, title: Optional[str] = None,
                          figsize=(7, 2.8)):
    """Bar chart of a per-channel amax (one bar per output channel), lesson 3.

    Args:
        amax: per-channel amax, any shape with one entry per channel (e.g. ``(C,1,1,1)``).
        per_tensor: the single amax a per-tensor quantizer would use (drawn as a line);
            default ``max(amax)``.
    """
    a = np.asarray(amax.detach().cpu().numpy() if hasattr(amax, "detach") else amax,
                   dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("amax is empty")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"amax must be finite and >= 0, got min {a.min()}")
    pt = float(a.max()) if per_tensor is None else float(per_tensor)
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize, dpi=_DPI)
    ax.bar(np.arange(a.size), a, color="C0", label="per-channel amax")
    ax.axhline(pt, color="C3", ls="--", label=f"per-tensor amax {pt:.4g}")
    ax.set_xlabel("output channel")
    ax.set_ylabel("amax")
    ax.set_xlim(-0.7, a.size - 0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_histogram_with_amax(hist, bin_edges, amaxes: Optional[Mapping[str, float]] = None,
                             title: Optional[str] = None, log: bool = True, figsize=(7, 3)):
    """One histogram of ``|x|`` with a vertical line per calibration method's amax (lesson 4).

    Args:
        hist, bin_edges: counts and ``len(hist) + 1`` edges, e.g. a HistogramCalibrator's
            ``histogram`` and ``bin_edges``.
        amaxes: ``{label: amax}``, e.g. ``{"max": 10.2, "entropy": 9.1}``; a label that
            starts with a method name gets that method's colour (:data:`METHOD_COLORS`).
        log: log-scale counts (the tail of an activation histogram is invisible otherwise).
    """
    h, e = _check_hist(hist, bin_edges)
    am = _check_amaxes(amaxes, "amaxes")
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize, dpi=_DPI)
    _draw_histogram(ax, h, e, am, log, title, legend=True)
    fig.tight_layout()
    return fig


def plot_activation_histograms(histograms: Mapping[str, Tuple[Sequence, Sequence]],
                               amaxes: Optional[Mapping[str, Mapping[str, float]]] = None,
                               ncols: int = 3, log: bool = True, panel_size=(3.3, 2.4)):
    """A grid of histograms, one panel per quantizer, each with its methods' amax (lesson 4).

    Args:
        histograms: ``{quantizer name: (hist, bin_edges)}`` in display order.
        amaxes: ``{quantizer name: {method: amax}}``; names missing here get no lines.
        ncols: panels per row. The figure is at most 10 inches wide.
    """
    if not isinstance(histograms, Mapping) or not histograms:
        raise ValueError("histograms must be a non-empty mapping {name: (hist, bin_edges)}")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    amaxes = amaxes or {}
    unknown = set(amaxes) - set(histograms)
    if unknown:
        raise ValueError(f"amaxes has names without a histogram: {sorted(unknown)}")
    checked = {}
    for name, pair in histograms.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"histograms[{name!r}] must be a (hist, bin_edges) pair")
        checked[name] = (*_check_hist(pair[0], pair[1], f"histograms[{name!r}]"),
                         _check_amaxes(amaxes.get(name), f"amaxes[{name!r}]"))
    n = len(checked)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    w = min(10.0, panel_size[0] * ncols)
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, panel_size[1] * nrows), dpi=_DPI, squeeze=False)
    flat = axes.ravel()
    for ax, (name, (h, e, am)) in zip(flat, checked.items()):
        _draw_histogram(ax, h, e, am, log, name, legend=False)
        ax.tick_params(labelsize=8)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    for ax in flat[n:]:
        ax.axis("off")
    # one legend for the figure: the method lines (same labels in every panel)
    handles, labels = [], []
    for ax in flat[:n]:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            key = lb.split(":")[0]
            if key not in labels:
                handles.append(hd)
                labels.append(key)
    legend_h = 0.35 / fig.get_size_inches()[1] if handles else 0.0   # ~0.35 inch for the legend row
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    # fixed margins (in inches, converted): tight_layout costs seconds on log axes with many bins
    wi, hi = fig.get_size_inches()
    fig.subplots_adjust(left=0.6 / wi, right=1 - 0.15 / wi, top=1 - 0.3 / hi,
                        bottom=legend_h + 0.45 / hi, wspace=0.35, hspace=0.75 if nrows > 1 else 0.2)
    return fig


def plot_amax_search(curves: Mapping[str, Tuple[Sequence, Sequence]],
                     chosen: Optional[Mapping[str, float]] = None, title: Optional[str] = None,
                     logy: bool = False, panel_size=(4.5, 2.8)):
    """The search curves of the histogram methods: a score per candidate amax (lesson 4).

    Args:
        curves: ``{label: (amax_candidates, score)}``, e.g. ``{"entropy (KL)":
            calib.kl_divergences(h, e), "mse": calib.mse_errors(h, e)}``. Non-finite scores
            (the KL divergence is ``inf`` where a clipped tail lands in an empty bin) are
            left out of the line; their count goes in the legend.
        chosen: ``{label: amax}`` — the amax each method picked, drawn as a vertical line.
        logy: log-scale the score axis.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty mapping {label: (amax_candidates, score)}")
    chosen = _check_amaxes(chosen, "chosen")
    unknown = set(chosen) - set(curves)
    if unknown:
        raise ValueError(f"chosen has labels without a curve: {sorted(unknown)}")
    data = {}
    for label, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curves[{label!r}] must be an (amax_candidates, score) pair")
        x, y = _as_1d(pair[0], f"curves[{label!r}] candidates"), _as_1d(pair[1], f"curves[{label!r}] score")
        if len(x) != len(y):
            raise ValueError(f"curves[{label!r}]: {len(x)} candidates but {len(y)} scores")
        ok = np.isfinite(y)
        if not ok.any():
            raise ValueError(f"curves[{label!r}] has no finite score to draw")
        data[label] = (x, y, ok)
    n = len(data)
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(min(10.0, panel_size[0] * n), panel_size[1]), dpi=_DPI,
                             squeeze=False)
    for i, (ax, (label, (x, y, ok))) in enumerate(zip(axes[0], data.items())):
        dropped = int((~ok).sum())
        line_label = label + (f" ({dropped} inf left out)" if dropped else "")
        sparse = int(ok.sum()) <= 50          # few finite points: mark them, the line alone misleads
        ax.plot(x[ok], y[ok], color=_color(label, i), lw=1.2, label=line_label,
                marker="o" if sparse else None, ms=3)
        if label in chosen:
            ax.axvline(chosen[label], color="k", ls="--", lw=1, label=f"chosen amax {chosen[label]:.4g}")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("candidate amax")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_method_comparison(results: Mapping[str, Mapping[str, float]], reference: Optional[float] = None,
                           reference_label: str = "float", ylabel: str = "test accuracy",
                           title: Optional[str] = None, ylim: Optional[Tuple[float, float]] = None,
                           figsize=(8, 3)):
    """Grouped bars: one group per setting (e.g. ``"8 bit"``), one bar per method (lesson 4).

    Args:
        results: ``{group: {method: value}}``; every group must have the same methods.
        reference: a value to draw as a dashed line (e.g. the float model's accuracy).
        ylim: y range; default from 0 to a little above the largest value.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping {group: {method: value}}")
    groups = list(results)
    methods = list(results[groups[0]])
    if not methods:
        raise ValueError(f"results[{groups[0]!r}] has no methods")
    for g in groups:
        if set(results[g]) != set(methods):
            raise ValueError(f"every group needs the same methods: {groups[0]!r} has {methods}, "
                             f"{g!r} has {list(results[g])}")
    vals = np.array([[float(results[g][m]) for m in methods] for g in groups])
    if not np.isfinite(vals).all():
        raise ValueError("results must be finite numbers")
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize, dpi=_DPI)
    width = 0.8 / len(methods)
    xs = np.arange(len(groups))
    for i, m in enumerate(methods):
        bars = ax.bar(xs + (i - (len(methods) - 1) / 2) * width, vals[:, i], width,
                      color=_color(m, i), label=m)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    if reference is not None:
        ax.axhline(float(reference), color="k", ls="--", lw=1, label=f"{reference_label} {float(reference):.3g}")
    ax.set_xticks(xs, groups)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        top = max(vals.max(), reference if reference is not None else -np.inf)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
