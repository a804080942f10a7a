"""Figures for lesson 6 (sensitivity analysis): drops by layer, the proxy against the drops, mAP vs k.

As the other plot modules: each function draws with matplotlib and returns the ``Figure``; the
numbers come from :mod:`qcourse.sensitivity` / :mod:`qcourse.yolo.sensitivity` and are passed in.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["plot_sensitivity_drops", "plot_proxy_vs_drop", "plot_map_vs_k", "plot_sensitivity_summary"]

_DPI = 90


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _check_rows(rows: Sequence[Mapping], keys: Sequence[str], what: str) -> None:
    if not rows:
        raise ValueError(f"{what}: no rows to draw; run the sensitivity scan first")
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}: a row has no {missing[0]!r} (got keys {sorted(row)}); pass the "
                             "rows of sensitivity.json's 'layers' or results.json's 'map_vs_k'")


def _draw_drops(ax, layers: Sequence[Mapping], top: int) -> None:
    """Bars in model order; the ``top`` largest drops in red with their rank above the bar."""
    drops = np.array([float(r["drop"]) for r in layers])
    order = np.argsort(-drops, kind="stable")[:top]
    colors = np.array(["C0"] * len(layers), dtype=object)
    colors[order] = "C3"
    ax.bar(range(len(layers)), drops, color=list(colors))
    for rank, i in enumerate(order, 1):
        ax.text(i, drops[i], str(rank), ha="center", va="bottom" if drops[i] >= 0 else "top", fontsize=7)
    ax.axhline(0.0, color="k", lw=0.8)
    names = [str(r["layer"]).replace("model.", "") for r in layers]  # "37" reads better than "model.37"
    ax.set_xticks(range(len(layers)), names, rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_xlabel("layer (model.N), in model order")
    ax.set_ylabel("mAP gained with the layer in float")


def plot_sensitivity_drops(layers: Sequence[Mapping], top: int = 10, title: Optional[str] = None):
    """One bar per scanned layer (``[{"layer", "drop"}, ...]`` in model order): mAP it gives back in float.

    The ``top`` most sensitive layers are red and numbered by rank.
    """
    _check_rows(layers, ("layer", "drop"), "plot_sensitivity_drops")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(layers) + 1.5), 3.6), dpi=_DPI)
    _draw_drops(ax, layers, top)
    ax.set_title(title or f"Sensitivity: mAP recovered by leaving one layer in float (top {top} in red)")
    fig.tight_layout()
    return fig


def plot_proxy_vs_drop(layers: Sequence[Mapping], sqnr_db: Mapping[str, Optional[float]], label_top: int = 5,
                       rho: Optional[float] = None):
    """Each layer's proxy SQNR (dB, x) against its measured mAP drop (y); the ``label_top`` largest drops named."""
    _check_rows(layers, ("layer", "drop"), "plot_proxy_vs_drop")
    rows = [r for r in layers if sqnr_db.get(r["layer"]) is not None]
    if not rows:
        raise ValueError("plot_proxy_vs_drop: no layer has both a drop and an SQNR; pass proxy_sqnr's result")
    plt = _plt()
    x = np.array([float(sqnr_db[r["layer"]]) for r in rows])
    y = np.array([float(r["drop"]) for r in rows])
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=_DPI)
    ax.scatter(x, y, s=18, color="C0")
    for i in np.argsort(-y, kind="stable")[:label_top]:
        ax.annotate(str(rows[i]["layer"]), (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("proxy: SQNR of the layer's output with only it quantized (dB)")
    ax.set_ylabel("mAP gained with the layer in float")
    note = "" if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f" (Spearman rho {rho:.2f})"
    ax.set_title("Label-free proxy vs measured sensitivity" + note)
    fig.tight_layout()
    return fig


def _draw_map_vs_k(ax, rows: Sequence[Mapping], fp32: Optional[float]) -> None:
    k = [int(r["k"]) for r in rows]
    maps = [float(r["map"]) for r in rows]
    ax.plot(k, maps, "o-", color="C2", label="INT8, top-k layers in float")
    for ki, m, r in zip(k, maps, rows):
        ax.annotate(f"{m:.4f}\n{r['int8_layers']} INT8", (ki, m), fontsize=7, ha="center",
                    xytext=(0, 6), textcoords="offset points")
    if fp32 is not None:
        ax.axhline(float(fp32), color="k", ls="--", lw=1, label=f"FP32 {float(fp32):.4f}")
    ax.set_xticks(k)
    ax.margins(x=0.12, y=0.35)  # room for the labels above the points
    ax.set_xlabel("k: most sensitive layers left in float")
    ax.set_ylabel("mAP@0.5:0.95")
    ax.legend(fontsize=8, loc="lower right")


def plot_map_vs_k(rows: Sequence[Mapping], fp32: Optional[float] = None):
    """mAP against k (``[{"k", "map", "int8_layers"}, ...]``), each point labelled with its INT8 layer count."""
    _check_rows(rows, ("k", "map", "int8_layers"), "plot_map_vs_k")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=_DPI)
    _draw_map_vs_k(ax, rows, fp32)
    ax.set_title("Re-quantized with the top-k layers in float")
    fig.tight_layout()
    return fig


def plot_sensitivity_summary(layers: Sequence[Mapping], map_vs_k: Sequence[Mapping], fp32: Optional[float] = None,
                             top: int = 10):
    """The two panels ``qcourse sensitivity`` saves as its PNG: drops by layer, then mAP vs k."""
    _check_rows(layers, ("layer", "drop"), "plot_sensitivity_summary")
    _check_rows(map_vs_k, ("k", "map", "int8_layers"), "plot_sensitivity_summary")
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9.0, 0.16 * len(layers) + 5.5), 3.8), dpi=_DPI,
                               gridspec_kw={"width_ratios": [3, 1]})
    _draw_drops(a, layers, top)
    a.set_title(f"mAP recovered by leaving one layer in float (top {top} in red)")
    _draw_map_vs_k(b, map_vs_k, fp32)
    b.set_title("top-k layers in float")
    fig.tight_layout()
    return fig
