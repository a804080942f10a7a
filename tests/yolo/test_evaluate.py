"""Tests for qcourse.yolo.postprocess (NMS, box helpers) and qcourse.yolo.evaluate (COCO mAP).

Oracles: a numpy greedy NMS written here, hand-computed IoUs, and pycocotools' COCOeval
called directly on hand-written detections.
"""
import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from qcourse.yolo.datasets import CLASSES, create_dataloader, make_synthetic_coco
from qcourse.yolo.evaluate import STAT_NAMES, evaluate
from qcourse.yolo.postprocess import (
    cxcywh_to_xyxy,
    non_max_suppression,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


# ----------------------------------------------------------------------------- NMS
def _iou_np(box, boxes):
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _greedy(boxes, scores, thr):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            ious = _iou_np(boxes[i], boxes[order])
            order = [o for o, v in zip(order, ious) if v <= thr]
    return keep


def _reference_nms(pred, conf, iou, multi_label, classes=None, agnostic=False, max_det=300):
    out = []
    for x in pred.astype(np.float64):
        x = x[x[:, 4] > conf]
        boxes = np.stack([x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2,
                          x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2], 1)
        scores = x[:, 5:] * x[:, 4:5]
        rows = []
        for a in range(len(x)):
            cands = range(scores.shape[1]) if multi_label else [int(np.argmax(scores[a]))]
            for c in cands:
                if scores[a, c] > conf and (classes is None or c in classes):
                    rows.append([*boxes[a], scores[a, c], c])
        rows = np.asarray(rows).reshape(-1, 6)
        kept = []
        groups = [None] if agnostic else sorted(set(rows[:, 5]))
        for g in groups:
            sel = np.flatnonzero(rows[:, 5] == g) if g is not None else np.arange(len(rows))
            kept += [sel[k] for k in _greedy(rows[sel, :4], rows[sel, 4], iou)]
        res = rows[kept]
        res = res[np.argsort(-res[:, 4], kind="stable")][:max_det]
        out.append(res)
    return out


def _random_pred(seed, batch=3, anchors=150, nc=4):
    rng = np.random.default_rng(seed)
    p = np.zeros((batch, anchors, 5 + nc), np.float32)
    p[..., :2] = rng.uniform(0, 100, (batch, anchors, 2))
    p[..., 2:4] = rng.uniform(4, 40, (batch, anchors, 2))
    p[..., 4:] = rng.uniform(0, 1, (batch, anchors, 1 + nc))
    return p


@pytest.mark.parametrize("kw", [
    dict(multi_label=True),
    dict(multi_label=False),
    dict(multi_label=True, classes=[0, 2]),
    dict(multi_label=False, agnostic=True),
    dict(multi_label=True, max_det=7),
])
def test_nms_matches_numpy_greedy_reference(kw):
    p = _random_pred(sum(map(ord, str(kw))))
    conf, iou = 0.2, 0.45
    got = non_max_suppression(torch.from_numpy(p), conf, iou, **kw)
    want = _reference_nms(p, conf, iou, **kw)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape and len(w) > 3
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-4)


def test_nms_official_semantics_by_hand():
    # two boxes of class 0 with IoU 0.6 (kept at 0.65, merged at 0.5), one of class 1 on top
    pred = torch.tensor([[
        [50, 50, 20, 20, 0.9, 1.0, 0.0],    # A: class 0, conf 0.9
        [55, 50, 20, 20, 0.8, 1.0, 0.0],    # B: IoU(A, B) = 15*20 / (800 - 300) = 0.6
        [50, 50, 20, 20, 0.5, 0.0, 1.0],    # C: same box, class 1
        [10, 10, 5, 5, 0.0005, 1.0, 1.0],   # objectness below conf_thres: dropped
        [80, 80, 6, 6, 0.5, 0.5, 0.3],      # multi-label: two detections, conf 0.25 and 0.15
    ]])
    d = non_max_suppression(pred, 0.001, 0.65)[0]
    assert d[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.5, 0.25, 0.15])
    assert d[:, 5].tolist() == [0, 0, 1, 0, 1]
    assert d[0, :4].tolist() == [40, 40, 60, 60]
    d = non_max_suppression(pred, 0.001, 0.55)[0]  # 0.6 > 0.55: B is suppressed by A
    assert d[:, 4].tolist() == pytest.approx([0.9, 0.5, 0.25, 0.15])
    d = non_max_suppression(pred, 0.001, 0.65, multi_label=False)[0]
    assert d[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.5, 0.25])
    # tuple (pred, raw) and numpy inputs behave the same
    t = non_max_suppression((pred, None), 0.001, 0.65)[0]
    n = non_max_suppression(pred.numpy(), 0.001, 0.65)[0]
    assert torch.equal(t, n)
    with pytest.raises(ValueError, match="iou_thres"):
        non_max_suppression(pred, 0.001, 1.5)
    with pytest.raises(ValueError, match="5 \\+ nc"):
        non_max_suppression(torch.zeros(2, 10, 5))


