"""Lessons 5-8's application: YOLOv7 and YOLOv7-tiny with COCO data (layer 3).

* :mod:`qcourse.yolo.models` — the architectures (official layer names), safe loading of
  official checkpoints and qcourse's own format;
* :mod:`qcourse.yolo.datasets` — COCO layout loading, and the synthetic shapes dataset that
  the embedded default is trained on;
* :mod:`qcourse.yolo.postprocess` — NMS with the official evaluation's semantics;
* :mod:`qcourse.yolo.evaluate` — COCO mAP with pycocotools;
* :mod:`qcourse.yolo.loss`, :mod:`qcourse.yolo.train` — the YOLOv7 loss and training loop.

It builds on the toolkit and the techniques; nothing below it imports it (ARCHITECTURE.md).
"""
from pathlib import Path

__all__ = ["default_checkpoint"]


def default_checkpoint() -> Path:
    """The shipped embedded-default checkpoint, ``data/yolov7_tiny_shapes.pt`` (lessons 5-8).

    YOLOv7-tiny trained by ``qcourse train`` on the synthetic shapes dataset; ``data/README.md``
    gives the command that made it.
    """
    here = Path(__file__).resolve().parents[2] / "data" / "yolov7_tiny_shapes.pt"
    if not here.is_file():
        raise FileNotFoundError(f"the default checkpoint {here} is missing; pass --weights PATH "
                                "or train one with `qcourse train`")
    return here
