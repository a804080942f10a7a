"""qcourse as a drop-in for pytorch_quantization: its documented API, used as its users do.

Every test imports through the one-line shim (``qcourse.alias_as("pytorch_quantization")``)
and checks the result against an independent oracle: numpy, torch's own kernels or ONNX
Runtime.
"""
import io
import logging
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcourse
from oracles import np_quant

qcourse.alias_as("pytorch_quantization")

import pytorch_quantization  # noqa: E402
from pytorch_quantization import calib, quant_modules, tensor_quant  # noqa: E402
from pytorch_quantization import nn as quant_nn  # noqa: E402
from pytorch_quantization.optim import helper  # noqa: E402
from pytorch_quantization.tensor_quant import QuantDescriptor  # noqa: E402
from pytorch_quantization.utils import quant_logging, reduce_amax  # noqa: E402


# ------------------------------------------------------------------ the shim
def test_the_shim_gives_the_same_objects_under_both_names():
    from pytorch_quantization.nn.modules import _utils
    from pytorch_quantization.nn.modules.quant_conv import QuantConv2d
    from pytorch_quantization.nn.modules.tensor_quantizer import TensorQuantizer
    import pytorch_quantization.utils.quant_logging as ql

    assert TensorQuantizer is qcourse.nn.TensorQuantizer and QuantConv2d is qcourse.nn.QuantConv2d
    assert _utils.QuantMixin is qcourse.nn.QuantMixin and ql is quant_logging
    assert pytorch_quantization.enable_onnx_export is quant_modules.enable_onnx_export
    qcourse.alias_as("pytorch_quantization")   # twice is harmless
    with pytest.raises(ModuleNotFoundError):
        __import__("pytorch_quantization.no_such_module")


# ------------------------------------------------------------------ utils
@pytest.mark.parametrize("axis,keepdims", [(None, True), (0, True), (1, False), ((0, 2), True),
                                           ((1, 2, 3), False), ((-1,), True)])
def test_reduce_amax_matches_numpy(axis, keepdims):
    x = torch.randn(4, 3, 5, 2)
    ours = reduce_amax(x, axis=axis, keepdims=keepdims)
    theirs = np.max(np.abs(x.numpy()), axis=axis, keepdims=keepdims if axis is not None else False)
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_reduce_amax_exclude_axis_keeps_the_channel():
    w = torch.randn(6, 3, 3, 3)
    ours = reduce_amax(w, exclude_axis=0)
    np.testing.assert_array_equal(ours.numpy(), np.abs(w.numpy()).max(axis=(1, 2, 3), keepdims=True))
    assert reduce_amax(torch.randn(5, requires_grad=True), axis=0).requires_grad is False


@pytest.mark.parametrize("kwargs,match", [(dict(axis=4), "out of range"), (dict(axis=(0, -4)), "same dim"),
                                          (dict(axis=0, exclude_axis=1), "not both"), (dict(axis="0"), "axis")])
def test_reduce_amax_errors_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reduce_amax(torch.ones(2, 3, 4, 5), **kwargs)


def test_quant_logging_reset_logger_handler():
    root = logging.getLogger()
    saved = list(root.handlers)
    root.addHandler(logging.NullHandler())
    try:
        quant_logging.reset_logger_handler()
        assert root.handlers == []
    finally:
        for h in saved:
            root.addHandler(h)


# ------------------------------------------------------------------ optim.helper
def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(quant_nn.QuantConv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               quant_nn.QuantLinear(4 * 6 * 6, 5))


def test_group_parameters_feed_an_optimizer():
    net = _net()
    groups = helper.group_parameters(net, [["^0\\."], ["^3\\.weight"]], lrs=[0.1, 0.01], momentums=[0.9, 0.0])
    opt = torch.optim.SGD(groups, lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.0]
    assert opt.param_groups[0]["params"][0] is net[0].weight and len(opt.param_groups[1]["params"]) == 1
    assert list(helper.match_parameters(net, ["bias", "^0"])) == [net[0].weight, net[0].bias, net[3].bias]