def test_box_helpers():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert xyxy_to_cxcywh(xyxy).tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert cxcywh_to_xyxy([[20.0, 40.0, 20.0, 40.0]]).tolist() == xyxy.tolist()
    assert xyxy_to_xywh(xyxy).tolist() == [[10.0, 20.0, 20.0, 40.0]]
    assert xywh_to_xyxy(np.array([[10, 20, 20, 40]])).tolist() == xyxy.tolist()


# ----------------------------------------------------------------------------- fake models
def _key(img: torch.Tensor) -> str:
    return hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest()


class GroundTruthModel:
    """Predicts the ground truth of each image it has seen in ``loader`` (looked up by the
    image's bytes), optionally shifted by ``shift`` input pixels in x, with a deterministic
    distinct score per object."""

    def __init__(self, loader, shift=0.0, anchors=40):
        self.table = {}
        self.nc = loader.dataset.nc
        self.shift, self.anchors = float(shift), anchors
        for imgs, targets, ids, _, _ in loader:
            for i, iid in enumerate(ids):
                self.table[_key(imgs[i])] = (iid, targets[targets[:, 0] == i])

    def __call__(self, imgs):
        b, _, h, w = imgs.shape
        out = torch.zeros(b, self.anchors, 5 + self.nc)
        for i in range(b):
            iid, t = self.table[_key(imgs[i])]
            n = len(t)
            out[i, :n, 0] = t[:, 2] * w + self.shift
            out[i, :n, 1] = t[:, 3] * h
            out[i, :n, 2] = t[:, 4] * w
            out[i, :n, 3] = t[:, 5] * h
            out[i, :n, 4] = torch.from_numpy(_scores(iid, n))
            out[i, torch.arange(n), 5 + t[:, 1].long()] = 1.0
        return out, [torch.zeros(1)]  # like YOLOv7's (pred, raw)


def _scores(image_id, n):
    return np.random.default_rng(int(image_id)).uniform(0.2, 1.0, n).astype(np.float32)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsyn")
    make_synthetic_coco(root, n_train=0, n_val=16, img_size=160, seed=4, progress=False)
    return root


def test_perfect_predictions_give_map_one(syn):
    loader = create_dataloader(syn, "val", img_size=128, batch_size=5)  # resized: ratio != 1
    assert any(abs(i.ratio - 1) > 0.1 for _, _, _, _, infos in loader for i in infos)
    r = evaluate(GroundTruthModel(loader), loader, progress=True, per_class=True)
    assert r["map"] == 1.0 and r["map50"] == 1.0 and r["map75"] == 1.0
    assert r["images"] == 16
    n_gt = len(_json(syn)["annotations"])
    assert r["detections"] == n_gt
    assert set(r["per_class_map"]) == set(CLASSES)
    present = {CLASSES[a["category_id"] - 1] for a in _json(syn)["annotations"]}
    assert len(present) >= 4
    for name, v in r["per_class_map"].items():
        # pycocotools divides tp by (tp + fp + eps): a class with a single object scores
        # 1 - 2e-16 instead of 1
        assert v == pytest.approx(1.0, abs=1e-12) if name in present else np.isnan(v)
    assert set(STAT_NAMES) <= set(r)
    # the parts add up: model and NMS time over all images, plus COCOeval, fit inside the total
    parts = (r["model_ms_per_image"] + r["nms_ms_per_image"]) * r["images"] / 1e3 + r["cocoeval_s"]
    assert 0 < parts <= r["total_s"]


