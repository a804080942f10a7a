"""Lessons 5-8 — turning YOLO head outputs into detections.

A YOLOv7 ``Detect`` head in eval mode returns ``pred`` of shape ``(batch, anchors, 5 + nc)``:
``cx, cy, w, h`` (box centre and size in pixels of the network input), the sigmoid
objectness and ``nc`` sigmoid class scores. This module turns that into per-image
detections the way the official YOLOv7 evaluation does, using torchvision's kernels:

* :func:`non_max_suppression` — confidence ``obj * cls``, multi-label candidates for
  evaluation, class-aware NMS (``torchvision.ops.batched_nms``), at most ``max_det``
  detections per image. Output rows are ``x1, y1, x2, y2, conf, class``.
* :func:`scale_boxes` — maps boxes from the letterboxed network input back to the pixels
  of the original image (the inverse of :func:`qcourse.yolo.datasets.letterbox`).
* Box-format helpers built on ``torchvision.ops.box_convert``: ``cxcywh`` (YOLO), ``xyxy``
  (corners, NMS) and ``xywh`` (COCO: top-left corner plus size).

Lesson 5 (PTQ), 6 (sensitivity), 7 (QAT) and 8 (engines) evaluate every model through
:func:`qcourse.yolo.evaluate.evaluate`, which calls these functions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.ops import batched_nms, box_convert

__all__ = [
    "non_max_suppression",
    "scale_boxes",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def _as_float_tensor(boxes: ArrayLike) -> torch.Tensor:
    t = boxes if isinstance(boxes, torch.Tensor) else torch.as_tensor(np.asarray(boxes))
    if not t.is_floating_point():
        t = t.float()
    if t.ndim < 1 or t.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 numbers in the last dimension, got shape {tuple(t.shape)}")
    return t


def _convert(boxes: ArrayLike, in_fmt: str, out_fmt: str) -> torch.Tensor:
    t = _as_float_tensor(boxes)
    shape = t.shape
    return box_convert(t.reshape(-1, 4), in_fmt, out_fmt).reshape(shape)


def cxcywh_to_xyxy(boxes: ArrayLike) -> torch.Tensor:
    """``(..., 4)`` centre/size boxes (YOLO's ``xywh``) -> corner boxes ``x1, y1, x2, y2``."""
    return _convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: ArrayLike) -> torch.Tensor:
    """``(..., 4)`` corner boxes -> centre/size boxes ``cx, cy, w, h``."""
    return _convert(boxes, "xyxy", "cxcywh")


def xywh_to_xyxy(boxes: ArrayLike) -> torch.Tensor:
    """``(..., 4)`` COCO boxes ``x, y, w, h`` (top-left corner and size) -> ``x1, y1, x2, y2``."""
    return _convert(boxes, "xywh", "xyxy")


def xyxy_to_xywh(boxes: ArrayLike) -> torch.Tensor:
    """``(..., 4)`` corner boxes -> COCO boxes ``x, y, w, h`` (top-left corner and size)."""
    return _convert(boxes, "xyxy", "xywh")


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def non_max_suppression(
    pred,
    conf_thres: float = 0.001,
    iou_thres: float = 0.65,
    max_det: int = 300,
    multi_label: bool = True,
    classes: Optional[Sequence[int]] = None,
    agnostic: bool = False,
    max_nms: int = 30000,
) -> List[torch.Tensor]:
    """Non-maximum suppression with the semantics of the official YOLOv7 code.

    Args:
        pred: ``(batch, anchors, 5 + nc)`` tensor (or numpy array) of ``cx, cy, w, h, obj,
            cls_0 .. cls_{nc-1}`` — or the ``(pred, raw)`` tuple a YOLO model returns in
            eval mode (its first element is used). Boxes are in input-image pixels.
        conf_thres: an anchor is a candidate when ``obj > conf_thres``; a (box, class) pair
            is kept when ``obj * cls > conf_thres``. 0.001 is the official mAP setting.
        iou_thres: boxes of the same class overlapping a higher-scoring box with IoU
            ``> iou_thres`` are removed. 0.65 is the official mAP setting.
        max_det: at most this many detections per image, highest confidence first.
        multi_label: every class whose confidence passes becomes its own detection
            (evaluation mode); otherwise only the best class of each box. Ignored
            (single label) when ``nc == 1``, as in the official code.
        classes: keep only these class indices.
        agnostic: suppress across classes (one NMS for all).
        max_nms: at most this many highest-confidence candidates enter NMS.

    Returns:
        A list with one ``(n, 6)`` float32 tensor per image: ``x1, y1, x2, y2, conf, cls``,
        sorted by decreasing confidence, on the device of ``pred``.
    """
    pred = _checked_pred(pred)
    conf_thres = _check_unit("conf_thres", conf_thres)
    iou_thres = _check_unit("iou_thres", iou_thres)
    if int(max_det) < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    if int(max_nms) < 1:
        raise ValueError(f"max_nms must be >= 1, got {max_nms}")
    nc = pred.shape[2] - 5
    multi_label = bool(multi_label) and nc > 1
    class_filter = None
    if classes is not None:
        class_filter = torch.as_tensor(list(classes), dtype=torch.float32, device=pred.device)

    output = []
    for x in pred:
        det = _candidates(x, conf_thres, multi_label, class_filter)
        if det.shape[0] > max_nms:
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        groups = torch.zeros_like(det[:, 5], dtype=torch.int64) if agnostic else det[:, 5].long()
        keep = batched_nms(det[:, :4], det[:, 4], groups, iou_thres)[: int(max_det)]
        output.append(det[keep])
    return output


