"""A typical pytorch_quantization script (calibrate with histograms, compute amax, export),
run on qcourse with only its first line changed. CI runs it (tests/test_compat.py).

    python examples/pytorch_quantization_script.py [OUT.onnx]
"""
import qcourse; qcourse.alias_as("pytorch_quantization")   # the only line that differs
import sys
import torch
import pytorch_quantization
from pytorch_quantization import nn as quant_nn
from pytorch_quantization import calib, quant_modules
from pytorch_quantization.tensor_quant import QuantDescriptor

OUT = sys.argv[1] if len(sys.argv) > 1 else "model.onnx"
torch.manual_seed(0)
quant_desc_input = QuantDescriptor(calib_method="histogram")
quant_nn.QuantConv2d.set_default_quant_desc_input(quant_desc_input)
quant_nn.QuantLinear.set_default_quant_desc_input(quant_desc_input)
quant_modules.initialize()
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 4))
quant_modules.deactivate()
data = [torch.randn(4, 3, 16, 16) for _ in range(4)]

def collect_stats(model, data):
    for name, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            if module._calibrator is not None:
                module.disable_quant()
                module.enable_calib()
            else:
                module.disable()
    for x in data:
        model(x)
    for name, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            if module._calibrator is not None:
                module.enable_quant()
                module.disable_calib()
            else:
                module.enable()

def compute_amax(model, **kwargs):
    for name, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            if module._calibrator is not None:
                if isinstance(module._calibrator, calib.MaxCalibrator):
                    module.load_calib_amax()
                else:
                    module.load_calib_amax(**kwargs)
            print(f"{name:40}: {module}")

with torch.no_grad():
    collect_stats(model, data)
    compute_amax(model, method="percentile", percentile=99.99)

with pytorch_quantization.enable_onnx_export():
    torch.onnx.export(model, data[0], OUT, opset_version=13, input_names=["input"])

import numpy as np, onnxruntime as ort
sess = ort.InferenceSession(OUT, providers=["CPUExecutionProvider"])
got = sess.run(None, {"input": data[0].numpy()})[0]
np.testing.assert_allclose(got, model(data[0]).detach().numpy(), atol=1e-5)
print("OK")