@pytest.mark.parametrize("call,exc,match", [
    (lambda n: helper.group_parameters(n, ["weight"]), TypeError, "list of lists"),
    (lambda n: helper.group_parameters(n, [["weight"], ["0.weight"]]), ValueError, "exclusive"),
    (lambda n: helper.group_parameters(n, [["weight"]], lrs=[0.1, 0.2]), ValueError, "lrs"),
    (lambda n: list(helper.match_parameters(n, "weight")), TypeError, "single pattern"),
    (lambda n: helper.freeze_parameters(n, ["("]), ValueError, "invalid regex"),
])
def test_optim_helper_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_net())


def test_freeze_parameters():
    net = _net()
    assert helper.freeze_parameters(net, ["bias"]) == ["0.bias", "3.bias"]
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, False]


def test_quant_weight_inplace_puts_weights_on_the_grid():
    net = _net()
    w = net[0].weight.detach().numpy().copy()
    amax = np.abs(w).max(axis=(1, 2, 3), keepdims=True)
    assert helper.quant_weight_inplace(net) == ["0", "3"]
    _, expected, _ = np_quant(w, amax, 8, unsigned=False, narrow_range=False)
    np.testing.assert_array_equal(net[0].weight.detach().numpy(), expected)
    before = net[3].weight.detach().clone()
    helper.quant_weight_inplace(net)        # already on the grid: nothing moves
    assert torch.equal(net[3].weight.detach(), before)


# ------------------------------------------------------------------ calibrate_weights
def _np_percentile_amax(w, percentile, bins):
    """The documented rule, written in numpy: cdf of a [0, max] histogram, first edge past p."""
    hist, edges = np.histogram(w, bins=bins, range=(0, w.max()))
    cdf = np.cumsum(hist / hist.sum())
    return edges[np.searchsorted(cdf, percentile / 100)]


def test_calibrate_weights_percentile_per_channel():
    net = _net()
    calib.calibrate_weights(net, method="percentile", perchannel=True, percentile=99.0, num_bins=256)
    w = np.abs(net[0].weight.detach().numpy())
    expected = [_np_percentile_amax(w[c], 99.0, 256) for c in range(4)]
    np.testing.assert_allclose(net[0].weight_quantizer.amax.flatten().numpy(), expected, rtol=1e-6)
    assert net[0].weight_quantizer.amax.shape == (4, 1, 1, 1)


def test_calibrate_weights_max_and_per_tensor_mse():
    net = _net()
    calib.calibrate_weights(net, method="max")
    np.testing.assert_array_equal(net[3].weight_quantizer.amax.numpy(),
                                  np.abs(net[3].weight.detach().numpy()).max(axis=1, keepdims=True))
    calib.calibrate_weights(net, method="mse", perchannel=False)
    a = float(net[0].weight_quantizer.amax)
    assert a.__class__ is float and 0 < a <= float(net[0].weight.detach().abs().max())


def test_calibrate_weights_errors():
    net = _net()
    with pytest.raises(ValueError, match="entropy"):
        calib.calibrate_weights(net, method="entropy")
    per_tensor = torch.nn.Sequential(quant_nn.QuantLinear(3, 2, quant_desc_weight=QuantDescriptor()))
    with pytest.raises(ValueError, match="perchannel=False"):
        calib.calibrate_weights(per_tensor)


# ------------------------------------------------------------------ quant_modules
def test_replacement_helper_protocol_of_the_reference():
    helper_ = quant_modules.QuantModuleReplacementHelper()
    original = torch.nn.Linear
    helper_.prepare_state(["Linear"], [(torch.nn, "Linear", quant_nn.QuantLinear)])
    helper_.apply_quant_modules()
    helper_.apply_quant_modules()          # twice: the originals are still known
    try:
        assert type(torch.nn.Linear(2, 3)) is quant_nn.QuantLinear   # custom map wins
        assert type(torch.nn.Conv2d(2, 3, 1)) is quant_nn.QuantConv2d
    finally:
        helper_.restore_float_modules()
    assert torch.nn.Linear is original and torch.nn.Conv2d is not quant_nn.QuantConv2d
    helper_.prepare_state(float_module_list=["LSTM"])   # a reference name qcourse never patches


def test_initialize_from_the_top_level_and_twice():
    pytorch_quantization.quant_modules.initialize()
    pytorch_quantization.quant_modules.initialize()
    pytorch_quantization.quant_modules.deactivate()
    assert torch.nn.Conv2d.__module__.startswith("torch.")


