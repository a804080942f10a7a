"""qcourse.course.native (lesson 9): PyTorch's mapping rules in numpy, checked against PyTorch itself.

Oracles: PyTorch's observers (``MinMaxObserver``) and its run-time choice
(``torch._choose_qparams_per_tensor``) for scales and zero points, its quantize kernel
(``torch.quantize_per_tensor``) for codes, its dynamic int8 Linear kernel
(``torch.ops.quantized.linear_dynamic``) for the by-hand computation, ``torch.save`` byte counts
for sizes, and hand-made inputs whose answers are known (constant images, separable data).
"""
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qcourse.course import native  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation on import
    import torch.ao.quantization as tq  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*(quantized tensor creation|quant_min and quant_max).*")
        yield
    plt.close("all")


RANGES = [(-1.7, 2.3), (-0.01, 5.0), (-8.0, 0.5), (0.25, 3.0), (-3.0, -0.5), (-1e-3, 1e-3)]


# ------------------------------------------------------------------ mapping rules
@pytest.mark.parametrize("amax", [0.37, 1.0, 12.5])
def test_symmetric_scale_matches_pytorch_observer(amax):
    default = tq.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    default(torch.tensor([-amax / 3, amax]))
    assert native.symmetric_scale(amax) == pytest.approx(float(default.calculate_qparams()[0]), rel=1e-6)
    narrow = tq.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    narrow(torch.tensor([-amax / 3, amax]))
    assert native.symmetric_scale(amax, -127, 127) == pytest.approx(float(narrow.calculate_qparams()[0]), rel=1e-6)
    assert native.symmetric_scale(amax) == pytest.approx(amax / 127.5, rel=1e-6)
    with pytest.raises(ValueError, match="amax must be >= 0"):
        native.symmetric_scale(-1.0)


@pytest.mark.parametrize("dtype,qmin,qmax", [(torch.quint8, 0, 255), (torch.qint8, -128, 127)])
def test_quantize_codes_match_pytorch_kernel(dtype, qmin, qmax):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g) * 3
    x[:4] = torch.tensor([0.0, 100.0, -100.0, 0.5])           # clipped at both ends, and exact values
    scale, zp = (0.0371, 17) if dtype == torch.quint8 else (0.0213, 0)
    expected = torch.quantize_per_tensor(x, scale, zp, dtype).int_repr().long().numpy()
    assert np.array_equal(native.quantize_codes(x.numpy(), scale, zp, qmin, qmax), expected)


@pytest.mark.parametrize("seed", range(8))
def test_dynamic_linear_reference_matches_kernel(seed):
    reduce_range = True   # what the x86 module uses (full range can saturate: see the next test)
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 48, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(12, generator=g))
    x = torch.randn(16, 48, generator=g) * (seed + 1) + 0.3 * seed   # ranges of several shapes
    dq = tq.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
    y_kernel = torch.ops.quantized.linear_dynamic(x, dq._packed_params._packed_params, reduce_range)
    y, parts = native.dynamic_linear_reference(x.numpy(), lin.weight.detach().numpy(), lin.bias.detach().numpy(),
                                               reduce_range=reduce_range)
    packed = dq.weight()
    assert packed.q_scale() == pytest.approx(parts["s_w"], rel=1e-7)
    assert np.array_equal(packed.int_repr().numpy(), parts["q_w"])
    s_x, zp_x = torch._choose_qparams_per_tensor(x, reduce_range)
    assert (np.float32(s_x), zp_x) == (np.float32(parts["s_x"]), parts["zp_x"])
    one_step = parts["s_x"] * parts["s_w"]
    # identical integers; only the float32 epilogue rounds differently (far below one output step)
    assert np.abs(y_kernel.double().numpy() - y).max() < 1e-3 * one_step * max(1.0, np.abs(parts["acc"]).max())


@pytest.mark.parametrize("lo,hi", RANGES + [(0.0, 1e-3), (-2e-3, 0.0), (0.0, 0.0), (-1e-3, 2e-3)])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_kernel_qparams_match_the_kernel(lo, hi, reduce_range):
    x = torch.tensor([lo, hi])
    scale, zp = torch._choose_qparams_per_tensor(x, reduce_range)
    ours = native.kernel_qparams(float(x.min()), float(x.max()), 0, 127 if reduce_range else 255)
    assert ours == (float(np.float32(scale)), zp)


def test_kernel_qparams_contain_zero_and_validate():
    assert native.kernel_qparams(0.5, 2.0)[1] == 0          # all positive: 0.0 is the lowest code
    assert native.kernel_qparams(-2.0, -0.5)[1] == 255      # all negative: 0.0 is the highest code
    with pytest.raises(ValueError, match="xmin must be <= xmax"):
        native.kernel_qparams(1.0, -1.0)
    with pytest.raises(ValueError, match="qmin must be < qmax"):
        native.kernel_qparams(-1.0, 1.0, 5, 5)


