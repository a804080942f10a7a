"""Tests of qcourse.course.plots.calibration (lessons 3-4): each figure draws exactly the numbers it
was given (read back from the matplotlib artists), and bad input gets a clear error."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from qcourse import calib
from qcourse.course import plots  # noqa: E402
from qcourse.course.plots import calibration as pc  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _vlines(ax):
    """x positions of the vertical lines (axvline) of an axes, in drawing order."""
    out = []
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), dtype=float)
        if len(x) == 2 and x[0] == x[1] and tuple(line.get_ydata()) == (0, 1):
            out.append(float(x[0]))
    return out


def _hlines(ax):
    out = []
    for line in ax.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        if len(y) == 2 and y[0] == y[1] and tuple(line.get_xdata()) == (0, 1):
            out.append(float(y[0]))
    return out


def _real_histogram(seed=0, num_bins=256):
    """A ReLU-like activation histogram collected by qcourse's calibrator."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(0.2, 1.0, 50_000), 0).astype(np.float32)
    cal = calib.HistogramCalibrator(8, None, False, num_bins=num_bins)
    cal.collect(torch.from_numpy(x))
    return cal.histogram, cal.bin_edges, x


def test_reexported_from_plots_package():
    for name in pc.__all__:
        assert getattr(plots, name) is getattr(pc, name)


# ------------------------------------------------------------------ per-channel amax
def test_per_channel_amax_bars_are_the_amax_values():
    amax = torch.tensor([0.5, 0.25, 1.5, 0.75]).reshape(4, 1, 1, 1)
    fig = plots.plot_per_channel_amax(amax, title="w")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)][0]
    assert [p.get_height() for p in bars.patches] == [0.5, 0.25, 1.5, 0.75]
    assert [p.get_x() + p.get_width() / 2 for p in bars.patches] == pytest.approx([0, 1, 2, 3])
    assert _hlines(ax) == [1.5]                      # default per-tensor amax: the max
    fig = plots.plot_per_channel_amax(amax.numpy(), per_tensor=2.0)
    assert _hlines(fig.axes[0]) == [2.0]


@pytest.mark.parametrize("bad,msg", [(np.array([]), "empty"), (np.array([1.0, -0.1]), ">= 0"),
                                     (np.array([1.0, np.nan]), "finite")])
def test_per_channel_amax_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        plots.plot_per_channel_amax(bad)


# ------------------------------------------------------------------ one histogram
def test_histogram_draws_the_counts_and_one_line_per_method():
    h, e, x = _real_histogram()
    # the counts the figure must show, from numpy on the same edges
    np.testing.assert_array_equal(h, np.histogram(x, bins=e)[0])
    amaxes = {"max": float(e[-1]), "entropy": calib.compute_amax_entropy(h, e),
              "mse": calib.compute_amax_mse(h, e), "percentile": calib.compute_amax_percentile(h, e)}
    fig = plots.plot_histogram_with_amax(h, e, amaxes, title="relu")
    ax = fig.axes[0]
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert steps, "the histogram is drawn with stairs"
    for s in steps:
        values, edges, _ = s.get_data()
        np.testing.assert_array_equal(values, h)
        np.testing.assert_array_equal(edges, e)
    assert _vlines(ax) == pytest.approx(list(amaxes.values()))
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for m, a in amaxes.items():
        assert f"{m}: {a:.4g}" in labels
    # each method keeps its colour across figures
    colors = [matplotlib.colors.to_hex(line.get_color()) for line in ax.lines if line.get_xdata()[0] in amaxes.values()]
    assert colors == [matplotlib.colors.to_hex(pc.METHOD_COLORS[m]) for m in amaxes]


def test_histogram_linear_scale_and_no_lines():
    fig = plots.plot_histogram_with_amax([3, 0, 1], [0.0, 1.0, 2.0, 3.0], log=False)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and _vlines(ax) == []


@pytest.mark.parametrize("hist,edges,amaxes,msg", [
    ([1, 2, 3], [0, 1, 2], None, r"len\(hist\) \+ 1 = 4"),
    ([[1, 2]], [0, 1, 2], None, "1-D"),
    ([1, -2, 3], [0, 1, 2, 3], None, ">= 0"),
    ([1, 2, 3], [0, 2, 1, 3], None, "non-decreasing"),
    ([], [0], None, "empty"),
    ([1, 2, 3], [0, 1, 2, 3], {"mse": -0.5}, r"amax for 'mse' must be finite and >= 0, got -0.5"),
    ([1, 2, 3], [0, 1, 2, 3], {"max": float("inf")}, "finite"),
])
def test_histogram_rejects_bad_input(hist, edges, amaxes, msg):
    with pytest.raises(ValueError, match=msg):
        plots.plot_histogram_with_amax(hist, edges, amaxes)


def test_histogram_amaxes_must_be_a_mapping():
    with pytest.raises(TypeError, match="must map a label"):
        plots.plot_histogram_with_amax([1, 2], [0, 1, 2], [1.0, 2.0])


