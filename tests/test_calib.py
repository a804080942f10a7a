"""Tests of qcourse.calib (lesson 4) against numpy and the plain reference algorithms."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcourse import calib
from qcourse.calib import histogram as H
from qcourse.tensor_quant import QuantDescriptor

from qcourse.calib.reference import (
    ref_amax_entropy,
    ref_amax_mse,
    ref_amax_percentile,
    ref_histogram,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------
# realistic |activation| samples
# ----------------------------------------------------------------------------------------
def samples(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "halfnormal":
        return np.abs(rng.standard_normal(n))
    if kind == "relu":                     # ReLU'd Gaussian: half the values are exact zeros
        return np.maximum(rng.normal(0.3, 1.0, n), 0.0)
    if kind == "heavy":                    # heavy tail: a few far outliers
        return np.abs(rng.standard_t(2.0, n))
    if kind == "sparse":                   # few samples: many empty bins
        return np.abs(rng.standard_normal(max(50, n // 2000)))
    if kind == "longtail":                 # bulk near 0 plus one far outlier: long empty tail
        x = np.abs(rng.standard_normal(n)) * 0.1
        x[0] = 10.0
        return x
    if kind == "bimodal":
        return np.abs(np.concatenate([rng.normal(0.5, 0.05, n // 2), rng.normal(3.0, 0.3, n - n // 2)]))
    raise ValueError(kind)


KINDS = ["halfnormal", "relu", "heavy", "sparse", "longtail", "bimodal"]


def histogram_of(kind, num_bins, seed, n=200_000):
    """Histogram via the calibrator, checked against np.histogram on the same edges."""
    x = samples(kind, n, np.random.default_rng(seed))
    cal = calib.HistogramCalibrator(8, None, False, num_bins=num_bins)
    cal.collect(torch.from_numpy(x.astype(np.float32)))
    return cal.histogram, cal.bin_edges


# ========================================================================================
# MaxCalibrator
# ========================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_max_per_tensor_matches_numpy(device):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * s for s in (1.0, 3.0, 0.5)]
    cal = calib.MaxCalibrator(8, None, False, track_amax=True)
    assert cal.compute_amax() is None
    for b in batches:
        cal.collect(torch.from_numpy(b).to(device))
    amax = cal.compute_amax()
    assert amax.dtype == torch.float32 and amax.shape == () and amax.device.type == device
    assert float(amax) == np.max(np.abs(np.stack(batches)))
    assert [float(a) for a in cal.amaxs] == [np.abs(b).max() for b in batches]
    cal.reset()
    assert cal.compute_amax() is None and cal.amaxs == []


@pytest.mark.parametrize("axis,keep", [(0, (0,)), (1, (1,)), (-1, (3,)), ((0, 2), (0, 2))])
def test_max_per_channel_matches_numpy(axis, keep):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((6, 4, 3, 5)).astype(np.float32) * rng.uniform(0.5, 2) for _ in range(3)]
    cal = calib.MaxCalibrator(8, axis, False)
    for b in batches:
        cal.collect(torch.from_numpy(b))
    reduce = tuple(d for d in range(4) if d not in keep)
    want = np.max(np.abs(np.stack(batches)), axis=(0,) + tuple(d + 1 for d in reduce))
    want = np.expand_dims(want, reduce)
    got = cal.compute_amax()
    assert tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def test_max_conv_weight_shape_and_repr():
    w = torch.randn(8, 3, 3, 3)
    cal = calib.MaxCalibrator(8, 0, False)
    cal.collect(w)
    assert cal.compute_amax().shape == (8, 1, 1, 1)
    torch.testing.assert_close(cal.compute_amax().flatten(), w.abs().amax(dim=(1, 2, 3)), rtol=0, atol=0)
    assert "MaxCalibrator(num_bits=8, axis=0" in repr(cal)


def test_max_errors():
    cal = calib.MaxCalibrator(8, 0, False)
    cal.collect(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channel shape"):
        cal.collect(torch.randn(5, 3))
    with pytest.raises(TypeError, match="takes no arguments.*'entropy'"):
        cal.compute_amax("entropy")
    with pytest.raises(TypeError, match="method='mse'"):
        cal.compute_amax(method="mse")
    with pytest.raises(ValueError, match="2 NaN and 4 inf"):
        cal.collect(torch.tensor([[1.0, float("nan"), float("inf")], [0.0, -float("inf"), 2.0]] * 2))
    with pytest.raises(ValueError, match="out of range"):
        calib.MaxCalibrator(8, 2, False).collect(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"negative value \(min -2"):
        calib.MaxCalibrator(8, None, True).collect(torch.tensor([1.0, -2.0]))
    with pytest.raises(AttributeError, match="track_amax=True"):
        calib.MaxCalibrator().amaxs
    with pytest.raises(TypeError, match="torch.Tensor"):
        calib.MaxCalibrator().collect([1.0, 2.0])
    with pytest.raises(ValueError, match="num_bits"):
        calib.MaxCalibrator(1)


# ========================================================================================
# HistogramCalibrator: collection
# ========================================================================================
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["halfnormal", "relu", "heavy"])
def test_counts_equal_numpy_histogram(device, kind):
    rng = np.random.default_rng(2)
    x = (samples(kind, 100_000, rng) * rng.choice([-1, 1], 100_000)).astype(np.float32)
    cal = calib.HistogramCalibrator(8, None, False, num_bins=300)
    cal.collect(torch.from_numpy(x).to(device))
    hist, edges = cal.histogram, cal.bin_edges
    assert hist.dtype == np.int64 and len(hist) == 300 and len(edges) == 301
    assert edges[0] == 0 and edges[-1] > np.abs(x).max() and edges[-2] <= np.abs(x).max()
    np.testing.assert_array_equal(hist, ref_histogram(x, edges))
    assert not hist.flags.writeable


@pytest.mark.parametrize("device", DEVICES)
def test_growth_keeps_bin_width_and_counts(device):
    rng = np.random.default_rng(3)
    batches = [np.abs(rng.standard_normal(20_000)).astype(np.float32) * s for s in (1.0, 0.5, 4.0, 2.0, 9.0)]
    cal = calib.HistogramCalibrator(8, None, False, num_bins=128)
    cal.collect(torch.from_numpy(batches[0]).to(device))
    width = cal.bin_width
    first_edges = cal.bin_edges.copy()
    sizes = [128]
    for b in batches[1:]:
        cal.collect(torch.from_numpy(b).to(device))
        sizes.append(len(cal.histogram))
    edges = cal.bin_edges
    assert cal.bin_width == width
    np.testing.assert_array_equal(edges[:129], first_edges)             # old bins untouched
    np.testing.assert_array_equal(edges, np.arange(len(edges)) * width)  # one width throughout
    assert sizes == sorted(sizes) and sizes[-1] > 4 * 128
    allx = np.concatenate(batches)
    assert edges[-1] > allx.max() >= edges[-2]
    assert int(cal.histogram.sum()) == allx.size
    np.testing.assert_array_equal(cal.histogram, ref_histogram(allx, edges))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top,num_bins", [(0.7, 300), (3.3e-5, 2048), (1234.5, 1000)])
def test_values_next_to_bin_edges_land_like_numpy(device, dtype, top, num_bins):
    # values one ulp either side of every edge, in the data's own precision: floor(x / width)
    # alone gets some of these wrong; the counts must still be numpy's for the same edges
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    first = np.array([top, top / 7], dtype=np_dtype)
    cal = calib.HistogramCalibrator(8, None, False, num_bins=num_bins)
    cal.collect(torch.from_numpy(first).to(device))
    edges = cal.bin_edges
    inner = edges[1:-1].astype(np_dtype)
    near = np.concatenate([np.nextafter(inner, np_dtype(0)), inner, np.nextafter(inner, np_dtype(np.inf))])
    near = np.concatenate([near[near <= first.max()], np.array([0.0, top], dtype=np_dtype)])
    cal.collect(torch.from_numpy(near).to(device))
    want = ref_histogram(np.concatenate([first, near]).astype(np.float64), edges)
    np.testing.assert_array_equal(cal.histogram, want)


def test_counts_exact_past_2_pow_24():
    # float32 counting (torch.histc) cannot go past 2**24 in one bin
    n = 2 ** 24 + 5
    x = torch.full((n + 1,), 0.3)
    x[-1] = 1.0
    cal = calib.HistogramCalibrator(8, None, False, num_bins=64)
    cal.collect(x)
    hist = cal.histogram
    k = int(np.searchsorted(cal.bin_edges, 0.3, side="right")) - 1
    assert hist[k] == n and hist[-1] == 1 and hist.sum() == n + 1
    del x


def test_skip_zeros_and_zero_only_batches():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.5])
    keep = calib.HistogramCalibrator(8, None, False, num_bins=4)
    skip = calib.HistogramCalibrator(8, None, False, num_bins=4, skip_zeros=True)
    for cal in (keep, skip):
        cal.collect(torch.zeros(10))        # only zeros: no range yet
        cal.collect(x)
    assert keep.histogram.tolist() == [3 + 10 + 1, 1, 0, 1]     # [0, .5), [.5, 1), [1, 1.5), [1.5, 2]
    assert skip.histogram.tolist() == [1, 1, 0, 1]
    only_zeros = calib.HistogramCalibrator(8, None, False, num_bins=4)
    only_zeros.collect(torch.zeros(7))
    assert only_zeros.histogram.tolist() == [7]
    for m in calib.METHODS:
        assert float(only_zeros.compute_amax(m, start_bin=1)) == 0.0


@pytest.mark.parametrize("axis", [0, 1, (0, 2)])
def test_per_channel_equals_channels_one_at_a_time(axis):
    rng = np.random.default_rng(4)
    scales = rng.uniform(0.1, 5.0, size=(5, 1, 1, 1)).astype(np.float32)
    batches = [rng.standard_normal((5, 4, 3, 30)).astype(np.float32) * scales * s for s in (1.0, 2.5, 0.7)]
    batches[1][2] = 0.0   # a channel-slice of exact zeros in one batch
    cal = calib.HistogramCalibrator(8, axis, False, num_bins=160, skip_zeros=False)
    for b in batches:
        cal.collect(torch.from_numpy(b))
    keep = (axis,) if isinstance(axis, int) else axis
    others = [d for d in range(4) if d not in keep]
    chans = [np.transpose(b, list(keep) + others).reshape(-1, np.prod([b.shape[d] for d in others]))
             for b in batches]
    amax = {m: cal.compute_amax(m, start_bin=100) for m in calib.METHODS}
    shape = tuple(b if d in keep else 1 for d, b in enumerate(batches[0].shape))
    for m in calib.METHODS:
        assert tuple(amax[m].shape) == shape
    for c in range(chans[0].shape[0]):
        one = calib.HistogramCalibrator(8, None, False, num_bins=160)
        for ch in chans:
            one.collect(torch.from_numpy(ch[c]))
        np.testing.assert_array_equal(cal.histogram[c], one.histogram)
        np.testing.assert_array_equal(cal.bin_edges[c], one.bin_edges)
        for m in calib.METHODS:
            assert amax[m].flatten()[c] == one.compute_amax(m, start_bin=100)


def test_histogram_input_dtypes():
    x = torch.rand(1000, dtype=torch.float64) * 3
    a = calib.HistogramCalibrator(8, None, False, num_bins=256)
    a.collect(x)
    np.testing.assert_array_equal(a.histogram, ref_histogram(x.numpy(), a.bin_edges))
    b = calib.HistogramCalibrator(8, None, False, num_bins=256)
    b.collect(x.half())
    np.testing.assert_array_equal(b.histogram, ref_histogram(x.half().float().numpy(), b.bin_edges))
    c = calib.HistogramCalibrator(8, None, False, num_bins=256, torch_hist=False)
    c.collect(x.half())
    np.testing.assert_array_equal(c.histogram, b.histogram)


# ========================================================================================
# The closed form and its pieces
# ========================================================================================
def test_group_bounds_equal_linspace_digitize():
    for nbins in (3, 128, 256):
        cands = np.arange(1, 3000)
        B = H._group_bounds(cands, nbins)
        for i in list(range(1, 400)) + list(range(400, 3000, 7)):
            want = np.digitize(range(i), np.linspace(0, i, num=nbins + 1)) - 1
            got = np.repeat(np.arange(nbins), np.diff(B[i - 1]))
            np.testing.assert_array_equal(got, want)


def test_closed_form_on_a_tiny_histogram_by_hand():
    # 2-bit signed quantizer: nbins = 2 levels; start_bin 2 -> candidates i = 2..7
    hist = np.array([9, 3, 0, 5, 2, 0, 1])
    edges = np.arange(8) * 0.5
    b = hist.copy()
    b[0] = b[1]                                            # [3, 3, 0, 5, 2, 0, 1]
    amaxs, kl = calib.kl_divergences(hist, edges, num_bits=2, start_bin=2)
    np.testing.assert_array_equal(amaxs, edges[2:])

    def by_hand(i):
        groups = [range(0, math.ceil(i / 2)), range(math.ceil(i / 2), i)]
        p = [float(v) for v in b[:i]]
        p[-1] += float(b[i:].sum())
        q = [0.0] * i
        for g in groups:
            nz = [j for j in g if b[j] != 0]
            for j in nz:
                q[j] = sum(b[j] for j in nz) / len(nz)
        P, Q = sum(p), sum(q)
        total = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                total += math.inf if qj == 0 else pj / P * math.log((pj / P) / (qj / Q))
        return total

    want = [by_hand(i) for i in range(2, 8)]
    # i=3: b[2] = 0 but the tail is not -> inf; i=6: b[5] = 0 < tail -> inf
    assert math.isinf(want[1]) and math.isinf(want[4])
    np.testing.assert_allclose(kl, want, rtol=1e-12, atol=1e-15)
    assert calib.compute_amax_entropy(hist, edges, 2, start_bin=2) == ref_amax_entropy(hist, edges, 2, start_bin=2)
    assert hist.tolist() == [9, 3, 0, 5, 2, 0, 1]           # not mutated


def test_closed_form_close_to_scipy_on_real_histograms():
    hist, edges = histogram_of("relu", 1024, seed=5)
    b = hist.copy()
    b[0] = b[1]
    cands = np.arange(128, 1025)
    kl, _ = H._kl_closed_form(b, cands, 128)
    exact = np.array([H._kl_reference(b, int(i), 128) for i in cands[::5]])
    np.testing.assert_allclose(kl[::5], exact, rtol=1e-10, atol=1e-13)


# ========================================================================================
# amax == the reference algorithms
# ========================================================================================
CASES = [
    # (kind, num_bins, num_bits, unsigned, stride, start_bin, seed)
    ("halfnormal", 256, 8, False, 1, 128, 10),
    ("relu", 300, 8, False, 1, 128, 11),
    ("relu", 400, 8, True, 1, 128, 12),
    ("heavy", 512, 8, False, 3, 128, 13),
    ("sparse", 256, 8, False, 1, 32, 14),
    ("sparse", 384, 8, True, 3, 32, 15),
    ("longtail", 256, 8, False, 1, 32, 16),
    ("longtail", 512, 8, False, 3, 128, 17),
    ("bimodal", 300, 8, False, 1, 128, 18),
    ("halfnormal", 200, 6, False, 1, 32, 19),
]


@pytest.mark.parametrize("kind,num_bins,num_bits,unsigned,stride,start_bin,seed", CASES)
def test_entropy_mse_percentile_equal_reference(kind, num_bins, num_bits, unsigned, stride, start_bin, seed):
    hist, edges = histogram_of(kind, num_bins, seed)
    before = hist.copy()
    got = calib.compute_amax_entropy(hist, edges, num_bits, unsigned, stride, start_bin)
    assert got == ref_amax_entropy(hist, edges, num_bits, unsigned, stride, start_bin)
    got = calib.compute_amax_mse(hist, edges, num_bits, unsigned, stride, start_bin)
    assert got == ref_amax_mse(hist, edges, num_bits, unsigned, stride, start_bin)
    for pct in (99.99, 99.9, 50.0, 100.0):
        assert calib.compute_amax_percentile(hist, edges, pct) == ref_amax_percentile(hist, edges, pct)
    np.testing.assert_array_equal(hist, before)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    num_bins=st.integers(140, 400),
    unsigned=st.booleans(),
    stride=st.sampled_from([1, 3]),
    start_bin=st.sampled_from([32, 128]),
    seed=st.integers(0, 2 ** 16),
)
def test_entropy_equals_reference_property(kind, num_bins, unsigned, stride, start_bin, seed):
    hist, edges = histogram_of(kind, num_bins, seed, n=50_000)
    want = ref_amax_entropy(hist, edges, 8, unsigned, stride, start_bin)
    assert calib.compute_amax_entropy(hist, edges, 8, unsigned, stride, start_bin) == want


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(0, 40), min_size=40, max_size=160).filter(lambda c: sum(c) > 0),
    stride=st.sampled_from([1, 2, 5]),
    start_bin=st.integers(1, 39),
    unsigned=st.booleans(),
)
def test_entropy_and_mse_on_arbitrary_small_histograms(counts, stride, start_bin, unsigned):
    # hand-shaped histograms hit ties, zero runs, NaN (all mass at the top) and inf cases
    hist = np.array(counts, dtype=np.int64)
    edges = np.linspace(0.0, 2.0, len(hist) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = ref_amax_entropy(hist, edges, 4, unsigned, stride, start_bin)
    assert calib.compute_amax_entropy(hist, edges, 4, unsigned, stride, start_bin) == want
    assert (calib.compute_amax_mse(hist, edges, 4, unsigned, stride, start_bin)
            == ref_amax_mse(hist, edges, 4, unsigned, stride, start_bin))


def test_entropy_ties_break_like_the_reference():
    # mass in the first bins and an empty tail: for every i past the mass, with each
    # nonzero bin alone in its group, p == q and the divergence is exactly 0 -- many ties,
    # and the reference keeps the LAST one
    rng = np.random.default_rng(30)
    for _ in range(4):
        n = int(rng.integers(150, 300))
        k = int(rng.integers(5, 60))
        hist = np.zeros(n, dtype=np.int64)
        hist[:k] = rng.integers(1, 10 ** int(rng.integers(1, 9)), k)
        edges = np.linspace(0.0, 1.0, n + 1)
        start = int(rng.integers(2, k + 3))
        assert calib.compute_amax_entropy(hist, edges, start_bin=start) == ref_amax_entropy(
            hist, edges, start_bin=start)


def test_entropy_shortlist_absorbs_closed_form_rounding(monkeypatch):
    # perturb the closed form by ~100x its real rounding error (~1e-13): the exact
    # re-scoring of the near-minimal candidates must still give the reference's answer
    closed_form = H._kl_closed_form
    rng = np.random.default_rng(31)

    def noisy(b, cands, nbins):
        kl, mag = closed_form(b, cands, nbins)
        return kl + rng.uniform(-1e-11, 1e-11, kl.shape), mag

    monkeypatch.setattr(H, "_kl_closed_form", noisy)
    for seed, kind, start in [(32, "sparse", 32), (33, "relu", 128), (34, "longtail", 32)]:
        hist, edges = histogram_of(kind, 256, seed)
        assert calib.compute_amax_entropy(hist, edges, start_bin=start) == ref_amax_entropy(
            hist, edges, start_bin=start)
    hist = np.zeros(200, dtype=np.int64)
    hist[:30] = rng.integers(1, 1000, 30)
    edges = np.linspace(0.0, 1.0, 201)
    assert calib.compute_amax_entropy(hist, edges, start_bin=8) == ref_amax_entropy(hist, edges, start_bin=8)


def test_mse_ties_break_like_the_reference_loop():
    # all mass in bin 0: its centre rounds to code 0 for every candidate amax, so every
    # candidate has the same error and the reference loop keeps the FIRST
    hist = np.zeros(300, dtype=np.int64)
    hist[0] = 7
    edges = np.linspace(0.0, 3.0, 301)
    got = calib.compute_amax_mse(hist, edges, start_bin=130, stride=2)
    assert got == ref_amax_mse(hist, edges, start_bin=130, stride=2) == np.float32((edges[130] + edges[131]) / 2)
    _, curve = calib.mse_errors(hist, edges, start_bin=130, stride=2)
    assert np.all(curve == curve[0])


def test_entropy_at_2048_bins_equals_reference():
    hist, edges = histogram_of("relu", 2048, seed=20, n=1_000_000)
    # stride 2 halves the reference loop's time (~1921 candidates would take ~7 s here)
    assert calib.compute_amax_entropy(hist, edges, stride=2) == ref_amax_entropy(hist, edges, stride=2)


def test_constant_tensor_matches_reference():
    # all mass in the last bin: the reference's divergences are NaN for every i < N and
    # its argmin picks the last NaN; qcourse must agree
    cal = calib.HistogramCalibrator(8, None, False, num_bins=200)
    cal.collect(torch.full((1000,), 0.75))
    hist, edges = cal.histogram, cal.bin_edges
    with np.errstate(invalid="ignore", divide="ignore"):
        want = ref_amax_entropy(hist, edges)
    assert float(cal.compute_amax("entropy")) == np.float32(want)
    assert float(cal.compute_amax("mse")) == np.float32(ref_amax_mse(hist, edges))


def test_calibrator_amax_equals_module_functions():
    x = torch.from_numpy(samples("relu", 50_000, np.random.default_rng(21)).astype(np.float32))
    cal = calib.HistogramCalibrator(8, None, True, num_bins=256)
    cal.collect(x[:20_000])
    cal.collect(x[20_000:] * 1.5)
    hist, edges = cal.histogram, cal.bin_edges
    got = cal.compute_amax("entropy", stride=2, start_bin=64)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == np.float32(ref_amax_entropy(hist, edges, 8, True, 2, 64))
    assert float(cal.compute_amax("mse")) == np.float32(ref_amax_mse(hist, edges, 8, True))
    assert float(cal.compute_amax("percentile", percentile=99.9)) == np.float32(
        ref_amax_percentile(hist, edges, 99.9))
    np.testing.assert_array_equal(cal.histogram, hist)       # compute_amax does not mutate
    assert "HistogramCalibrator(num_bits=8" in repr(cal) and "samples=50000" in repr(cal)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_equal_cpu_counts():
    x = torch.from_numpy(samples("heavy", 300_000, np.random.default_rng(22)).astype(np.float32))
    cpu = calib.HistogramCalibrator(8, 1, False, num_bins=512)
    gpu = calib.HistogramCalibrator(8, 1, False, num_bins=512)
    for s in (1.0, 3.0):
        cpu.collect((x * s).view(100, 3, -1))
        gpu.collect((x * s).view(100, 3, -1).cuda())
    for a, b in zip(cpu.histogram, gpu.histogram):
        np.testing.assert_array_equal(a, b)
    amax = gpu.compute_amax("entropy")
    assert amax.device.type == "cuda"
    torch.testing.assert_close(amax.cpu(), cpu.compute_amax("entropy"), rtol=0, atol=0)


# ========================================================================================
# errors and the factory
# ========================================================================================
def test_histogram_errors():
    cal = calib.HistogramCalibrator(8, None, False, num_bins=256)
    with pytest.raises(RuntimeError, match="HistogramCalibrator has collected no data; run collect"):
        cal.compute_amax("entropy")
    cal.collect(torch.rand(1000))
    with pytest.raises(ValueError, match="'entropy', 'mse', 'percentile'"):
        cal.compute_amax("kl")
    with pytest.raises(TypeError, match="needs a method"):
        cal.compute_amax()
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\], got"):
            cal.compute_amax("percentile", percentile=bad)
    with pytest.raises(ValueError, match="start_bin=256 must be smaller than the number of bins"):
        cal.compute_amax("entropy", start_bin=256)
    with pytest.raises(ValueError, match="start_bin=300"):
        cal.compute_amax("mse", start_bin=300)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        cal.compute_amax("entropy", stride=0)
    with pytest.raises(TypeError, match="stride must be an int"):
        cal.compute_amax("mse", stride=1.5)
    with pytest.raises(ValueError, match="2 NaN and 0 inf"):
        cal.collect(torch.tensor([1.0, float("nan"), float("nan")]))
    with pytest.raises(ValueError, match=r"unsigned=True got a negative value \(min -0.5"):
        calib.HistogramCalibrator(8, None, True).collect(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="num_bins must be in"):
        calib.HistogramCalibrator(8, None, False, num_bins=1)
    with pytest.warns(DeprecationWarning, match="grow_method"):
        calib.HistogramCalibrator(8, None, False, grow_method="stretch")
    pc = calib.HistogramCalibrator(8, 0, False, num_bins=256)
    pc.collect(torch.rand(4, 10))
    with pytest.raises(ValueError, match="channel shape"):
        pc.collect(torch.rand(5, 10))
    grow = calib.HistogramCalibrator(8, None, False, num_bins=2048)
    grow.collect(torch.tensor([1e-6]))
    with pytest.raises(ValueError, match="would grow"):
        grow.collect(torch.tensor([1e3]))
    # module-level functions
    h, e = np.array([5, 3, 2]), np.array([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="len\\(hist\\) \\+ 1"):
        calib.compute_amax_entropy(h, e[:3], start_bin=1)
    with pytest.raises(ValueError, match="whole counts"):
        calib.compute_amax_entropy(h + 0.5, e, start_bin=1)
    with pytest.raises(ValueError, match=">= 0"):
        calib.compute_amax_percentile(np.array([5, -1, 2]), e)
    with pytest.raises(ValueError, match="empty"):
        calib.compute_amax_mse(np.zeros(3), e, start_bin=1)


def test_max_compute_amax_rejects_method_but_histogram_requires_it():
    desc_h = QuantDescriptor(num_bits=8, calib_method="histogram", axis=0)
    desc_m = QuantDescriptor(num_bits=8, unsigned=True)
    h = calib.calibrator_from_descriptor(desc_h, num_bins=512)
    m = calib.calibrator_from_descriptor(desc_m)
    assert isinstance(h, calib.HistogramCalibrator) and h.axis == 0 and h.num_bins == 512
    assert isinstance(m, calib.MaxCalibrator) and m.unsigned
    m.collect(torch.rand(10))
    assert m.compute_amax() is not None
    with pytest.raises(TypeError):
        m.compute_amax(method="entropy")


def test_mse_near_float32_max_raises_a_clear_error():
    c = calib.HistogramCalibrator(8)
    c.collect(torch.tensor([3e38, -3e38, 1.0]))
    with pytest.raises(ValueError, match="overflow"):
        c.compute_amax("mse")
    assert c.compute_amax("percentile") > 0   # the other methods still answer


# ------------------------------------------------------------------ calibrate_weights
def test_calibrate_weights_uses_the_quantizers_axis():
    from qcourse import nn as quant_nn

    torch.manual_seed(0)
    model = torch.nn.Sequential(quant_nn.QuantConvTranspose2d(3, 5, 2))   # weight (3, 5, 2, 2): axis 1
    assert calib.calibrate_weights(model, method="max") == ["0"]
    w = model[0].weight.detach().abs()
    assert torch.equal(model[0].weight_quantizer.amax, w.amax(dim=(0, 2, 3), keepdim=True))


def test_calibrate_weights_zero_channel_and_bad_arguments():
    from qcourse import nn as quant_nn

    model = torch.nn.Sequential(quant_nn.QuantLinear(4, 2))
    with torch.no_grad():
        model[0].weight[1] = 0.0
    calib.calibrate_weights(model, method="mse", num_bins=256)
    amax = model[0].weight_quantizer.amax.flatten()
    assert float(amax[1]) == 0.0 and float(amax[0]) > 0
    for kwargs, match in [(dict(percentile=0), "percentile"), (dict(num_bins=1), "num_bins"),
                          (dict(perchannel=1), "perchannel"), (dict(method="mse", num_bins=64), "num_bins > 128")]:
        with pytest.raises((TypeError, ValueError), match=match):
            calib.calibrate_weights(model, **kwargs)


def test_fp8_calibrators_accept_e4m3():
    cal = calib.MaxCalibrator(num_bits=(4, 3))
    cal.collect(torch.tensor([1.0, -3.0]))
    assert cal.num_bits == (4, 3) and float(cal.compute_amax()) == 3.0