def _checked_pred(pred) -> torch.Tensor:
    """The ``(batch, anchors, 5 + nc)`` float tensor inside whatever a model returned."""
    if isinstance(pred, (tuple, list)):
        if not pred:
            raise ValueError("pred is an empty tuple/list; expected a (batch, anchors, 5 + nc) tensor")
        pred = pred[0]
    if isinstance(pred, np.ndarray):
        pred = torch.from_numpy(pred)
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a tensor or numpy array, got {type(pred).__name__}")
    if pred.ndim != 3 or pred.shape[2] < 6:
        raise ValueError(
            f"pred must have shape (batch, anchors, 5 + nc) with nc >= 1, got {tuple(pred.shape)}")
    return pred.float()


def _candidates(x: torch.Tensor, conf_thres: float, multi_label: bool, class_filter) -> torch.Tensor:
    """One image's ``(n, 6)`` candidates ``x1, y1, x2, y2, conf, cls`` that pass the threshold."""
    x = x[x[:, 4] > conf_thres]              # objectness first: cheap, and removes most anchors
    scores = x[:, 5:] * x[:, 4:5]            # conf = obj * cls, as the official code
    box = box_convert(x[:, :4], "cxcywh", "xyxy")
    if multi_label:                          # every passing class is its own detection (mAP mode)
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        det = torch.cat((box[i], scores[i, j, None], j[:, None].float()), 1)
    else:
        conf, j = scores.max(1, keepdim=True)
        det = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
    if class_filter is not None:
        det = det[(det[:, 5:6] == class_filter).any(1)]
    return det


def clip_boxes(boxes: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Clip ``(n, 4)`` xyxy boxes to an image of ``shape = (height, width)`` pixels (new tensor)."""
    h, w = shape
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def scale_boxes(
    boxes: ArrayLike,
    orig_shape: Tuple[int, int],
    ratio: Union[float, Tuple[float, float]],
    pad: Tuple[float, float],
    clip: bool = True,
) -> torch.Tensor:
    """Map xyxy boxes from the letterboxed input back to the original image.

    The letterbox (see :func:`qcourse.yolo.datasets.letterbox`) maps an original pixel
    coordinate ``x`` to ``x * ratio + pad_x`` (and ``y`` to ``y * ratio + pad_y``); this is
    the inverse: ``(x - pad_x) / ratio``.

    Args:
        boxes: ``(n, 4)`` boxes ``x1, y1, x2, y2`` in letterboxed-input pixels.
        orig_shape: ``(height, width)`` of the original image in pixels.
        ratio: the letterbox resize gain (a float, or ``(gain_x, gain_y)``).
        pad: ``(pad_x, pad_y)`` — pixels of padding added on the left and on the top.
        clip: clip the result to the original image.

    Returns:
        A new ``(n, 4)`` float tensor of xyxy boxes in original-image pixels.
    """
    b = _as_float_tensor(boxes).reshape(-1, 4).clone()
    rx, ry = (ratio, ratio) if np.isscalar(ratio) else (float(ratio[0]), float(ratio[1]))
    if rx <= 0 or ry <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    px, py = float(pad[0]), float(pad[1])
    b[:, 0::2] = (b[:, 0::2] - px) / rx
    b[:, 1::2] = (b[:, 1::2] - py) / ry
    if clip:
        b = clip_boxes(b, (int(orig_shape[0]), int(orig_shape[1])))
    return b
