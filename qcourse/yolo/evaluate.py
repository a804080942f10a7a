"""Lessons 5-8 — COCO mAP of a detector, the number every later lesson compares.

:func:`evaluate` runs a model over a :func:`qcourse.yolo.datasets.create_dataloader` loader,
applies YOLOv7's evaluation NMS (:func:`qcourse.yolo.postprocess.non_max_suppression`,
conf 0.001, IoU 0.65, multi-label), maps the boxes back to original-image pixels and to the
dataset's ``category_id`` values, and scores them with pycocotools' ``COCOeval`` — the same
procedure as the official ``test.py --save-json`` on COCO val2017. Lesson 5 uses it for
FP32 vs PTQ, lesson 6 once per layer of the sensitivity scan, lesson 7 for QAT and
lesson 8 for ONNX Runtime / TensorRT engines (any callable works, not only a torch module).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import time
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from qcourse.utils import check_memory

from .datasets.coco import CocoDetection, create_dataloader
from .intervals import match_table, no_detections_table
from .postprocess import non_max_suppression, scale_boxes

__all__ = ["evaluate", "STAT_NAMES"]

#: names of the 12 numbers pycocotools' ``COCOeval.summarize`` prints, in its order
STAT_NAMES = (
    "map", "map50", "map75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)


def _find_dataset(loader) -> CocoDetection:
    ds = loader if isinstance(loader, CocoDetection) else getattr(loader, "dataset", None)
    seen = 0
    while ds is not None and not isinstance(ds, CocoDetection) and seen < 8:
        ds = getattr(ds, "dataset", None)  # e.g. torch.utils.data.Subset
        seen += 1
    if not isinstance(ds, CocoDetection):
        raise TypeError(
            "loader must be a DataLoader over a qcourse.yolo.datasets.CocoDetection (build one with "
            f"qcourse.yolo.datasets.create_dataloader), got {type(loader).__name__}")
    return ds


def _extract_pred(out, batch: int) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("the model returned an empty tuple/list; expected predictions "
                             "of shape (batch, anchors, 5 + nc)")
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, a numpy array or a tuple whose first "
                        f"element is one; got {type(out).__name__}")
    if out.ndim != 3 or out.shape[0] != batch:
        raise ValueError(f"the model's predictions must have shape (batch={batch}, anchors, 5 + nc), "
                         f"got {tuple(out.shape)}")
    return out


def _check_args(model, loader, conf_thres, iou_thres, max_batches):
    """Refuse bad arguments before the slow model pass; returns ``(dataset, loader)``.

    A bare :class:`~qcourse.yolo.datasets.CocoDetection` is batched here (32 at a time) so that
    every caller, lesson 8's engines included, may hand over whichever it holds.
    """
    dataset = _find_dataset(loader)
    if isinstance(loader, CocoDetection):
        loader = create_dataloader(loader, batch_size=32)
    if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    for name, v in (("conf_thres", conf_thres), ("iou_thres", iou_thres)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    _check_batch_memory(dataset, loader)
    return dataset, loader


def _check_batch_memory(dataset: CocoDetection, loader) -> None:
    """Refuse a batch whose images alone would take too much of the memory, before one is loaded."""
    n = min(getattr(loader, "batch_size", None) or 1, len(getattr(loader, "dataset", dataset)))
    s = dataset.img_size
    check_memory(n * 3 * s * s * 4, f"a batch of {n} image{'s' if n != 1 else ''} of {s}x{s} pixels (float32)",
                 "evaluate smaller batches or a smaller image size (qcourse eval --batch-size, --img-size)")


def _no_images(dataset: CocoDetection, loader) -> ValueError:
    """The error for an evaluation that would see no image (its mAP would be a meaningless 0)."""
    n = len(getattr(loader, "dataset", dataset))
    if not len(dataset):
        why = f"{dataset.ann_file} lists no images"
    elif not n:
        why = "the loader's subset of it is empty"
    else:
        why = f"the loader yields no batch of its {n} images (fewer than one batch, with drop_last)"
    return ValueError(f"no images to evaluate in {dataset.img_dir}: {why}; pass a dataset whose annotation file "
                      "lists the images in its image folder (qcourse eval --coco DIR: DIR/val2017/ and "
                      "DIR/annotations/instances_val2017.json)")


@contextlib.contextmanager
def _eval_mode(model, device: torch.device):
    """Run a torch module in eval mode on ``device``, and give it back in the mode it came in.

    Lesson 7 evaluates the model it is training between QAT epochs: leaving it in eval mode
    would silently freeze its BatchNorm statistics for the rest of the run.
    """
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
        model.to(device)
    try:
        yield
    finally:
        if is_module and was_training:
            model.train()


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the model's time would land in the NMS's
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _coco_rows(det: torch.Tensor, image_id, shape, info, dataset: CocoDetection) -> np.ndarray:
    """One image's NMS output as ``loadRes`` rows ``(image_id, x, y, w, h, score, category_id)``.

    Boxes go back from the letterboxed input to original-image pixels and class indices to
    the dataset's ``category_id`` values, because COCOeval compares with the annotation file.
    Float64 so that the boxes equal what the official ``test.py`` writes to its json.
    """
    det = det.detach().to("cpu", torch.float64)
    box = scale_boxes(det[:, :4], shape, info.ratio, info.pad).numpy()
    cls = det[:, 5].numpy().astype(np.int64)
    block = np.empty((len(det), 7), dtype=np.float64)
    block[:, 0] = image_id
    block[:, 1:3] = box[:, :2]
    block[:, 3:5] = box[:, 2:] - box[:, :2]
    block[:, 5] = det[:, 4].numpy()
    block[:, 6] = np.asarray(dataset.cat_ids, dtype=np.int64)[cls]
    return block


def _predict(model, loader, dataset: CocoDetection, n_batches: int, device: torch.device, nms: Dict,
             progress: bool):
    """Run the model and NMS over the first ``n_batches`` batches, timing each apart.

    Returns ``(rows, image_ids, model seconds, NMS seconds)``: ``rows`` the per-image arrays
    of :func:`_coco_rows`, ``image_ids`` every image seen (with or without detections, since
    an image with no detection still counts against recall).
    """
    rows, image_ids, t_model, t_nms = [], [], 0.0, 0.0
    batches = itertools.islice(iter(loader), n_batches)
    for imgs, _targets, ids, shapes, infos in tqdm(batches, total=n_batches, desc="evaluate", unit="batch",
                                                   disable=None if progress else True, leave=False):
        imgs = imgs.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        out = model(imgs)
        _sync(device)
        t1 = time.perf_counter()
        pred = _extract_pred(out, imgs.shape[0])
        nc = pred.shape[2] - 5
        if nc != dataset.nc:
            raise ValueError(
                f"the model predicts {nc} classes but {dataset.ann_file} has {dataset.nc} "
                "categories; evaluate a model trained for this dataset (nc must match)")
        dets = non_max_suppression(pred, nms["conf_thres"], nms["iou_thres"], max_det=nms["max_det"],
                                   multi_label=True)
        _sync(device)
        t_model += t1 - t0
        t_nms += time.perf_counter() - t1
        for det, iid, shape, info in zip(dets, ids, shapes, infos):
            image_ids.append(int(iid))
            if det.shape[0]:
                rows.append(_coco_rows(det, iid, shape, info, dataset))
    return rows, image_ids, t_model, t_nms


def _per_class_ap(ev, dataset: CocoDetection) -> tuple:
    """Per-class AP@0.5:0.95 and AP@0.5 from COCOeval's precision array (NaN: no ground truth)."""
    precision = ev.eval["precision"]  # [iou thresholds, recall, classes, areas, max dets]
    per_map, per_map50 = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = dataset.names[dataset.cat_id_to_index[int(cat_id)]]
        p = precision[:, :, k, 0, -1]  # area "all", 100 detections, as the summary's first line
        p50 = precision[0, :, k, 0, -1]
        per_map[name] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
        per_map50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
    return per_map, per_map50


