"""Tests of qcourse.course.plots.qat (lesson 7): each figure draws exactly the numbers it was given
(read back from the matplotlib artists), the boundary distance matches a by-hand computation, and bad
input gets a clear error."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from qcourse.course.plots import qat as pq  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_loss_curves_draw_the_steps_and_their_running_mean():
    curves = {"distillation": [5.0, 4.0, 3.0, 2.0], "detection": [1.0, 0.5]}
    fig = pq.plot_loss_curves(curves, smooth=2)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == list(curves)
    raw, mean = axes[0].lines
    assert list(raw.get_ydata()) == curves["distillation"]
    assert list(mean.get_xdata()) == [2, 3, 4] and list(mean.get_ydata()) == [4.5, 3.5, 2.5]
    assert list(axes[1].lines[1].get_ydata()) == [0.75]


def test_qat_table_bars_and_recovered_share():
    settings = {"W8A8": {"fp32": 0.70, "ptq": 0.69, "qat": 0.695}, "W3A8": {"fp32": 0.70, "ptq": 0.50, "qat": 0.65}}
    fig = pq.plot_qat_table(settings)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = [[b.get_height() for b in c] for c in bars]
    assert heights == [[0.70, 0.70], [0.69, 0.50], [0.695, 0.65]]
    texts = [t.get_text() for t in ax.texts if t.get_text().startswith("QAT won back")]
    assert texts == ["QAT won back 50 %", "QAT won back 75 %"]  # (0.695-0.69)/0.01, (0.65-0.5)/0.2


def test_boundary_distance_by_hand():
    scale = np.array([[0.1], [0.5]])
    w = np.array([[0.25, 0.31, -0.149], [0.5, 0.74, -1.0]])
    # w/scale: 2.5 -> on the boundary; 3.1 -> 0.4 from it; -1.49 -> 0.01; 1.0 -> on a code; 1.48 -> 0.02; -2.0
    want = np.array([[0.0, 0.4, 0.01], [0.5, 0.02, 0.5]])
    np.testing.assert_allclose(pq.boundary_distance(w, scale), want, atol=1e-12)


def test_boundary_flips_histograms_are_normalized_over_the_given_weights():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 0.5, 1000)
    flipped = d < 0.05
    fig = pq.plot_boundary_flips(d, flipped, "layer x")
    ax = fig.axes[0]
    all_counts = np.array([p.get_height() for p in ax.patches[:25]])
    np.testing.assert_allclose((all_counts * 0.02).sum(), 1.0)  # density over 25 bins of width 0.02
    assert "changed code during QAT (%d)" % flipped.sum() in [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("call, match", [
    (lambda: pq.plot_loss_curves({}), "no loss curve"),
    (lambda: pq.plot_loss_curves({"a": []}), "has no step"),
    (lambda: pq.plot_loss_curves({"a": [1.0]}, smooth=0), "smooth must be >= 1"),
    (lambda: pq.plot_qat_table({"W4A8": {"fp32": 0.7, "ptq": 0.6}}), "lacks qat"),
    (lambda: pq.plot_boundary_flips([0.1, 0.2], [True], "t"), "one flag per weight"),
    (lambda: pq.plot_boundary_flips([0.1, 0.2], [False, False], "t"), "no weight changed code"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
