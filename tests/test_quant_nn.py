"""TensorQuantizer and the quantized layers, against numpy fake quantization + torch ops."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcourse import calib
from qcourse import nn as quant_nn
from qcourse.tensor_quant import QuantDescriptor

from oracles import np_quant


def ref_fq(x, amax, **kw):
    return torch.from_numpy(np_quant(x.detach().numpy(), np.asarray(amax, np.float32), **kw)[1])


# ------------------------------------------------------------------ TensorQuantizer
def test_fixed_amax_forward_matches_reference():
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=1.5))
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q(x), ref_fq(x, 1.5, narrow_range=False))


def test_dynamic_amax_per_tensor_and_per_channel():
    x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    q = quant_nn.TensorQuantizer()
    assert not q.has_amax
    assert torch.equal(q(x), ref_fq(x, x.abs().max(), narrow_range=False))
    qc = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(qc(x), ref_fq(x, amax, narrow_range=False))


def test_switches():
    x = torch.randn(100)
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=0.5))
    q.disable()
    assert q(x) is x
    q.enable()
    q.disable_quant()
    assert torch.equal(q(x), x)
    q.enable_quant()
    assert not torch.equal(q(x), x)


def test_calibration_mode_collects_and_passes_through():
    q = quant_nn.TensorQuantizer()
    q.disable_quant()
    q.enable_calib()
    xs = [torch.randn(50, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]
    for x in xs:
        assert torch.equal(q(x), x)
    q.disable_calib()
    q.enable_quant()
    amax = q.load_calib_amax()
    assert float(amax) == pytest.approx(max(float(x.abs().max()) for x in xs))
    assert float(q.amax) == float(amax)


def test_load_calib_amax_without_data_raises():
    q = quant_nn.TensorQuantizer()
    with pytest.raises(RuntimeError, match="no data"):
        q.load_calib_amax()


def test_histogram_quantizer_needs_method():
    q = quant_nn.TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(10000, generator=torch.Generator().manual_seed(3)))
    a = q.load_calib_amax(method="percentile", percentile=99.0)
    assert 2.0 < float(a) < 3.2


def test_amax_state_dict_roundtrip_into_fresh_quantizer():
    q = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    q.amax = torch.tensor([[1.0], [2.0], [0.5]])
    sd = q.state_dict()
    assert "_amax" in sd
    fresh = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    assert not fresh.has_amax
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.amax, q.amax)
    x = torch.randn(3, 7)
    assert torch.equal(fresh(x), q(x))


def test_amax_validation():
    q = quant_nn.TensorQuantizer()
    with pytest.raises(ValueError, match=">= 0"):
        q.amax = -0.5
    with pytest.raises(ValueError, match="NaN"):
        q.amax = float("nan")
    with pytest.raises(TypeError, match="QuantDescriptor"):
        quant_nn.TensorQuantizer({"num_bits": 8})


def test_repr_is_readable():
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=2.64))
    r = repr(q)
    assert "8bit" in r and "amax=2.6400" in r and "per-tensor" in r and "MaxCalibrator" in r
    q.disable()
    assert "disabled" in repr(q)


def test_learn_amax_gets_gradient():
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=1.0, learn_amax=True))
    assert isinstance(q._amax, nn.Parameter)
    x = torch.tensor([-2.0, 0.3, 3.0])
    q(x).sum().backward()
    assert float(q._amax.grad) == pytest.approx(-1.0 + 1.0)
    q._amax.grad = None
    (q(x) * torch.tensor([1.0, 1.0, 5.0])).sum().backward()
    assert float(q._amax.grad) == pytest.approx(4.0)


def test_init_learn_amax_after_calibration():
    q = quant_nn.TensorQuantizer()
    q.amax = 2.0
    q.init_learn_amax()
    assert isinstance(q._amax, nn.Parameter) and float(q.amax) == 2.0
    assert "_amax" in dict(q.named_parameters())


def test_real_quant_returns_codes():
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=1.0, fake_quant=False))
    codes = q(torch.tensor([1.0, -1.0, 0.5]))
    assert codes.tolist() == [127.0, -127.0, 64.0]


# ------------------------------------------------------------------ layers
def _calibrate(layer, x):
    layer.input_quantizer.amax = x.abs().max() * 0.9  # clip a little so clipping is exercised
    w = layer.weight
    axis = layer.weight_quantizer.axis
    dims = tuple(d for d in range(w.dim()) if d != axis)
    layer.weight_quantizer.amax = w.detach().abs().amax(dim=dims, keepdim=True)


LAYERS = [
    (quant_nn.QuantConv1d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (2, 3, 11), F.conv1d,
     dict(padding=1)),
    (quant_nn.QuantConv2d, dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, groups=1), (2, 3, 9, 9),
     F.conv2d, dict(stride=2)),
    (quant_nn.QuantConv3d, dict(in_channels=2, out_channels=4, kernel_size=2), (1, 2, 5, 5, 5), F.conv3d, {}),
    (quant_nn.QuantConvTranspose1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2), (2, 3, 7),
     F.conv_transpose1d, dict(stride=2)),
    (quant_nn.QuantConvTranspose2d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
     (2, 3, 6, 6), F.conv_transpose2d, dict(stride=2, padding=1)),
    (quant_nn.QuantConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2), (1, 2, 4, 4, 4),
     F.conv_transpose3d, {}),
    (quant_nn.QuantLinear, dict(in_features=7, out_features=4), (5, 7), F.linear, {}),
]


@pytest.mark.parametrize("cls,kwargs,shape,fn,fkw", LAYERS, ids=[c[0].__name__ for c in LAYERS])
def test_weighted_layers_bit_identical(cls, kwargs, shape, fn, fkw):
    torch.manual_seed(0)
    layer = cls(**kwargs)
    x = torch.randn(*shape)
    _calibrate(layer, x)
    w = layer.weight.detach()
    axis = layer.weight_quantizer.axis
    assert axis == (1 if "Transpose" in cls.__name__ else 0)
    fq_x = ref_fq(x, layer.input_quantizer.amax, narrow_range=False)
    fq_w = ref_fq(w, layer.weight_quantizer.amax, narrow_range=False)
    expected = fn(fq_x, fq_w, layer.bias, **fkw)
    assert torch.equal(layer(x), expected)
    # and it is a drop-in: the float class with the same state gives the float result
    base = cls.__mro__[[issubclass(c, nn.Module) and not issubclass(c, quant_nn.QuantInputMixin)
                        for c in cls.__mro__].index(True)]
    flt = base(**kwargs)
    missing, unexpected = flt.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and all("_quantizer" in k for k in unexpected)


POOLS = [
    (quant_nn.QuantMaxPool1d, (2,), (2, 3, 8), F.max_pool1d),
    (quant_nn.QuantMaxPool2d, (2,), (2, 3, 8, 8), F.max_pool2d),
    (quant_nn.QuantMaxPool3d, (2,), (1, 2, 4, 4, 4), F.max_pool3d),
    (quant_nn.QuantAvgPool1d, (2,), (2, 3, 8), F.avg_pool1d),
    (quant_nn.QuantAvgPool2d, (2,), (2, 3, 8, 8), F.avg_pool2d),
    (quant_nn.QuantAvgPool3d, (2,), (1, 2, 4, 4, 4), F.avg_pool3d),
    (quant_nn.QuantAdaptiveAvgPool1d, (3,), (2, 3, 8), F.adaptive_avg_pool1d),
    (quant_nn.QuantAdaptiveAvgPool2d, ((2, 3),), (2, 3, 8, 8), F.adaptive_avg_pool2d),
    (quant_nn.QuantAdaptiveAvgPool3d, (2,), (1, 2, 4, 4, 4), F.adaptive_avg_pool3d),
]


@pytest.mark.parametrize("cls,args,shape,fn", POOLS, ids=[p[0].__name__ for p in POOLS])
def test_pooling_quantizes_input_only(cls, args, shape, fn):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    layer = cls(*args, quant_desc_input=QuantDescriptor(amax=1.2))
    assert torch.equal(layer(x), fn(ref_fq(x, 1.2, narrow_range=False), *args))
    assert not hasattr(layer, "_weight_quantizer")


def test_custom_descriptors_and_class_defaults():
    d = QuantDescriptor(num_bits=4, calib_method="histogram")
    conv = quant_nn.QuantConv2d(3, 4, 3, quant_desc_input=d)
    assert conv.input_quantizer.num_bits == 4
    assert isinstance(conv.input_quantizer.calibrator, calib.HistogramCalibrator)
    assert conv.weight_quantizer.axis == 0
    old = quant_nn.QuantLinear.default_quant_desc_input
    try:
        quant_nn.QuantLinear.set_default_quant_desc_input(d)
        assert quant_nn.QuantLinear(3, 2).input_quantizer.num_bits == 4
        assert quant_nn.QuantConv2d(3, 4, 3).input_quantizer.num_bits == 8  # other classes untouched
    finally:
        quant_nn.QuantLinear.set_default_quant_desc_input(old)
    with pytest.raises(TypeError, match="quant_desc_input"):
        quant_nn.QuantConv2d(3, 4, 3, quant_desc_input="int8")


def test_from_float_keeps_weights_and_leaves_original_alone():
    conv = nn.Conv2d(3, 4, 3)
    q = quant_nn.QuantConv2d.from_float(conv)
    assert q.weight is conv.weight
    assert "_input_quantizer" not in conv._modules
    x = torch.randn(1, 3, 6, 6)
    q.input_quantizer.disable()
    q.weight_quantizer.disable()
    assert torch.equal(q(x), conv(x))
    with pytest.raises(TypeError, match="Conv2d"):
        quant_nn.QuantConv2d.from_float(nn.Linear(2, 2))


def test_custom_layers_share_one_quantizer():
    add = quant_nn.QuantAdd(QuantDescriptor(amax=1.0))
    x, y = torch.randn(10), torch.randn(10)
    assert torch.equal(add(x, y), ref_fq(x, 1.0, narrow_range=False) + ref_fq(y, 1.0, narrow_range=False))
    cat = quant_nn.QuantConcat(dim=0, quant_desc=QuantDescriptor(amax=2.0))
    assert torch.equal(cat([x, y]), torch.cat([ref_fq(x, 2.0, narrow_range=False),
                                               ref_fq(y, 2.0, narrow_range=False)]))
    madd = quant_nn.QuantMultiAdd()
    assert madd._weight_quantizer.axis == 1
    w = torch.randn(2, 3, 4)
    out = madd(w, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert out.shape == (2, 3, 4)


# ------------------------------------------------------------------ silent wrong results (adversarial)
def test_axis_out_of_range_raises_instead_of_wrapping():
    q = quant_nn.TensorQuantizer(QuantDescriptor(axis=3))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        q(torch.randn(4, 5))
    q.disable_quant()
    q.enable_calib()
    with pytest.raises(ValueError, match="axis"):
        q(torch.randn(4, 5))   # the calibrators refuse it too


def test_inf_amax_from_a_state_dict_is_refused_at_load():
    q = quant_nn.TensorQuantizer()
    with pytest.raises(ValueError, match="_amax.*finite"):
        q.load_state_dict({"_amax": torch.tensor(float("inf"))})
    assert not q.has_amax


@pytest.mark.parametrize("desc, bad", [
    (QuantDescriptor(), torch.ones(3)),                         # per-tensor given 3 values
    (QuantDescriptor(axis=0), torch.ones(4, 3, 1, 1)),          # non-channel dim not 1
])
def test_wrong_shape_amax_from_a_state_dict_is_refused_at_load(desc, bad):
    q = quant_nn.TensorQuantizer(desc)
    with pytest.raises(ValueError, match="_amax"):
        q.load_state_dict({"_amax": bad})


def test_calibrated_amax_shape_cannot_be_swapped_by_a_state_dict():
    q = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    q.amax = torch.ones(4, 1, 1, 1)
    with pytest.raises(ValueError, match="cannot replace"):
        q.load_state_dict({"_amax": torch.ones(8, 1, 1, 1)})
    assert q.amax.shape == (4, 1, 1, 1)


def test_good_state_dict_still_loads():
    src = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    src.amax = torch.arange(1.0, 5.0).reshape(4, 1, 1, 1)
    dst = quant_nn.TensorQuantizer(QuantDescriptor(axis=0))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.amax, src.amax)


def test_dynamic_and_calibrated_amax_get_no_gradient():
    x = torch.tensor([-2.0, 0.3, 3.0], requires_grad=True)
    q = quant_nn.TensorQuantizer()            # dynamic: amax = max|x| from the batch
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=1.0))
    x.grad = None
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]
    assert not any(p.requires_grad for p in q.parameters())


# ------------------------------------------------------------------ instance norm, scale, export readiness
def test_instance_norm_from_float_keeps_parameters():
    m = nn.InstanceNorm2d(3, affine=True)
    q = quant_nn.QuantInstanceNorm2d.from_float(m, QuantDescriptor(amax=1.0))
    assert q.weight is m.weight and q.input_quantizer.amax == 1.0
    x = torch.randn(2, 3, 4, 4)
    _, xq, _ = np_quant(x.numpy(), 1.0, narrow_range=False)
    torch.testing.assert_close(q(x), F.instance_norm(torch.from_numpy(xq), weight=m.weight, bias=m.bias))


def test_scale_of_a_fake_quantizer_comes_from_its_amax():
    q = quant_nn.TensorQuantizer(QuantDescriptor(amax=[2.0, 4.0], axis=0))
    assert q.scale.tolist() == [63.5, 31.75] and q.maxbound == 127


def test_export_readiness_check_only_under_the_switch():
    q = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=(4, 3), axis=0, amax=[[1.0], [2.0]]))
    x = torch.randn(2, 3)
    q(x)                                   # training and evaluation: per-channel FP8 runs
    quant_nn.TensorQuantizer._enable_onnx_export = True
    try:
        with pytest.raises(ValueError, match="per tensor"):
            q(x)
    finally:
        quant_nn.TensorQuantizer._enable_onnx_export = False