def test_instance_norm_quantizes_its_input():
    for cls, shape, fn in [(quant_nn.QuantInstanceNorm1d, (2, 3, 7), F.instance_norm),
                           (quant_nn.QuantInstanceNorm2d, (2, 3, 5, 4), F.instance_norm),
                           (quant_nn.QuantInstanceNorm3d, (2, 3, 3, 4, 2), F.instance_norm)]:
        m = cls(3, affine=True, quant_desc_input=QuantDescriptor(amax=2.0))
        x = torch.randn(shape) * 2
        _, xq, _ = np_quant(x.numpy(), 2.0, 8, unsigned=False, narrow_range=False)
        expected = fn(torch.from_numpy(xq), weight=m.weight, bias=m.bias, eps=m.eps)
        torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="quant_desc_weight"):
        quant_nn.QuantInstanceNorm2d(3, quant_desc_weight=QuantDescriptor())


# ------------------------------------------------------------------ validation the reference does
@pytest.mark.parametrize("make", [
    lambda d: quant_nn.QuantLinear(3, 2, quant_desc_input=d),
    lambda d: quant_nn.QuantConv2d(3, 2, 1, quant_desc_weight=d),
    lambda d: quant_nn.QuantAvgPool2d(2, quant_desc_input=d),
    lambda d: quant_nn.QuantMaxPool2d.set_default_quant_desc_input(d),
])
def test_layers_refuse_real_quantization(make):
    with pytest.raises(ValueError, match="fake_quant=False"):
        make(QuantDescriptor(fake_quant=False))


def test_pooling_refuses_a_weight_descriptor():
    with pytest.raises(TypeError, match="quant_desc_weight"):
        quant_nn.QuantAdaptiveAvgPool2d(1, quant_desc_weight=QuantDescriptor())


# ------------------------------------------------------------------ descriptors
@pytest.mark.parametrize("desc", [
    QuantDescriptor(),
    QuantDescriptor(num_bits=4, name="w4", axis=(0,), amax=[1.0, 2.5], unsigned=True),
    QuantDescriptor(axis=(1, 2), calib_method="histogram", narrow_range=True, fake_quant=False),
    QuantDescriptor(num_bits=(4, 3), amax=3.0, learn_amax=True, scale_amax=0.5),
])
def test_descriptor_yaml_round_trip(desc):
    import yaml

    text = desc.to_yaml()
    assert QuantDescriptor.from_yaml(text) == desc
    assert yaml.safe_load(text)["num_bits"] in (8, 4, [4, 3])   # plain YAML, no python tags


def test_descriptor_equality_compares_every_field():
    assert QuantDescriptor(axis=0, amax=[1.0]) == QuantDescriptor(axis=[0], amax=np.array([1.0]))
    assert QuantDescriptor(name="a") != QuantDescriptor(name="b")
    assert QuantDescriptor(amax=1.0) != QuantDescriptor(amax=1.5)
    assert QuantDescriptor() != "QuantDescriptor()"
    with pytest.raises(ValueError, match="mapping"):
        QuantDescriptor.from_yaml("- 8\n")


# ------------------------------------------------------------------ FP8 E4M3
def _np_e4m3(v):
    """Round float32 values to E4M3 (nearest, ties to even code, saturating at 448): numpy only."""
    codes = np.arange(127)                                   # 0x00..0x7e; 0x7f is NaN
    e, m = codes >> 3, codes & 7
    grid = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    a = np.minimum(np.abs(v).astype(np.float64), 448.0)
    hi = np.clip(np.searchsorted(grid, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (np.sign(v) * grid[pick]).astype(np.float32)


def test_fp8_fake_quant_matches_a_numpy_e4m3():
    x = torch.cat([torch.randn(5000) * 3, torch.tensor([100.0, -100.0, 0.0, 1e-9])])
    amax = 4.0
    step = np.float32(amax) / np.float32(448)
    expected = _np_e4m3(x.numpy() / step) * step
    np.testing.assert_array_equal(tensor_quant.fake_tensor_quant(x, torch.tensor(amax), (4, 3)).numpy(), expected)
    np.testing.assert_array_equal(tensor_quant.scaled_e4m3(x, torch.tensor(amax)).numpy(), expected)
    q = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=(4, 3), amax=amax))
    np.testing.assert_array_equal(q(x).numpy(), expected)
    assert q.maxbound == 448