def _score(dataset: CocoDetection, detections: np.ndarray, image_ids, per_class: bool, log,
           matches: bool = False) -> Dict:
    """The COCOeval numbers (:data:`STAT_NAMES`, optionally per class) of ``detections``.

    COCOeval is restricted to the evaluated images: with ``max_batches`` the others would
    count as missed objects. pycocotools prints as it goes; that goes to ``log``.
    """
    from pycocotools.cocoeval import COCOeval

    result: Dict[str, object] = {name: 0.0 for name in STAT_NAMES}
    if not len(detections):  # loadRes refuses an empty list, and the answer is known: nothing found
        log.write("no detections: every metric is 0\n")
        if per_class:  # 0 for classes with ground truth in the evaluated images, else NaN
            gt_cats = {int(a["category_id"]) for a in dataset.coco.loadAnns(
                dataset.coco.getAnnIds(imgIds=sorted(set(image_ids)), iscrowd=False))}
            per = {n: (0.0 if cid in gt_cats else float("nan")) for n, cid in zip(dataset.names, dataset.cat_ids)}
            result["per_class_map"], result["per_class_map50"] = dict(per), dict(per)
        if matches:
            result["matches"] = no_detections_table(dataset.coco, sorted(set(image_ids)))
        return result
    with contextlib.redirect_stdout(log):
        coco_dt = dataset.coco.loadRes(detections)
        ev = COCOeval(dataset.coco, coco_dt, "bbox")
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    result.update({name: float(v) for name, v in zip(STAT_NAMES, ev.stats)})
    if matches:
        result["matches"] = match_table(ev)
    if per_class:
        result["per_class_map"], result["per_class_map50"] = _per_class_ap(ev, dataset)
    return result


