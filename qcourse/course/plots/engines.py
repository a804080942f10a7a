"""Figures for lesson 8: latency, throughput and mAP of each engine, side by side.

Inputs are the dicts :func:`qcourse.engines.bench.benchmark` returns (``{engine: {batch:
summary}}``) and ``{engine: mAP}``; the helper computes nothing itself.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

__all__ = ["plot_engine_benchmark"]

_DPI = 90


def plot_engine_benchmark(results: Mapping[str, Mapping[int, Mapping[str, float]]],
                          maps: Optional[Mapping[str, float]] = None, title: str = ""):
    """Median latency per image (p90 as a whisker) per batch size, and mAP, per engine.

    Latency per *image* puts batch sizes on one axis: batching pays off where its bar is
    lower. Returns the ``Figure``.
    """
    import matplotlib.pyplot as plt

    names = list(results)
    if not names:
        raise ValueError("results is empty; pass qcourse.engines.bench.benchmark's output")
    batches = sorted({b for r in results.values() for b in r})
    panels = 2 if maps else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.4), dpi=_DPI, squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(batches)
    x = np.arange(len(names))
    for k, b in enumerate(batches):
        med = [results[n][b]["latency_ms_median"] / b if b in results[n] else np.nan for n in names]
        p90 = [results[n][b]["latency_ms_p90"] / b if b in results[n] else np.nan for n in names]
        err = np.clip(np.array(p90) - np.array(med), 0, None)
        ax.bar(x + (k - (len(batches) - 1) / 2) * width, med, width, yerr=[np.zeros_like(err), err],
               capsize=3, label=f"batch {b}", color=f"C{k}")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("ms per image (median; bar to p90)")
    ax.legend(frameon=False)
    ax.set_title("latency")
    if maps:
        ax2 = axes[0, 1]
        keys = [n for n in maps]
        ax2.barh(np.arange(len(keys)), [maps[k] for k in keys], color="C2")
        for i, k in enumerate(keys):
            ax2.text(maps[k], i, f" {maps[k]:.4f}", va="center", fontsize=8)
        ax2.set_yticks(np.arange(len(keys)), keys)
        ax2.set_xlim(0, max(1e-6, max(maps.values())) * 1.25)
        ax2.set_xlabel("mAP@0.5:0.95 (val)")
        ax2.set_title("accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