def test_timings_put_the_model_call_in_model_ms(syn):
    """A model that sleeps 50 ms per call: its time lands in model_ms_per_image, not in NMS."""
    loader = create_dataloader(syn, "val", img_size=160, batch_size=8)  # 16 images: 2 calls
    gt = GroundTruthModel(loader)

    def slow(imgs):
        time.sleep(0.05)
        return gt(imgs)

    r = evaluate(slow, loader, progress=False)
    assert r["images"] == 16 and r["map"] == 1.0
    sleep_ms_per_image = 2 * 50 / 16
    assert r["model_ms_per_image"] >= sleep_ms_per_image
    assert r["nms_ms_per_image"] < sleep_ms_per_image
    assert r["total_s"] >= 0.1 + r["cocoeval_s"]


def _json(root):
    return json.loads((Path(root) / "annotations" / "instances_val.json").read_text())


def test_subset_restricts_cocoeval_to_evaluated_images(syn):
    loader = create_dataloader(syn, "val", img_size=160, batch_size=4)
    model = GroundTruthModel(loader)
    r = evaluate(model, loader, max_batches=2, progress=False)
    assert r["images"] == 8
    assert r["map"] == 1.0  # images never evaluated do not count as misses


def _coco_direct(ann_file, detections, img_ids=None):
    gt = COCO(str(ann_file))
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_shifted_boxes_match_pycocotools_on_handwritten_detections(syn):
    shift = 3.0
    loader = create_dataloader(syn, "val", img_size=160, batch_size=8)  # ratio 1
    r = evaluate(GroundTruthModel(loader, shift=shift), loader, progress=False)
    raw = _json(syn)
    widths = {i["id"]: i["width"] for i in raw["images"]}
    per_image = {}
    for a in raw["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    dets = []
    for iid, anns in per_image.items():
        for a, s in zip(anns, _scores(iid, len(anns))):
            x, y, w, h = a["bbox"]
            x1, x2 = x + shift, min(x + w + shift, widths[iid])  # clipped to the image
            dets.append({"image_id": iid, "category_id": a["category_id"],
                         "bbox": [x1, y, x2 - x1, h], "score": float(s)})
    stats = _coco_direct(Path(syn) / "annotations" / "instances_val.json", dets)
    assert 0.2 < r["map"] < 0.95
    assert r["map"] == pytest.approx(stats[0], abs=1e-6)
    assert r["map50"] == pytest.approx(stats[1], abs=1e-6)
    assert r["map75"] == pytest.approx(stats[2], abs=1e-6)


@pytest.fixture()
def squares(tmp_path):
    """Three 64x64 images, each with 20x20 boxes of two classes (hand-written COCO json)."""
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    images, anns = [], []
    for k in range(3):
        name = f"{k}.png"
        Image.fromarray(np.full((64, 64, 3), 40 * k + 20, np.uint8)).save(tmp_path / "images" / "val" / name)
        images.append({"id": 10 + k, "file_name": name, "width": 64, "height": 64})
        for j, (x, y, cid) in enumerate([(5, 5, 3), (30, 36, 7)]):
            anns.append({"id": len(anns) + 1, "image_id": 10 + k, "category_id": cid,
                         "bbox": [x, y, 20, 20], "area": 400.0, "iscrowd": 0})
    cats = [{"id": 3, "name": "a", "supercategory": "s"}, {"id": 7, "name": "b", "supercategory": "s"}]
    (tmp_path / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return tmp_path


def test_hand_computed_map_for_a_known_iou(squares):
    loader = create_dataloader(squares, "val", img_size=64, batch_size=2)
    # a 4 px shift of a 20x20 box: IoU = 16*20 / (400 + 400 - 320) = 2/3, which passes
    # the thresholds 0.50, 0.55, 0.60, 0.65 and fails 0.70 .. 0.95: AP = 4/10
    r = evaluate(GroundTruthModel(loader, shift=4.0), loader, progress=False, per_class=True)
    assert r["map"] == pytest.approx(0.4, abs=1e-12)
    assert r["map50"] == 1.0 and r["map75"] == 0.0
    assert r["per_class_map"] == pytest.approx({"a": 0.4, "b": 0.4})
    r = evaluate(GroundTruthModel(loader, shift=0.0), loader, progress=False)
    assert r["map"] == 1.0


def test_module_and_numpy_callables(squares):
    loader = create_dataloader(squares, "val", img_size=64, batch_size=2)
    gt = GroundTruthModel(loader, shift=4.0)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return gt(x)

    m = Wrapped().train()
    r1 = evaluate(m, loader, progress=False)
    assert m.training  # restored
    r2 = evaluate(lambda x: gt(x)[0].numpy(), loader, progress=False)  # e.g. an ORT session
    r3 = evaluate(gt, loader.dataset, progress=False)  # a dataset is batched for us
    assert r1["map"] == r2["map"] == r3["map"] == pytest.approx(0.4, abs=1e-12)


def test_no_detections_and_bad_models(squares):
    loader = create_dataloader(squares, "val", img_size=64, batch_size=2)
    r = evaluate(lambda x: torch.zeros(x.shape[0], 10, 7), loader, progress=False, per_class=True)
    assert r["map"] == 0.0 and r["detections"] == 0 and r["per_class_map"] == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="predicts 80 classes .* 2 categories"):
        evaluate(lambda x: torch.zeros(x.shape[0], 10, 85), loader, progress=False)
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda x: torch.zeros(10, 7), loader, progress=False)
    with pytest.raises(TypeError, match="CocoDetection"):
        evaluate(lambda x: x, [1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        evaluate(lambda x: x, loader, max_batches=0, progress=False)


# ----------------------------------------------------------------------------- untrusted input (issue 20)
def _never_called(x):
    raise AssertionError("the model ran although there was nothing (or too much) to evaluate")


def test_an_annotation_file_without_images_is_an_error_not_a_map_of_zero(squares):
    ann = squares / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["images"], data["annotations"] = [], []
    ann.write_text(json.dumps(data))
    loader = create_dataloader(squares, "val", img_size=64, batch_size=2)
    with pytest.raises(ValueError) as e:
        evaluate(_never_called, loader, progress=False)
    msg = str(e.value)
    assert "no images" in msg and str(squares / "images" / "val") in msg and str(ann) in msg
    assert "annotation file" in msg and "instances_val2017.json" in msg  # the fix


def test_a_loader_that_yields_no_batch_is_an_error(squares):
    loader = create_dataloader(squares, "val", img_size=64, batch_size=4, drop_last=True)  # 3 images
    with pytest.raises(ValueError, match="no images to evaluate .* no batch of its 3 images"):
        evaluate(_never_called, loader, progress=False)


def test_a_batch_larger_than_the_memory_is_refused_before_it_is_loaded(squares, monkeypatch):
    import qcourse.utils

    monkeypatch.setattr(qcourse.utils, "available_memory", lambda: 4 << 20)  # 4 MiB: 1 MiB for a batch
    loader = create_dataloader(squares, "val", img_size=640, batch_size=1000, cache=False)  # 3 images of 4.7 MiB
    monkeypatch.setattr(loader.dataset, "load_image", lambda i: pytest.fail("an image was loaded"))
    with pytest.raises(ValueError) as e:
        evaluate(_never_called, loader, progress=False)
    msg = str(e.value)
    assert "a batch of 3 images of 640x640 pixels" in msg and "14.1 MiB" in msg and "4.0 MiB" in msg
    assert "--batch-size" in msg and "--img-size" in msg
    loader = create_dataloader(squares, "val", img_size=64, batch_size=1)  # 48 KiB: evaluated
    monkeypatch.undo()
    assert evaluate(GroundTruthModel(loader, shift=0.0), loader, progress=False)["map"] == 1.0
