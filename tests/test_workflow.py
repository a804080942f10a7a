"""qcourse.workflow: the calibration workflow around a model full of quantizers."""
import numpy as np
import pytest
import torch
from torch import nn

from qcourse import calib, workflow
from qcourse import nn as quant_nn
from qcourse.nn import Switches
from qcourse.tensor_quant import QuantDescriptor


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 12, 12, generator=g) for _ in range(n)]


def test_quantized_copy_leaves_the_model_alone_and_calibrates_the_copy():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = workflow.quantized_copy(model, _batches(), method="max")
    assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.Sequential) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(q[0], quant_nn.QuantConv2d) and not q.training
    # the input amax is the largest |x| over every batch (the independent oracle: max of the data)
    expected = max(float(b.abs().max()) for b in _batches())
    assert float(q[0]._input_quantizer.amax) == pytest.approx(expected, rel=0, abs=0)


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_quantized_copy_picks_a_histogram_calibrator_for_histogram_methods(method):
    q = workflow.quantized_copy(_cnn(), _batches(), method=method)
    quantizer = q[0]._input_quantizer
    assert isinstance(quantizer.calibrator, calib.HistogramCalibrator)
    c = quantizer.calibrator
    assert float(quantizer.amax) == pytest.approx(
        float({"entropy": calib.compute_amax_entropy, "mse": calib.compute_amax_mse,
               "percentile": calib.compute_amax_percentile}[method](c.histogram, c.bin_edges)))


def test_quantized_copy_statistics_only_and_weights_only():
    q = workflow.quantized_copy(_cnn(), _batches(), method=None)
    assert not q[0]._input_quantizer.has_amax and q[0]._input_quantizer.calibrator.compute_amax() is not None
    w = workflow.quantized_copy(_cnn(), weights_only=True,
                                quant_desc_weight=QuantDescriptor(num_bits=4, axis=0))
    assert not w[0]._input_quantizer.is_enabled and w[0]._weight_quantizer.is_enabled


def test_quantized_copy_ignore_and_bad_method():
    q = workflow.quantized_copy(_cnn(), _batches(), ignore=[r"2$"])
    assert isinstance(q[0], quant_nn.QuantConv2d) and type(q[2]) is nn.Conv2d
    with pytest.raises(ValueError, match="method must be"):
        workflow.quantized_copy(_cnn(), _batches(), method="kl")


def test_switches_round_trip_and_collect_stats_restores_them():
    q = quant_nn.TensorQuantizer()
    assert q.switches == Switches(enabled=True, quant=True, calib=False)
    q.switches = Switches(False, False, True)
    assert (q.is_enabled, q.is_quant_enabled, q.is_calib_enabled) == (False, False, True)
    with pytest.raises(TypeError, match="switches.quant"):
        q.switches = (True, 1, False)
    model = workflow.quantized_copy(_cnn())
    states = {n: qq.switches for n, qq in workflow.quantizers(model).items()}
    workflow.collect_stats(model, _batches(1))
    assert {n: qq.switches for n, qq in workflow.quantizers(model).items()} == states


def test_disable_quantization_restores_the_previous_state():
    model = workflow.quantized_copy(_cnn(), _batches())
    model[2]._weight_quantizer.disable()
    with workflow.disable_quantization(model):
        assert not any(q.is_enabled for q in workflow.quantizers(model).values())
    assert [q.is_enabled for q in workflow.quantizers(model).values()] == [True, True, True, False]


def test_calibrators_share_the_base_class():
    for cls in (calib.MaxCalibrator, calib.HistogramCalibrator):
        assert issubclass(cls, calib.Calibrator)
        with pytest.raises(ValueError, match="num_bits"):
            cls(num_bits=1)
    with pytest.raises(NotImplementedError):
        calib.Calibrator().collect(torch.ones(2))
