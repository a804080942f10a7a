"""qcourse — a hands-on course on INT8 quantization for TensorRT.

The package re-implements the parts of NVIDIA's ``pytorch_quantization`` that the course
teaches, under the same names, so the lessons read like the real tool::

    from qcourse import tensor_quant, calib, quant_modules
    from qcourse import nn as quant_nn

Lesson map (each lesson's subject lives in one module):

1. quantization math ........ ``qcourse.tensor_quant`` (affine vs symmetric), ``qcourse.plots``
2. tensor_quant ............. ``qcourse.tensor_quant``
3. TensorQuantizer .......... ``qcourse.nn``, ``qcourse.quant_modules``, ``qcourse.export``
4. calibrators .............. ``qcourse.calib``, ``qcourse.workflow``
5-8. YOLOv7 PTQ/QAT/engines . ``qcourse.models``, ``qcourse.datasets``, ``qcourse.evaluate``
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "tensor_quant", "nn", "calib", "quant_modules", "export", "workflow", "plots",
    "models", "datasets", "evaluate", "postprocess", "engine", "cli", "digits", "course", "train",
    "viewer",
}


def __getattr__(name):
    # lazy submodules: ``import qcourse; qcourse.calib`` works without importing everything
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'qcourse' has no attribute {name!r}")
