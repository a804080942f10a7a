"""YOLOv7 and YOLOv7-tiny for lessons 5-8 (PTQ, sensitivity analysis, QAT, engines).

The architectures match the official WongKinYiu/yolov7 training configurations module for
module and parameter for parameter, so official ``state_dict`` keys load strictly and layer
names in sensitivity tables read like the course's (``model.104``, ``model.37``, ...)::

    from qcourse.yolo import models
    net = models.yolov7_tiny(nc=80)            # fresh model, training mode
    net = models.load_checkpoint("yolov7.pt")  # official or qcourse checkpoint, FP32, eval
    pred, raw = net(images)                    # eval: pred (N, anchors, 5 + nc), xywh in pixels
    models.save_checkpoint(net, "mine.pt", img_size=640)

Modules: :mod:`.configs` (layer lists), :mod:`.common` (blocks), :mod:`.yolo` (heads,
``Model``), :mod:`.checkpoint` (restricted unpickler, qcourse checkpoint format).
"""
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    detect_architecture,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .common import (
    MP,
    SP,
    SPPCSPC,
    Concat,
    Conv,
    ImplicitA,
    ImplicitM,
    RepConv,
    fuse_conv_and_bn,
)
from .configs import ARCHITECTURES, YOLOV7, YOLOV7_TINY, get_config, identify_architecture
from .yolo import Detect, IDetect, Model, UnsupportedArchitectureError, build_model

__all__ = [
    "yolov7",
    "yolov7_tiny",
    "load_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "build_model",
    "detect_architecture",
    "get_config",
    "identify_architecture",
    "ARCHITECTURES",
    "YOLOV7",
    "YOLOV7_TINY",
    "Model",
    "Detect",
    "IDetect",
    "Conv",
    "Concat",
    "MP",
    "SP",
    "SPPCSPC",
    "RepConv",
    "ImplicitA",
    "ImplicitM",
    "fuse_conv_and_bn",
    "CheckpointError",
    "UnsafeCheckpointError",
    "StateDictMismatchError",
    "UnsupportedArchitectureError",
    "FORMAT",
    "FORMAT_VERSION",
]


def yolov7(nc: int = 80, names=None) -> Model:
    """YOLOv7 (``cfg/training/yolov7.yaml``): 106 layers, RepConv 102-104, IDetect at 105.

    ``nc`` classes (37,622,682 parameters for nc=80); ``names`` optional list of nc class
    names. Returns a freshly initialised model in training mode (official initialisation).
    """
    return build_model(get_config("yolov7", nc), names=names)


def yolov7_tiny(nc: int = 80, names=None) -> Model:
    """YOLOv7-tiny (``cfg/training/yolov7-tiny.yaml``): 78 layers, LeakyReLU(0.1), IDetect at 77.

    ``nc`` classes (6,228,762 parameters for nc=80); ``names`` optional list of nc class
    names. Returns a freshly initialised model in training mode (official initialisation).
    """
    return build_model(get_config("yolov7-tiny", nc), names=names)