def evaluate(model: Union[torch.nn.Module, Callable], loader, conf_thres: float = 0.001, iou_thres: float = 0.65,
             device: Union[str, torch.device] = "cpu", progress: bool = True, max_batches: Optional[int] = None,
             *, max_det: int = 300, per_class: bool = False, verbose: bool = False,
             matches: bool = False) -> Dict[str, object]:
    """COCO mAP of ``model`` on the dataset behind ``loader``.

    Args:
        model: a ``torch.nn.Module`` (put in eval mode and moved to ``device`` for the run;
            its training flag is restored afterwards) or any callable that maps a float32
            ``(B, 3, H, W)`` tensor with values in ``[0, 1]`` to predictions — a tensor or
            numpy array of shape ``(B, anchors, 5 + nc)`` (``cx, cy, w, h`` in input pixels,
            objectness, class scores, as YOLOv7's ``Detect`` head), or a tuple whose first
            element is that.
        loader: a loader from :func:`qcourse.yolo.datasets.create_dataloader` (or a
            :class:`~qcourse.yolo.datasets.CocoDetection`, batched 32 at a time).
        conf_thres, iou_thres: NMS settings (defaults: the official mAP settings).
        device: where the images go before calling the model.
        progress: show a tqdm bar (hidden automatically when not a terminal).
        max_batches: evaluate only the first ``max_batches`` batches; COCOeval is then
            restricted to those images.
        max_det: detections kept per image after NMS.
        per_class: also return per-class AP@0.5:0.95 and AP@0.5.
        verbose: print pycocotools' messages and summary table.
        matches: also return ``matches``, the per-image matches (a
            :class:`~qcourse.yolo.intervals.MatchTable`) from which
            :mod:`qcourse.yolo.intervals` computes bootstrap intervals without running the
            model again.

    Returns:
        A dict with ``map`` (AP@[0.5:0.95], area all, 100 detections), ``map50``, the other
        ten COCOeval numbers (:data:`STAT_NAMES`; -1 where the evaluated images have no
        ground truth in that area range), ``images`` (evaluated), ``detections`` (after
        NMS), timings ``model_ms_per_image``, ``nms_ms_per_image``, ``cocoeval_s``,
        ``total_s``, and with ``per_class=True`` the dicts ``per_class_map`` and
        ``per_class_map50`` (class name -> AP; NaN for a class with no ground truth).
    """
    t_start = time.perf_counter()
    dataset, loader = _check_args(model, loader, conf_thres, iou_thres, max_batches)
    device = torch.device(device)
    n_batches = len(loader) if max_batches is None else min(len(loader), int(max_batches))
    if n_batches == 0:
        raise _no_images(dataset, loader)
    nms = {"conf_thres": conf_thres, "iou_thres": iou_thres, "max_det": max_det}
    with _eval_mode(model, device), torch.inference_mode():
        rows, image_ids, t_model, t_nms = _predict(model, loader, dataset, n_batches, device, nms, progress)

    n_images = len(image_ids)
    detections = np.concatenate(rows, 0) if rows else np.zeros((0, 7))
    t0, log = time.perf_counter(), io.StringIO()
    result = _score(dataset, detections, image_ids, per_class, log, matches)
    if verbose:
        print(log.getvalue(), end="")
    t_eval = time.perf_counter() - t0
    # times per image, so that batch sizes and engines compare (lesson 8)
    result.update(images=n_images, detections=int(len(detections)),
                  model_ms_per_image=1e3 * t_model / max(n_images, 1),
                  nms_ms_per_image=1e3 * t_nms / max(n_images, 1),
                  cocoeval_s=t_eval, total_s=time.perf_counter() - t_start)
    return result
