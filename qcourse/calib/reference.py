"""Lesson 4 — the reference algorithms, written plainly: slow on purpose.

The histogram calibration methods exactly as the test oracles, lesson 4 and
``benchmarks/bench_entropy.py`` use them (one copy for all three).

These follow pytorch_quantization 2.1's ``calib/histogram.py`` step by step — one
candidate at a time, Python loops over the bins — with two deliberate differences:
the input histogram is not modified, and the mse sums are float64 (the reference's
float32 sums saturate). They are slow on purpose: ``qcourse.calib`` must return the
same amax (``tests/test_calib.py``), and lesson 4 and ``benchmarks/bench_entropy.py``
time the entropy loop against it.
"""
from collections import Counter

import numpy as np
import torch
from scipy.stats import entropy

from qcourse.tensor_quant import fake_tensor_quant


def ref_amax_entropy(hist, bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """KL-divergence search, candidate by candidate; returns ``bin_edges[i_best]`` (float)."""
    bins = np.array(hist, dtype=np.int64)       # a copy: the reference mutates its input
    bins[0] = bins[1]
    total = int(bins.sum())
    nbins = 1 << (num_bits - 1 + int(unsigned))
    divergences = []
    candidates = []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        group_of = np.digitize(range(i), space) - 1
        group_of[bins[:i] == 0] = -1
        # mass of each quantized level, spread evenly over its nonzero source bins
        level_mass = np.zeros(nbins, dtype=np.float64)
        for j, g in enumerate(group_of):
            if g != -1:
                level_mass[g] += bins[j]
        members = Counter(group_of)
        for g, count in members.items():
            if g != -1:
                level_mass[g] = level_mass[g] / count
        q = np.zeros(i, dtype=np.float64)
        for j, g in enumerate(group_of):
            if g != -1:
                q[j] = level_mass[g]
        p = np.array(bins[:i])
        p[-1] += bins[i:].sum()
        assert round(q.sum() + bins[i:].sum()) == total and int(p.sum()) == total
        divergences.append(entropy(p, q))
        candidates.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(bin_edges[candidates[last_argmin]])


def ref_amax_mse(hist, bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """Bin-centre MSE search with qcourse's ``fake_tensor_quant``; first minimiser wins."""
    counts = np.asarray(hist, dtype=np.float64)
    edges32 = np.asarray(bin_edges, dtype=np.float64).astype(np.float32)
    centers = (edges32[1:] + edges32[:-1]) / 2
    c64 = centers.astype(np.float64)
    c_t = torch.from_numpy(centers)
    mses = []
    candidates = []
    for i in range(start_bin, len(centers), stride):
        amax = torch.tensor(centers[i])
        quant = fake_tensor_quant(c_t, amax, num_bits, unsigned).numpy()
        mses.append(np.mean((quant.astype(np.float64) - c64) ** 2 * counts))
        candidates.append(i)
    best = int(np.argmin(mses))
    return float(centers[candidates[best]])


def ref_amax_percentile(hist, bin_edges, percentile=99.99):
    """``bin_edges[searchsorted(cumsum(hist / total), percentile / 100)]``."""
    hist = np.asarray(hist)
    cdf = np.cumsum(hist / hist.sum())
    return float(bin_edges[np.searchsorted(cdf, percentile / 100)])


def ref_histogram(values, bin_edges):
    """Exact int64 counts of ``|values|`` in ``bin_edges`` (numpy's own histogram)."""
    counts, _ = np.histogram(np.abs(np.asarray(values, dtype=np.float64)), bins=bin_edges)
    return counts.astype(np.int64)