def test_full_range_activations_saturate_without_vnni():
    # x = (1, 1), w = (1, 1): one pair of uint8 x int8 products, 255 * 127 * 2 = 64770 > 32767
    from qcourse.engines.ort_int8 import cpu_has_vnni

    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    packed = tq.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]._packed_params._packed_params
    x = torch.ones(1, 2)
    for reduce_range in (True, False):
        y = float(torch.ops.quantized.linear_dynamic(x, packed, reduce_range))
        ref, parts = native.dynamic_linear_reference(x.numpy(), lin.weight.detach().numpy(), reduce_range=reduce_range)
        assert int(parts["acc"][0, 0]) == (2 * 127 * 127 if reduce_range else 2 * 255 * 127)
        if reduce_range or cpu_has_vnni():
            assert y == pytest.approx(float(ref[0, 0]), rel=1e-6)
        else:   # 16-bit pair sums (vpmaddubsw) saturate at 32767
            assert y == pytest.approx(32767 * parts["s_x"] * parts["s_w"], rel=1e-6)


def test_dynamic_linear_reference_without_bias():
    w = np.array([[1.0, -0.5], [0.25, 2.0]], dtype=np.float32)
    x = np.array([[0.0, 1.0], [2.0, -1.0]], dtype=np.float32)
    y, parts = native.dynamic_linear_reference(x, w, None, reduce_range=False)
    # weights: step 2/127.5, codes w / step; input [-1, 2]: step 3/255, zero point 85
    assert parts["zp_x"] == 85 and np.array_equal(parts["q_w"], [[64, -32], [16, 127]])
    assert np.allclose(y, x @ w.T, atol=3 * parts["s_x"] * 2)


# ------------------------------------------------------------------ eager mode wrapper
def test_quant_stubbed_marks_the_int8_boundary():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.rand(32, 1, 6, 6)
    ref = net(x)
    wrapped = native.QuantStubbed(net).eval()
    wrapped.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(wrapped, inplace=True)
    wrapped(x)
    tq.convert(wrapped, inplace=True)
    assert type(wrapped.quant).__name__ == "Quantize" and type(wrapped.dequant).__name__ == "DeQuantize"
    out = wrapped(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------ data and training
def test_upscale_digits():
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(native.upscale_digits(x, 8), x.repeat(1, 3, 1, 1))   # same size: the image itself
    const = torch.full((2, 1, 8, 8), 0.75)
    up = native.upscale_digits(const, 16)
    assert up.shape == (2, 3, 16, 16) and torch.allclose(up, torch.tensor(0.75))
    with pytest.raises(ValueError, match="expected grey images"):
        native.upscale_digits(torch.rand(2, 3, 8, 8))


def _separable(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 2, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_fit_learns_deterministically_and_calls_back():
    x, y = _separable()
    runs, calls = [], []
    for _ in range(2):
        torch.manual_seed(123)
        m = nn.Linear(2, 2)
        native.fit(m, x, y, epochs=3, lr=0.2, seed=7, after_epoch=lambda e, mod: calls.append(e))
        runs.append(m.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert calls == [0, 1, 2, 0, 1, 2]
    assert (m(x).argmax(1) == y).float().mean() > 0.9     # a line through the origin separates them
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        native.fit(m, x, y, epochs=0, lr=0.1)


# ------------------------------------------------------------------ sizes
def _saved_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


def test_model_size_kb_counts_the_state():
    lin = nn.Linear(256, 256)
    size = native.model_size_kb(lin)
    assert size * 1024 == _saved_bytes(lin.state_dict())
    assert 4 * 257 * 256 <= size * 1024 < 4 * 257 * 256 + 4096      # float32 weights + bias + framing


def test_model_size_kb_of_a_pt2e_graph_ignores_the_float_weights_it_no_longer_reads():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    lin = nn.Sequential(nn.Linear(256, 256)).eval()
    x = torch.randn(8, 256)
    gm = prepare_pt2e(torch.export.export(lin, (x,)).module(),
                      X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    gm(x)
    gm = convert_pt2e(gm)
    state = gm.state_dict()
    assert any(v.dtype == torch.float32 and v.numel() == 256 * 256 for v in state.values())   # still attached
    int8 = [v for v in state.values() if v.dtype == torch.int8]
    assert sum(v.numel() for v in int8) == 256 * 256
    size = native.model_size_kb(gm) * 1024
    assert 256 * 256 <= size < 256 * 256 + 4 * 256 + 8192          # int8 weights + float bias + scales, framing
    assert size < _saved_bytes(state) / 3


# ------------------------------------------------------------------ table and figure
ROWS = {"FP32": {"accuracy": 0.94, "size_kb": 100.0, "latency_ms": 8.0},
        "int8": {"accuracy": 0.93, "size_kb": 25.0, "latency_ms": 2.0}}


def test_format_results():
    text = native.format_results(ROWS, reference="FP32")
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["variant", "accuracy"] and "smaller" in lines[0]
    assert lines[3].split() == ["int8", "0.9300", "25.0", "2.00", "4.00x", "4.00x"]
    assert "smaller" not in native.format_results(ROWS)
    with pytest.raises(ValueError, match="reference 'nope' is not a row"):
        native.format_results(ROWS, reference="nope")


def test_plot_results_draws_the_numbers():
    fig = native.plot_results(ROWS, title="t")
    for key in ("accuracy", "size_kb", "latency_ms"):
        bars = [p.get_width() for ax in fig.axes for p in ax.patches if p.get_gid() == key]
        assert bars == [ROWS[n][key] for n in ROWS]
    with pytest.raises(ValueError, match="rows is empty"):
        native.plot_results({})