# ------------------------------------------------------------------ grid of histograms
def test_activation_grid_one_panel_per_quantizer():
    hists, amaxes = {}, {}
    for k in range(4):
        h, e, _ = _real_histogram(seed=k, num_bins=64 + k)
        hists[f"layer{k}"] = (h, e)
        amaxes[f"layer{k}"] = {"max": float(e[-1]), "percentile": calib.compute_amax_percentile(h, e, 99.0)}
    del amaxes["layer3"]                                  # a panel without lines is allowed
    fig = plots.plot_activation_histograms(hists, amaxes, ncols=3)
    drawn = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in drawn] == list(hists)
    assert len(fig.axes) == 6                            # 2 rows x 3 columns, two switched off
    for ax, (name, (h, e)) in zip(drawn, hists.items()):
        values, edges, _ = [p for p in ax.patches if isinstance(p, StepPatch)][0].get_data()
        np.testing.assert_array_equal(values, h)
        np.testing.assert_array_equal(edges, e)
        assert _vlines(ax) == pytest.approx(list(amaxes.get(name, {}).values()))
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_labels == ["|x| histogram", "max", "percentile"]
    assert fig.get_size_inches()[0] <= 10


def test_activation_grid_errors():
    h, e, _ = _real_histogram(num_bins=32)
    with pytest.raises(ValueError, match="non-empty mapping"):
        plots.plot_activation_histograms({})
    with pytest.raises(ValueError, match=r"names without a histogram: \['b'\]"):
        plots.plot_activation_histograms({"a": (h, e)}, {"b": {"max": 1.0}})
    with pytest.raises(ValueError, match="pair"):
        plots.plot_activation_histograms({"a": h})
    with pytest.raises(ValueError, match="ncols"):
        plots.plot_activation_histograms({"a": (h, e)}, ncols=0)
    with pytest.raises(ValueError, match=r"histograms\['a'\]"):
        plots.plot_activation_histograms({"a": (h, e[:-1])})


# ------------------------------------------------------------------ search curves
def test_amax_search_draws_curves_and_leaves_out_inf():
    h, e, _ = _real_histogram(num_bins=512)
    cand_kl, kl = calib.kl_divergences(h, e)
    cand_mse, mse = calib.mse_errors(h, e)
    chosen = {"entropy": calib.compute_amax_entropy(h, e), "mse": calib.compute_amax_mse(h, e)}
    kl = kl.copy()
    kl[:3] = np.inf                                       # as the KL gives for a clipped tail in an empty bin
    fig = plots.plot_amax_search({"entropy": (cand_kl, kl), "mse": (cand_mse, mse)}, chosen, logy=True)
    ax_kl, ax_mse = fig.axes
    line = ax_kl.lines[0]
    finite = np.isfinite(kl)
    n_inf = int((~finite).sum())
    assert n_inf > 3                                      # the 3 set here and some of the real curve's
    np.testing.assert_array_equal(line.get_xdata(), cand_kl[finite])
    np.testing.assert_array_equal(line.get_ydata(), kl[finite])
    assert f"({n_inf} inf left out)" in line.get_label()
    np.testing.assert_array_equal(ax_mse.lines[0].get_ydata(), mse)
    assert _vlines(ax_kl) == [chosen["entropy"]] and _vlines(ax_mse) == [chosen["mse"]]
    assert ax_kl.get_yscale() == "log"
    # the chosen amax is where each curve is smallest (the curves and the search agree)
    assert cand_mse[np.argmin(mse)] == chosen["mse"]


def test_amax_search_errors():
    with pytest.raises(ValueError, match="no finite score"):
        plots.plot_amax_search({"kl": ([1.0, 2.0], [np.inf, np.inf])})
    with pytest.raises(ValueError, match="2 candidates but 3 scores"):
        plots.plot_amax_search({"kl": ([1.0, 2.0], [1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match=r"labels without a curve: \['mse'\]"):
        plots.plot_amax_search({"kl": ([1.0, 2.0], [1.0, 2.0])}, {"mse": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_amax_search({})


# ------------------------------------------------------------------ method comparison
def test_method_comparison_bars_in_group_order():
    results = {"8 bit": {"max": 0.94, "entropy": 0.95, "mse": 0.93},
               "4 bit": {"max": 0.90, "entropy": 0.20, "mse": 0.91}}
    fig = plots.plot_method_comparison(results, reference=0.96)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["max", "entropy", "mse"]
    for b, m in zip(bars, ["max", "entropy", "mse"]):
        assert [p.get_height() for p in b.patches] == [results["8 bit"][m], results["4 bit"][m]]
        # bar k of every method sits over group k
        assert [round(p.get_x() + p.get_width() / 2) for p in b.patches] == [0, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8 bit", "4 bit"]
    assert _hlines(ax) == [0.96]


def test_method_comparison_errors():
    with pytest.raises(ValueError, match="same methods"):
        plots.plot_method_comparison({"8 bit": {"max": 1.0, "mse": 1.0}, "4 bit": {"max": 1.0}})
    with pytest.raises(ValueError, match="finite"):
        plots.plot_method_comparison({"8 bit": {"max": float("nan")}})
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_method_comparison({})


def test_amax_search_marks_points_of_a_sparse_curve():
    x = np.linspace(0.1, 1.0, 40)
    y = np.where(np.arange(40) % 4 == 0, 1.0 / x, np.inf)      # 10 finite points among 40
    x2 = np.linspace(0.1, 1.0, 200)
    fig = plots.plot_amax_search({"kl": (x, y), "dense": (x2, 1.0 / x2)})
    sparse_line, dense_line = fig.axes[0].lines[0], fig.axes[1].lines[0]
    assert sparse_line.get_marker() == "o" and len(sparse_line.get_xdata()) == 10
    assert dense_line.get_marker() in (None, "None", "")
