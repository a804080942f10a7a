"""qcourse.course.plots.basics (lessons 1-2): each figure draws the numbers an independent oracle gives.

Oracles: numpy's own float formats for bit patterns (``np.float32(...).view(np.uint32)``),
``tests/oracles.np_quant`` for codes and dequantized values, hand-derived exact answers
for the lesson 1 worked example and the STE/PACT gradients.
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qcourse.course import plots  # noqa: E402
from qcourse.course.plots import basics  # noqa: E402

from oracles import np_quant  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _line(fig, gid):
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(lines) == 1, f"expected one line with gid {gid!r}, found {len(lines)}"
    return np.asarray(lines[0].get_xdata(), dtype=np.float64), np.asarray(lines[0].get_ydata(), dtype=np.float64)


def _bars(fig, gid):
    return np.array([p.get_height() for ax in fig.axes for p in ax.patches if p.get_gid() == gid])


# ------------------------------------------------------------------ bit patterns
def _np_bits(value, fmt):
    if fmt == "FP32":
        return format(int(np.array([value], np.float32).view(np.uint32)[0]), "032b")
    if fmt == "FP16":
        with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as in torch
            return format(int(np.array([value], np.float16).view(np.uint16)[0]), "016b")
    if fmt == "BF16":  # top half of the float32 bits, rounded to nearest even
        u = int(np.array([value], np.float32).view(np.uint32)[0])
        if np.isnan(value):
            return format(u >> 16 | 0x40, "016b")
        return format(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF, "016b")
    if fmt == "INT8":
        return format(int(np.array([value], np.int8).view(np.uint8)[0]), "08b")
    raise AssertionError(fmt)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -0.61, 1.62, 3.14159265, 65504.0, 1e-7, -2.5e38,
                                   float("inf"), 1.00390625, 1.01171875])
@pytest.mark.parametrize("fmt", ["FP32", "FP16", "BF16"])
def test_bit_string_matches_numpy(value, fmt):
    assert basics.bit_string(value, fmt) == _np_bits(value, fmt)


def test_bit_string_known_patterns():
    assert basics.bit_string(1.0, "FP32") == "0" + "01111111" + "0" * 23
    assert basics.bit_string(-2.0, "FP16") == "1" + "10000" + "0" * 10
    assert basics.bit_string(-1, "INT8") == "11111111"
    assert basics.bit_string(-128, "INT8") == "10000000"


@pytest.mark.parametrize("code", [-128, -48, -1, 0, 1, 127])
def test_bit_string_int8_matches_numpy(code):
    assert basics.bit_string(code, "INT8") == _np_bits(code, "INT8")


@pytest.mark.parametrize("bad", [0.5, 128, -129])
def test_bit_string_int8_rejects_non_codes(bad):
    with pytest.raises(ValueError, match="INT8 value must be an integer code"):
        basics.bit_string(bad, "INT8")


def test_bit_string_rejects_unknown_format():
    with pytest.raises(ValueError, match="format must be one of"):
        basics.bit_string(1.0, "FP8")


def test_plot_bit_layouts_draws_each_format_bits():
    fig = basics.plot_bit_layouts(-0.61, amax=1.62)
    assert isinstance(fig, Figure)
    texts = [t for t in fig.axes[0].texts]
    for fmt, n in [("FP32", 32), ("FP16", 16), ("BF16", 16), ("INT8", 8)]:
        bits = "".join(t.get_text() for t in texts if t.get_gid() == f"bits-{fmt}")
        assert len(bits) == n
        if fmt == "INT8":
            code = int(np_quant(-0.61, 1.62)[0])
            assert code == -48
            assert bits == _np_bits(code, "INT8")
        else:
            assert bits == _np_bits(-0.61, fmt)


def test_plot_bit_layouts_needs_code_or_amax():
    with pytest.raises(ValueError, match="int8_code"):
        basics.plot_bit_layouts(0.3)
    fig = basics.plot_bit_layouts(0.3, int8_code=5)
    bits = "".join(t.get_text() for t in fig.axes[0].texts if t.get_gid() == "bits-INT8")
    assert bits == "00000101"


# ------------------------------------------------------------------ mapping
def test_plot_mapping_worked_example():
    values = [-0.61, -0.52, 1.62]
    fig = basics.plot_mapping(values)
    assert isinstance(fig, Figure)
    sym = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "codes-symmetric"][0]
    aff = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "codes-asymmetric"][0]
    np.testing.assert_array_equal(sym.get_offsets()[:, 0], np_quant(values, 1.62)[0])
    # asymmetric by hand: scale = 2.23/255, zero point round(0.61/scale) = 70
    scale = np.float32(2.23) / np.float32(255)
    zp = np.round(np.float32(0.61) / scale)
    assert zp == 70
    expected = np.clip(np.rint(np.array(values, np.float32) / scale) + zp, 0, 255)
    np.testing.assert_array_equal(aff.get_offsets()[:, 0], expected)
    np.testing.assert_array_equal(expected, [0, 11, 255])


# ------------------------------------------------------------------ staircase panels
@pytest.mark.parametrize("num_bits,amax", [(3, 1.0), (8, 0.7)])
def test_plot_quant_panels_lines_follow_oracle(num_bits, amax):
    x = torch.linspace(-1.3, 1.3, 1001)
    fig = basics.plot_quant_panels(x, amax, num_bits=num_bits)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    xd, orig = _line(fig, "original")
    np.testing.assert_array_equal(xd, orig)
    codes_ref, deq_ref, _ = np_quant(xd, amax, num_bits)
    _, codes = _line(fig, "codes")
    _, deq = _line(fig, "dequantized")
    _, err = _line(fig, "error")
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_array_equal(deq, deq_ref)
    np.testing.assert_allclose(err, deq_ref.astype(np.float64) - xd, atol=1e-6)


# ------------------------------------------------------------------ error vs amax
def _np_mse(x, a, num_bits=8):
    return float(np.mean((np_quant(x, a, num_bits)[1].astype(np.float64) - x.astype(np.float64)) ** 2))


def test_quant_error_vs_amax_splits_exactly():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) ** 3).astype(np.float32)
    amaxes = np.linspace(0.1, 1.1 * np.abs(x).max(), 25)
    r = basics.quant_error_vs_amax(x, amaxes)
    np.testing.assert_allclose(r["mse"], r["rounding"] + r["clipping"], rtol=1e-9)
    np.testing.assert_allclose(r["mse"], [_np_mse(x, a) for a in amaxes], rtol=1e-6)
    # no element is clipped once amax covers max|x|
    assert (r["clipping"][amaxes >= np.abs(x).max()] == 0).all()
    # rounding error stays within (step/2)^2 on average
    assert (r["rounding"] <= (amaxes / 127 / 2) ** 2 + 1e-12).all()


def test_quant_error_vs_amax_rejects_bad_amax():
    with pytest.raises(ValueError, match="amaxes"):
        basics.quant_error_vs_amax(np.ones(4, np.float32), [1.0, 0.0])


def test_plot_mse_vs_amax_curve_and_regions():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20000) ** 3).astype(np.float32)  # heavy tails: an inner optimum
    amaxes = np.linspace(0.05, 1.1 * np.abs(x).max(), 120)
    fig = basics.plot_mse_vs_amax(x, amaxes, num_bits=8)
    assert isinstance(fig, Figure)
    a, mse = _line(fig, "mse")
    np.testing.assert_allclose(a, amaxes)
    np.testing.assert_allclose(mse, [_np_mse(x, v) for v in amaxes], rtol=1e-6)
    best = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "best-amax"][0]
    assert best.get_xdata()[0] == pytest.approx(amaxes[np.argmin(mse)])
    clip = [p for p in fig.axes[0].patches if p.get_gid() == "clipping-dominated"]
    rnd = [p for p in fig.axes[0].patches if p.get_gid() == "rounding-dominated"]
    assert clip and rnd
    # small amax clips a lot: the leftmost region is clipping-dominated, the rightmost rounding
    assert min(p.get_x() for p in clip) < min(p.get_x() for p in rnd)
    assert max(p.get_x() + p.get_width() for p in rnd) == pytest.approx(amaxes[-1])


# ------------------------------------------------------------------ per-channel
def test_per_channel_errors_against_numpy():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((6, 3, 3, 3)) * rng.uniform(0.01, 1, (6, 1, 1, 1))).astype(np.float32)
    e_t, e_c = basics.per_channel_errors(torch.from_numpy(w), num_bits=4)
    amax_t = np.abs(w).max()
    amax_c = np.abs(w).max(axis=(1, 2, 3), keepdims=True)
    ref_t = ((np_quant(w, amax_t, 4)[1] - w).astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    ref_c = ((np_quant(w, amax_c, 4)[1] - w).astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(e_t, ref_t, rtol=1e-6)
    np.testing.assert_allclose(e_c, ref_c, rtol=1e-6)
    # the channel holding the global max gets the same amax either way
    k = int(np.abs(w).reshape(6, -1).max(1).argmax())
    assert e_t[k] == pytest.approx(e_c[k])
    fig = basics.plot_per_channel_error(torch.from_numpy(w), num_bits=4, name="conv")
    np.testing.assert_allclose(_bars(fig, "per-tensor"), ref_t, rtol=1e-6)
    np.testing.assert_allclose(_bars(fig, "per-channel"), ref_c, rtol=1e-6)


def test_per_channel_errors_other_axis_and_bad_shape():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    e_t, e_c = basics.per_channel_errors(w, num_bits=8, axis=1)
    assert e_t.shape == e_c.shape == (5,)
    ref_c = ((np_quant(w, np.abs(w).max(0, keepdims=True))[1] - w).astype(np.float64) ** 2).mean(0)
    np.testing.assert_allclose(e_c, ref_c, rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2 dims"):
        basics.per_channel_errors(np.ones(3, np.float32))


# ------------------------------------------------------------------ accuracy vs bits
def test_plot_accuracy_vs_bits():
    fig = basics.plot_accuracy_vs_bits([4, 8], {"per-tensor": [0.5, 0.9], "per-channel": [0.8, 0.91]}, fp32=0.92)
    assert isinstance(fig, Figure)
    x, y = _line(fig, "per-channel")
    np.testing.assert_array_equal(x, [4, 8])
    np.testing.assert_allclose(y, [80, 91])
    _, f = _line(fig, "fp32")
    np.testing.assert_allclose(f, [92, 92])
    with pytest.raises(ValueError, match="has 1 values for 2 bit widths"):
        basics.plot_accuracy_vs_bits([4, 8], {"a": [0.5]})


# ------------------------------------------------------------------ STE / PACT
def test_plot_ste_gradients():
    amax, bits = 1.0, 3
    fig = basics.plot_ste(amax, bits)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    x, y = _line(fig, "forward")
    np.testing.assert_array_equal(y, np_quant(x, amax, bits)[1])
    _, gx = _line(fig, "grad-x")
    np.testing.assert_array_equal(gx, (np.abs(x) <= amax).astype(np.float64))
    _, ga = _line(fig, "grad-amax")
    np.testing.assert_array_equal(ga, np.where(np.abs(x) <= amax, 0.0, np.sign(x)))
    assert gx.min() == 0 and gx.max() == 1 and ga.min() == -1 and ga.max() == 1


def test_all_exported_from_plots_package():
    for name in basics.__all__:
        assert getattr(plots, name) is getattr(basics, name)
