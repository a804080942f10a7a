"""Automatic (patching torch.nn) and manual quantizer insertion, and the workflow helpers."""
import pytest
import torch
import torchvision
from torch import nn

from qcourse import nn as quant_nn
from qcourse import quant_modules, workflow
from qcourse.tensor_quant import QuantDescriptor

REAL_CONV2D, REAL_LINEAR = nn.Conv2d, nn.Linear


@pytest.fixture(autouse=True)
def _restore():
    yield
    quant_modules.deactivate()
    assert nn.Conv2d is REAL_CONV2D and nn.Linear is REAL_LINEAR


def test_initialize_patches_and_deactivate_restores():
    quant_modules.initialize()
    assert nn.Conv2d is quant_nn.QuantConv2d and nn.Linear is quant_nn.QuantLinear
    model = torchvision.models.resnet18(num_classes=10)
    assert isinstance(model.conv1, quant_nn.QuantConv2d)
    assert isinstance(model.fc, quant_nn.QuantLinear)
    assert isinstance(model.avgpool, quant_nn.QuantAdaptiveAvgPool2d)
    assert not isinstance(model.maxpool, quant_nn.QuantMaxPool2d)  # not patched by default
    quant_modules.deactivate()
    assert nn.Conv2d is REAL_CONV2D
    assert type(torchvision.models.resnet18().conv1) is REAL_CONV2D


def test_initialize_twice_is_safe():
    quant_modules.initialize()
    quant_modules.initialize()
    assert quant_modules.is_active()
    quant_modules.deactivate()
    assert nn.Conv2d is REAL_CONV2D and nn.Linear is REAL_LINEAR
    quant_modules.deactivate()  # and deactivating twice too
    assert nn.Conv2d is REAL_CONV2D


def test_context_manager_and_float_list():
    with quant_modules.initialize(float_module_list=["Linear"]):
        assert nn.Conv2d is quant_nn.QuantConv2d
        assert nn.Linear is REAL_LINEAR
    assert nn.Conv2d is REAL_CONV2D
    with pytest.raises(ValueError, match="Conv9d"):
        quant_modules.initialize(float_module_list=["Conv9d"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


def test_replace_modules_with_ignore_keeps_weights():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    w = model.body[0].weight
    replaced = quant_modules.replace_modules(model, ignore=[r"head$", r"stem\.0"])
    assert replaced == ["body.0", "pool"]
    assert isinstance(model.body[0], quant_nn.QuantConv2d) and model.body[0].weight is w
    assert type(model.head) is REAL_LINEAR and type(model.stem[0]) is REAL_CONV2D
    with workflow.disable_quantization(model):
        assert torch.equal(model(x), ref)
    replaced = quant_modules.replace_modules(Net(), include_maxpool=True)
    assert "stem.2" in replaced
    with pytest.raises(ValueError, match="invalid ignore pattern"):
        quant_modules.replace_modules(Net(), ignore=["("])


def _digits_loader(n=4, bs=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 1, 8, 8, generator=g), torch.zeros(bs)) for _ in range(n)]


def test_calibrate_model_max_and_histogram():
    torch.manual_seed(0)
    model = Net()
    quant_modules.replace_modules(model)
    loader = _digits_loader()
    seen = workflow.collect_stats(model, loader, num_batches=3, progress=False)
    assert seen == 3
    amaxes = workflow.compute_amax(model)
    names = list(workflow.quantizers(model))
    assert set(amaxes) == set(names)
    # the input quantizer of the first quantized conv saw the stem's output: check against it
    x_all = torch.cat([b[0] for b in loader[:3]])
    with torch.no_grad(), workflow.disable_quantization(model):  # calibration ran in float
        expected = model.stem(x_all).abs().max()
    assert float(amaxes["body.0._input_quantizer"]) == pytest.approx(float(expected))
    # all quantizers back to quantizing, none calibrating
    assert all(q.is_quant_enabled and not q.is_calib_enabled for q in workflow.quantizers(model).values())
    with pytest.raises(ValueError, match="no batch"):
        workflow.collect_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="no TensorQuantizer"):
        workflow.collect_stats(Net(), loader, progress=False)


def test_calibrate_histogram_methods_order():
    torch.manual_seed(0)
    model = Net()
    quant_modules.replace_modules(model, quant_desc_input=QuantDescriptor(calib_method="histogram"))
    loader = _digits_loader()
    workflow.collect_stats(model, loader, progress=False)
    p100 = workflow.compute_amax(model, method="max")["body.0._input_quantizer"]
    p99 = workflow.compute_amax(model, method="percentile", percentile=99.0)["body.0._input_quantizer"]
    assert float(p99) < float(p100)
    with pytest.raises(ValueError, match="method"):
        workflow.compute_amax(model, method="kl")


def test_disable_quantization_context_restores_state():
    model = Net()
    quant_modules.replace_modules(model)
    layers = workflow.quant_layers(model)
    assert list(layers) == ["stem.0", "body.0", "pool", "head"]
    model.head.input_quantizer.disable()
    with workflow.disable_quantization(model.body[0]):
        assert not model.body[0].input_quantizer.is_enabled
        assert model.pool.input_quantizer.is_enabled
    assert model.body[0].input_quantizer.is_enabled
    with workflow.enable_quantization(model):
        assert model.head.input_quantizer.is_enabled
    assert not model.head.input_quantizer.is_enabled


def test_enable_onnx_export_nests_and_restores_on_error():
    export = torch.onnx.export
    with quant_modules.enable_onnx_export():
        with quant_modules.enable_onnx_export():
            assert quant_nn.TensorQuantizer._enable_onnx_export
        assert quant_nn.TensorQuantizer._enable_onnx_export and torch.onnx.export is not export
    assert not quant_nn.TensorQuantizer._enable_onnx_export and torch.onnx.export is export
    with pytest.raises(KeyError):
        with quant_modules.enable_onnx_export():
            raise KeyError("export failed")
    assert not quant_nn.TensorQuantizer._enable_onnx_export and torch.onnx.export is export


def test_prepare_state_names_the_bad_entry():
    helper = quant_modules.QuantModuleReplacementHelper()
    with pytest.raises(ValueError, match="Conv9d"):
        helper.prepare_state(custom_map=[(nn, "Conv9d", quant_nn.QuantConv2d)])
    with pytest.raises(TypeError, match=r"\['Linear'\]"):
        helper.prepare_state("Linear")
    helper.restore_float_modules()         # nothing applied: harmless
