"""Lessons 5-8 — detection data: a COCO-format loader and the course's synthetic dataset.

* :mod:`qcourse.yolo.datasets.coco` — :class:`CocoDetection` (letterbox, targets, caching,
  augmentation; the annotation file is checked on load and a broken one raises
  :class:`CocoFormatError`; an image that cannot be read, or lies outside the image folder,
  :class:`CocoImageError`), :func:`create_dataloader`, :func:`collate_fn` and the 80-class
  COCO id mapping (:data:`COCO80_TO_91`, :func:`coco91_to_80`).
* :mod:`qcourse.yolo.datasets.synthetic` — :func:`make_synthetic_coco` writes a deterministic
  shapes dataset in COCO layout; :func:`ensure_default_dataset` creates (once) the
  default that lessons 5-8 train, calibrate and evaluate on.
* :func:`dataset_splits` — where a run's images come from: COCO's train2017/val2017 under a
  given root, or the synthetic default's train/val.
"""
from pathlib import Path
from typing import Optional, Tuple

from .coco import (
    COCO80_NAMES,
    COCO80_TO_91,
    COCO91_TO_80,
    CocoDetection,
    CocoFormatError,
    CocoImageError,
    EpochSampler,
    LetterboxInfo,
    coco80_to_91,
    coco91_to_80,
    collate_fn,
    create_dataloader,
    letterbox,
)
from .synthetic import (
    CLASSES,
    DEFAULT_PARAMS,
    default_dataset_root,
    ensure_default_dataset,
    make_synthetic_coco,
    render_image,
    verify_synthetic_coco,
)

__all__ = [
    "COCO80_NAMES",
    "COCO80_TO_91",
    "COCO91_TO_80",
    "CocoDetection",
    "CocoFormatError",
    "CocoImageError",
    "EpochSampler",
    "LetterboxInfo",
    "coco80_to_91",
    "coco91_to_80",
    "collate_fn",
    "create_dataloader",
    "letterbox",
    "CLASSES",
    "DEFAULT_PARAMS",
    "default_dataset_root",
    "ensure_default_dataset",
    "make_synthetic_coco",
    "render_image",
    "verify_synthetic_coco",
    "dataset_splits",
]


def dataset_splits(coco=None, progress: bool = False) -> Tuple[Path, str, str]:
    """``(root, train split, val split)``: ``coco``'s train2017/val2017, or (``coco`` None) the
    synthetic default's train/val, created on first use."""
    if coco:
        return Path(coco), "train2017", "val2017"
    return Path(ensure_default_dataset(progress=progress)), "train", "val"

