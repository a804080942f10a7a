"""qcourse — a hands-on course on INT8 quantization for TensorRT.

The package re-implements the parts of NVIDIA's ``pytorch_quantization`` that the course
teaches, under the same names, so the lessons read like the real tool::

    from qcourse import tensor_quant, calib, quant_modules
    from qcourse import nn as quant_nn

The package is four layers, each importing only from those below (ARCHITECTURE.md):

1. the toolkit (lessons 1-4) ... ``utils``, ``tensor_quant``, ``calib``, ``nn``,
   ``quant_modules``, ``export``, ``workflow``
2. techniques (lessons 5-8) .... model-agnostic PTQ, sensitivity, QAT and engines
3. the application ............. ``qcourse.yolo``: YOLOv7 models, COCO data, mAP, training
4. course glue ................. ``qcourse.course``: the ``qcourse`` command, the course run,
   the digits model, plots, the netron viewer
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "utils", "tensor_quant", "nn", "calib", "quant_modules", "export", "workflow", "yolo", "course",
}


def __getattr__(name):
    # lazy submodules: ``import qcourse; qcourse.calib`` works without importing everything
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'qcourse' has no attribute {name!r}")
