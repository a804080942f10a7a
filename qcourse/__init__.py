"""qcourse — a hands-on course on INT8 quantization for TensorRT.

The package re-implements the parts of NVIDIA's ``pytorch_quantization`` that the course
teaches, under the same names, so the lessons read like the real tool::

    from qcourse import tensor_quant, calib, quant_modules
    from qcourse import nn as quant_nn

The package is four layers, each importing only from those below (ARCHITECTURE.md):

1. the toolkit (lessons 1-4) ... ``utils``, ``tensor_quant``, ``calib``, ``nn``,
   ``quant_modules``, ``export``, ``workflow``, ``optim``
2. techniques (lessons 5-8) .... model-agnostic PTQ, sensitivity, QAT and engines
3. the application ............. ``qcourse.yolo``: YOLOv7 models, COCO data, mAP, training
4. course glue ................. ``qcourse.course``: the ``qcourse`` command, the course run,
   the digits model, plots, the netron viewer

Code written for ``pytorch_quantization`` runs on qcourse after one line (README, "Coming
from pytorch_quantization")::

    import qcourse; qcourse.alias_as("pytorch_quantization")
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_SUBMODULES = {
    "utils", "tensor_quant", "nn", "calib", "quant_modules", "export", "workflow", "optim", "yolo",
    "course",
}
#: names pytorch_quantization exports at its top level (``from .quant_modules import *``)
_FROM_QUANT_MODULES = {"initialize", "deactivate", "enable_onnx_export"}


def __getattr__(name):
    # lazy submodules: ``import qcourse; qcourse.calib`` works without importing everything
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FROM_QUANT_MODULES:
        return getattr(importlib.import_module(f"{__name__}.quant_modules"), name)
    raise AttributeError(f"module 'qcourse' has no attribute {name!r}")


#: reference module paths whose qcourse module has another name (the rest map one to one)
_REFERENCE_PATHS = {
    "nn.modules": "nn",
    "nn.modules.tensor_quantizer": "nn.tensor_quantizer",
    "nn.modules._utils": "nn.quant_layers",
    "nn.modules.quant_conv": "nn.quant_layers",
    "nn.modules.quant_linear": "nn.quant_layers",
    "nn.modules.quant_pooling": "nn.quant_layers",
    "nn.modules.quant_instancenorm": "nn.quant_layers",
    "calib.calibrator": "calib.base",
}


#: modules that live inside a plain module (not a package) in qcourse
_MODULES_IN_MODULES = ("utils.quant_logging",)


class _AliasLoader(importlib.abc.Loader):
    """Hands back the already-imported qcourse module: one module object under two names,
    so classes stay identical (``isinstance`` works across both spellings)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, alias: str):
        self.alias = alias

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.alias + "."):
            return None
        rest = fullname[len(self.alias) + 1:]
        real = f"{__name__}.{_REFERENCE_PATHS.get(rest, rest)}"
        if importlib.util.find_spec(real) is None:
            return None        # an unknown name fails as ModuleNotFoundError, as it should
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def alias_as(name: str = "pytorch_quantization") -> None:
    """Make ``import <name>`` and ``from <name>.nn import ...`` load qcourse (safe to call twice).

    The one-line shim for code written for NVIDIA's pytorch_quantization:
    ``import qcourse; qcourse.alias_as("pytorch_quantization")``, then its imports run unchanged.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"alias_as needs a module name such as 'pytorch_quantization', got {name!r}")
    existing = sys.modules.get(name)
    if existing is not None and existing is not sys.modules[__name__]:
        raise RuntimeError(f"a module named {name!r} is already imported ({existing!r}); "
                           "call alias_as before anything imports the real package")
    sys.modules[name] = sys.modules[__name__]
    # a module inside a plain module (utils.py) cannot be found by path: register it by name
    for sub in _MODULES_IN_MODULES:
        sys.modules[f"{name}.{sub}"] = importlib.import_module(f"{__name__}.{sub}")
    if not any(isinstance(f, _AliasFinder) and f.alias == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(name))
