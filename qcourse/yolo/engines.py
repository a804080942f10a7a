"""Lesson 8 — the YOLOv7 side of engines: the default model's ONNX files, and engine mAP.

:mod:`qcourse.engines` knows nothing about YOLOv7; this module feeds it the embedded
default (the fused YOLOv7-tiny checkpoint quantized as lesson 5 does it, calibrated on
training images, detection head ``model.77.m`` left in float as NVIDIA leaves ``model.105``) and scores an engine's
detections with :func:`qcourse.yolo.evaluate.evaluate` like any model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch

from qcourse import export
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset
from qcourse.yolo.evaluate import evaluate

__all__ = ["HEAD_IGNORE", "default_models", "export_default_onnx", "evaluate_engine", "calibration_batches"]

#: the detection head's convs stay float: boxes in pixels and scores share no good scale
HEAD_IGNORE = (r"model\.77\.m\..*",)


def default_models(calib_batches: int = 4, method: str = "max", img_size: int = 160, batch_size: int = 32,
                   root=None, rules: bool = True):
    """``(fp32, fake_quant)``: the fused default checkpoint and its calibrated quantized copy.

    Lesson 5's PTQ (:func:`qcourse.yolo.ptq.quantize`): histogram input calibrators,
    per-channel weights, the head in float and, with ``rules``, TensorRT's placement rules
    (Concat / MaxPool neighbours share one quantizer). ``calib_batches`` batches of the train
    split, amax by ``method``. The ties matter for the ORT INT8 engine too: with them every
    Concat's inputs share its scale, so the rewrite re-quantizes nothing there.
    """
    from qcourse import ptq
    from qcourse.yolo import ptq as yolo_ptq

    torch.manual_seed(0)
    fp32 = yolo_ptq.load_float_model().eval()
    root = root or ensure_default_dataset(progress=False)
    loader = create_dataloader(root, "train", img_size=img_size, batch_size=batch_size)
    fq, _info = yolo_ptq.quantize(fp32, ignore=list(HEAD_IGNORE), rules=rules)
    ptq.calibrate(fq, loader, calib_batches, progress=False)
    ptq.load_amax(fq, method)
    return fp32, fq.eval()


def export_default_onnx(out_dir: Union[str, Path], img_size: int = 160, **calib) -> Dict[str, Path]:
    """Export the default model to ``out_dir/fp32.onnx`` and ``out_dir/qdq.onnx`` (dynamic batch).

    ``qdq.onnx`` is the TensorRT-style graph (Q/DQ on conv inputs and weights), what
    ``qcourse build`` turns into INT8 engines. Returns ``{"fp32": path, "qdq": path, "models": (fp32, fq)}``.
    """
    out_dir = Path(out_dir)
    fp32, fq = default_models(img_size=img_size, **calib)
    example = torch.zeros(1, 3, img_size, img_size)
    return {"fp32": export.export_onnx(fp32, example, out_dir / "fp32.onnx"),
            "qdq": export.export_onnx(fq, example, out_dir / "qdq.onnx"), "models": (fp32, fq)}


def calibration_batches(img_size: int = 160, batches: int = 4, batch_size: int = 32, root=None,
                        split: str = "train"):
    """The first ``batches`` batches of ``split`` as float32 arrays (N, 3, img_size, img_size).

    What ``build_engine(..., calibration=...)`` takes to calibrate the outputs of the three
    Convs before the float head (:func:`qcourse.engines.ort_int8.calibration_targets`):
    training images, as for the model's own calibration.
    """
    if batches < 1:
        raise ValueError(f"calibration needs at least one batch, got batches={batches}")
    root = root or ensure_default_dataset(progress=False)
    loader = create_dataloader(root, split, img_size=int(img_size), batch_size=batch_size)
    out = []
    for imgs, *_ in loader:
        out.append(imgs.numpy().astype("float32", copy=False))
        if len(out) == batches:
            break
    return out


def evaluate_engine(engine, img_size: Optional[int] = None, batch_size: int = 32, root=None, split: str = "val",
                    max_batches: Optional[int] = None, matches: bool = False) -> Dict[str, object]:
    """COCO mAP of an engine's (or any callable's) detections on the default dataset's ``split``.

    ``img_size`` defaults to the engine's input height (160 for the default model). ``matches``:
    also return the per-image match table (see :func:`qcourse.yolo.evaluate.evaluate`).
    """
    size = img_size or (getattr(engine, "image_shape", (None, None))[1]) or 160
    root = root or ensure_default_dataset(progress=False)
    loader = create_dataloader(root, split, img_size=int(size), batch_size=batch_size)
    return evaluate(engine, loader, progress=False, max_batches=max_batches, matches=matches)