def test_fp8_errors_name_the_fix():
    with pytest.raises(ValueError, match="signed"):
        QuantDescriptor(num_bits=(4, 3), unsigned=True)
    with pytest.raises(ValueError, match="E5M2"):
        QuantDescriptor(num_bits=(5, 2))
    cal = calib.HistogramCalibrator(num_bits=(4, 3))
    cal.collect(torch.randn(1000))
    with pytest.raises(ValueError, match="mse"):
        cal.compute_amax("entropy")
    assert 0 < float(cal.compute_amax("mse")) <= 5


def _ort(model, x, opset):
    import onnxruntime as ort

    f = io.BytesIO()
    with pytorch_quantization.enable_onnx_export():
        torch.onnx.export(model, (x,), f, opset_version=opset)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return f.getvalue(), sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_fp8_exports_as_opset_19_quantize_linear():
    import onnx

    q = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=(4, 3), amax=4.0))
    x = torch.randn(2000) * 3
    x[:2] = torch.tensor([1000.0, -1000.0])
    data, out = _ort(torch.nn.Sequential(q), x, 19)
    np.testing.assert_array_equal(out, q(x).numpy())
    zp = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "QuantizeLinear"]
    assert len(zp) == 1
    with pytest.raises(Exception, match="opset 19"):
        _ort(torch.nn.Sequential(q), x, 17)


# ------------------------------------------------------------------ export as the reference's users do
def test_enable_onnx_export_runs_in_onnx_runtime_and_restores_state():
    torch.manual_seed(0)
    net = _net()
    net[0].input_quantizer.amax = 3.0
    net[3].input_quantizer.amax = 2.0
    calib.calibrate_weights(net, method="max")
    x = torch.randn(2, 3, 8, 8)
    _, out = _ort(net, x, 13)
    np.testing.assert_allclose(out, net(x).detach().numpy(), atol=1e-5)
    assert quant_nn.TensorQuantizer._enable_onnx_export is False


def test_enable_onnx_export_refuses_an_uncalibrated_quantizer():
    export = torch.onnx.export
    with pytest.raises(RuntimeError, match="calibrated"):
        _ort(torch.nn.Sequential(quant_nn.TensorQuantizer()), torch.randn(4), 13)
    assert quant_nn.TensorQuantizer._enable_onnx_export is False and torch.onnx.export is export


# ------------------------------------------------------------------ scales as the reference returns them
def test_tensor_quant_returns_codes_and_scale_in_the_input_dtype():
    x = torch.tensor([0.5, -1.0, 2.0])
    codes, scale = tensor_quant.tensor_quant(x, torch.tensor(2.0))
    assert scale.dtype == torch.float32 and float(scale) == 127 / 2
    np.testing.assert_array_equal(codes.numpy(), np_quant(x.numpy(), 2.0)[0])
    codes, scale = tensor_quant.tensor_quant(x.half(), torch.tensor(2.0))
    assert scale.dtype == torch.float16 and codes.dtype == torch.float16
    with pytest.raises(ValueError, match="overflows"):
        tensor_quant.tensor_quant(x.half(), torch.tensor(1e-4))


def test_real_quantizer_reports_the_scale_it_used():
    q = quant_nn.TensorQuantizer(QuantDescriptor(fake_quant=False))      # dynamic amax
    x = torch.tensor([0.25, -4.0, 1.0])
    codes = q(x)
    assert float(q.scale) == pytest.approx(127 / 4.0)
    np.testing.assert_allclose((codes / q.scale).numpy(), x.numpy(), atol=0.5 / q.scale.item())


# ------------------------------------------------------------------ a typical script, import line changed
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch_quantization_script.py"


def test_a_typical_pytorch_quantization_script_runs_unchanged(tmp_path):
    # a fresh interpreter: the script changes class defaults, as real scripts do
    run = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "model.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("OK")
    assert "HistogramCalibrator" in run.stdout
