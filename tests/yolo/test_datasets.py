"""Tests for qcourse.yolo.datasets: the synthetic generator, the COCO loader and letterboxing.

Oracles: pixels of the written images, pycocotools' own json loader and RLE decoder, the
json read with the plain ``json`` module, and hand-written COCO folders.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from qcourse.yolo.datasets import (
    CLASSES,
    COCO80_NAMES,
    COCO80_TO_91,
    CocoDetection,
    coco80_to_91,
    coco91_to_80,
    create_dataloader,
    default_dataset_root,
    ensure_default_dataset,
    letterbox,
    make_synthetic_coco,
    verify_synthetic_coco,
)
from qcourse.yolo.datasets import synthetic
from qcourse.yolo.postprocess import scale_boxes


def _hashes(root: Path):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def syn(small_dataset):
    return small_dataset("syn", n_train=40, n_val=12, img_size=160, seed=7)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """Flat backgrounds, no clutter, no shading, PNG: object pixels are exactly known."""
    root = tmp_path_factory.mktemp("flat")
    make_synthetic_coco(root, n_train=0, n_val=30, img_size=128, seed=1, clutter=False,
                        background="flat", shading=False, image_format="png", progress=False)
    return root


# ----------------------------------------------------------------------------- generator
def test_generator_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic_coco(a, n_train=5, n_val=3, img_size=96, seed=11, progress=False)
    make_synthetic_coco(b, n_train=5, n_val=3, img_size=96, seed=11, progress=False, workers=2)
    make_synthetic_coco(c, n_train=5, n_val=3, img_size=96, seed=12, progress=False)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 5 + 3 + 2 + 1  # images, two json files, manifest
    assert ha == hb  # byte-identical, independent of the number of worker processes
    differing = [k for k in ha if k.startswith("images/") and ha[k] != hc[k]]
    assert len(differing) == 8  # another seed draws other images
    assert verify_synthetic_coco(a) and verify_synthetic_coco(a, {"seed": 11})
    assert not verify_synthetic_coco(a, {"seed": 12})


def test_json_is_valid_coco(syn):
    for split, n in (("train", 40), ("val", 12)):
        ann_file = syn / "annotations" / f"instances_{split}.json"
        coco = COCO(str(ann_file))
        raw = json.loads(ann_file.read_text())
        assert [c["name"] for c in raw["categories"]] == list(CLASSES)
        assert {c["supercategory"] for c in raw["categories"]} == {"shape"}
        assert len(coco.getImgIds()) == n
        assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
        for img in raw["images"]:
            assert set(img) >= {"id", "file_name", "width", "height"}
            path = syn / "images" / split / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
                assert im.format == "JPEG"
        for a in raw["annotations"]:
            assert a["iscrowd"] == 0
            assert 1 <= a["category_id"] <= len(CLASSES)
            x, y, w, h = a["bbox"]
            img = coco.imgs[a["image_id"]]
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert a["area"] >= 30
        sizes = {(i["width"], i["height"]) for i in raw["images"]}
        assert (160, 160) in sizes and len(sizes) > 3  # square and letterbox-worthy shapes


def test_sizes_classes_and_occlusion_are_varied(syn):
    raw = json.loads((syn / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in raw["annotations"]])
    assert (areas < 32 ** 2).sum() >= 10
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() >= 10
    assert (areas >= 96 ** 2).sum() >= 1
    assert {a["category_id"] for a in raw["annotations"]} == set(range(1, len(CLASSES) + 1))
    sides = np.array([a["bbox"][2:] for a in raw["annotations"]])
    assert sides.min() >= 4  # visible parts of occluded objects can be narrow, never tiny
    # partial occlusion happens: visible area smaller than the full box's share of the shape
    per_image = {}
    for a in raw["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    overlapping = 0
    for anns in per_image.values():
        for i, p in enumerate(anns):
            for q in anns[i + 1:]:
                px, py, pw, ph = p["bbox"]
                qx, qy, qw, qh = q["bbox"]
                if min(px + pw, qx + qw) > max(px, qx) and min(py + ph, qy + qh) > max(py, qy):
                    overlapping += 1
    assert overlapping >= 3


def test_boxes_are_tight_against_pixels(flat):
    """On flat backgrounds without clutter the object pixels are exactly the pixels that
    differ from the background, and every object is one colour."""
    coco = COCO(str(flat / "annotations" / "instances_val.json"))
    n_objects = 0
    for iid in coco.getImgIds():
        info = coco.imgs[iid]
        img = np.asarray(Image.open(flat / "images" / "val" / info["file_name"]).convert("RGB"))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid]))
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        union = np.zeros(img.shape[:2], bool)
        for m in masks:
            assert not (union & m).any()  # visible parts do not overlap
            union |= m
        bg = img[~union]
        assert (bg == bg[0]).all()  # the rest is one flat colour
        assert np.array_equal((img != bg[0]).any(-1), union)
        for a, m in zip(anns, masks):
            px = img[m]
            assert (px == px[0]).all()  # the whole visible mask is this object's colour
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            assert a["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            assert a["area"] == m.sum()
            n_objects += 1
    assert n_objects >= 40


def test_boxes_match_segmentation_default_settings(syn):
    coco = COCO(str(syn / "annotations" / "instances_val.json"))
    for a in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(a).astype(bool)
        assert mask_utils.toBbox(a["segmentation"]).tolist() == a["bbox"]
        assert m.sum() == a["area"]


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="img_size"):
        make_synthetic_coco(tmp_path / "x", img_size=16)
    with pytest.raises(ValueError, match="background"):
        make_synthetic_coco(tmp_path / "x", n_train=1, n_val=1, background="plaid")
    with pytest.raises(ValueError, match="image_format"):
        make_synthetic_coco(tmp_path / "x", n_train=1, n_val=1, image_format="gif")
    make_synthetic_coco(tmp_path / "y", n_train=1, n_val=1, img_size=64, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_coco(tmp_path / "y", n_train=1, n_val=1, img_size=64, progress=False)


def test_ensure_default_dataset_creates_reuses_and_repairs(tmp_path, monkeypatch):
    small = {"n_train": 3, "n_val": 2, "img_size": 64, "seed": 0}
    monkeypatch.setattr(synthetic, "DEFAULT_PARAMS", small)
    root = tmp_path / "cache" / "synthetic"
    assert ensure_default_dataset(root, progress=False) == root
    assert verify_synthetic_coco(root, small)
    first = root / "images" / "train" / "000000.jpg"
    stamp, digest = first.stat().st_mtime_ns, _hashes(root)
    ensure_default_dataset(root, progress=False)
    assert first.stat().st_mtime_ns == stamp  # reused, not regenerated
    first.write_bytes(b"corrupted")
    assert not verify_synthetic_coco(root)
    ensure_default_dataset(root, progress=False)
    assert _hashes(root) == digest  # regenerated identically
    other = tmp_path / "not_a_dataset"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a qcourse synthetic dataset"):
        ensure_default_dataset(other, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    monkeypatch.setenv("QCOURSE_DATA", str(tmp_path / "data"))
    assert default_dataset_root() == tmp_path / "data" / "synthetic-v1"


# ----------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("shape,new", [((120, 160), 160), ((160, 112), 160), ((90, 200), 128),
                                       ((50, 40), 96), ((128, 128), 64)])
def test_letterbox_geometry_and_round_trip(shape, new):
    rng = np.random.default_rng(sum(shape) + new)
    img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    out, info = letterbox(img, new)
    assert out.shape == (new, new, 3) and info.shape == (new, new)
    r = min(new / shape[0], new / shape[1])
    assert info.ratio == pytest.approx(r)
    uh, uw = round(shape[0] * r), round(shape[1] * r)
    left, top = info.pad
    assert (left, top) == ((new - uw) // 2, (new - uh) // 2)
    inner = np.zeros(out.shape[:2], bool)
    inner[top:top + uh, left:left + uw] = True
    assert (out[~inner] == 114).all()
    if r == 1:
        assert np.array_equal(out[inner].reshape(img.shape), img)
    # boxes: forward x*r + pad, back with scale_boxes
    x1 = rng.uniform(0, shape[1] - 5, 20)
    y1 = rng.uniform(0, shape[0] - 5, 20)
    boxes = np.stack([x1, y1, rng.uniform(x1 + 1, shape[1]), rng.uniform(y1 + 1, shape[0])], 1)
    fwd = boxes * info.ratio + np.array([left, top, left, top])
    back = scale_boxes(torch.from_numpy(fwd), shape, info.ratio, info.pad)
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-9)


def test_letterbox_auto_pads_to_stride():
    out, info = letterbox(np.zeros((100, 150, 3), np.uint8), 160, auto=True, stride=32)
    # 150 -> 160 wide, 100 -> 107 high, padded up to 128 (next multiple of 32)
    assert out.shape[:2] == (128, 160) and info.pad == (0, (128 - 107) // 2)


def test_scale_boxes_clips_to_image():
    b = scale_boxes(torch.tensor([[-10.0, 5.0, 300.0, 90.0]]), (80, 100), 2.0, (4, 6))
    assert b.tolist() == [[0.0, 0.0, 100.0, 42.0]]


# ----------------------------------------------------------------------------- loader
def test_items_match_files_and_json(syn):
    raw = json.loads((syn / "annotations" / "instances_val.json").read_text())
    by_image = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    infos = {i["id"]: i for i in raw["images"]}
    ds = CocoDetection(syn, "val", img_size=160)
    assert len(ds) == 12 and ds.nc == len(CLASSES) and ds.names == list(CLASSES)
    assert ds.cat_ids == list(range(1, len(CLASSES) + 1))
    for k in range(len(ds)):
        img, targets, iid, shape, info = ds[k]
        meta = infos[iid]
        assert img.dtype == torch.float32 and img.shape == (3, 160, 160)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert shape == (meta["height"], meta["width"])
        original = np.asarray(Image.open(syn / "images" / "val" / meta["file_name"]).convert("RGB"))
        left, top = info.pad
        crop = img[:, top:top + shape[0], left:left + shape[1]].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(crop, original / 255.0, atol=1e-6)  # ratio 1: unchanged
        pad_rows = torch.cat([img[:, :top], img[:, top + shape[0]:]], 1)
        torch.testing.assert_close(pad_rows, torch.full_like(pad_rows, 114 / 255))
        # targets -> original boxes == json boxes
        anns = by_image.get(iid, [])
        assert targets.shape == (len(anns), 6) and (targets[:, 0] == 0).all()
        assert targets[:, 1].tolist() == [a["category_id"] - 1 for a in anns]
        t = targets[:, 2:].double() * 160
        xyxy = torch.cat([t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2], 1)
        back = scale_boxes(xyxy, shape, info.ratio, info.pad)
        want = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                              a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float64)
        torch.testing.assert_close(back, want.reshape(-1, 4), atol=1e-3, rtol=0)


def test_resized_items_and_collate(syn):
    loader = create_dataloader(syn, "val", img_size=96, batch_size=5, cache=False)
    ds = loader.dataset
    seen = 0
    for imgs, targets, ids, shapes, infos in loader:
        assert imgs.shape == (len(ids), 3, 96, 96)
        assert targets.shape[1] == 6
        for i, (iid, shape, info) in enumerate(zip(ids, shapes, infos)):
            assert info.ratio == pytest.approx(96 / max(shape))
            rows = targets[targets[:, 0] == i]
            assert len(rows) == len(ds.labels_xyxy(ds.image_ids.index(iid)))
        seen += len(ids)
    assert seen == 12 and len(loader) == 3


def test_augmentation_is_deterministic_and_flips(syn):
    def first_batch(**kw):
        loader = create_dataloader(syn, "train", 160, batch_size=8, augment=True, **kw)
        return next(iter(loader)), loader

    (a, _), (b, _) = first_batch(seed=5), first_batch(seed=5)
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c, _ = first_batch(seed=6)
    assert a[2] != c[2]  # another seed, another order
    _, loader = first_batch(seed=5)
    order0 = [i for i, _ in loader.sampler]
    order1 = [i for i, _ in loader.sampler]
    assert order0 != order1 and sorted(order0) == sorted(order1)  # new order each epoch
    ds = loader.dataset
    assert not torch.equal(ds[(3, 0)][0], ds[(3, 1)][0])  # new augmentation each epoch
    assert torch.equal(ds[(3, 1)][0], ds[(3, 1)][0])
    # pure flip: flip_lr=1 without colour jitter mirrors image and boxes exactly
    plain = CocoDetection(syn, "train", 160)
    flip = CocoDetection(syn, "train", 160, augment=True, flip_lr=1.0, hsv=(0, 0, 0))
    for k in range(5):
        x, tx, *_ = plain[k]
        y, ty, *_ = flip[k]
        assert torch.equal(y, x.flip(-1))
        torch.testing.assert_close(ty[:, 2], 1 - tx[:, 2])
        torch.testing.assert_close(ty[:, 3:], tx[:, 3:])
    # colour jitter changes pixels but not geometry
    hsv = CocoDetection(syn, "train", 160, augment=True, flip_lr=0.0)
    x, tx, *_ = plain[0]
    z, tz, *_ = hsv[0]
    assert not torch.equal(x, z) and torch.equal(tx, tz)


# ----------------------------------------------------------------------------- real COCO
def test_coco80_mapping():
    assert len(COCO80_TO_91) == 80 == len(COCO80_NAMES) == len(set(COCO80_TO_91))
    assert set(range(1, 91)) - set(COCO80_TO_91) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert list(COCO80_TO_91) == sorted(COCO80_TO_91)
    assert all(coco91_to_80(coco80_to_91(i)) == i for i in range(80))
    assert coco91_to_80(90) == 79 and COCO80_NAMES[coco91_to_80(1)] == "person"
    with pytest.raises(ValueError, match="12"):
        coco91_to_80(12)
    with pytest.raises(ValueError, match="0..79"):
        coco80_to_91(80)


def _write_coco_like(root: Path, image_folder: Path, split: str):
    image_folder.mkdir(parents=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k, (w, h) in enumerate([(64, 48), (40, 64)]):
        name = f"{397133 + k:012d}.jpg"
        Image.fromarray(np.full((h, w, 3), 30 * k, np.uint8)).save(image_folder / name)
        images.append({"id": 397133 + k, "file_name": name, "width": w, "height": h})
    anns.append({"id": 1, "image_id": 397133, "category_id": 90, "bbox": [2, 3, 10, 12],
                 "area": 120.0, "iscrowd": 0})
    anns.append({"id": 2, "image_id": 397133, "category_id": 1, "bbox": [20, 5, 30, 20],
                 "area": 600.0, "iscrowd": 0})
    anns.append({"id": 3, "image_id": 397133, "category_id": 1, "bbox": [0, 0, 64, 48],
                 "area": 3000.0, "iscrowd": 1})
    anns.append({"id": 4, "image_id": 397134, "category_id": 13, "bbox": [5, 5, 20, 30],
                 "area": 600.0, "iscrowd": 0})
    cats = [{"id": cid, "name": n, "supercategory": "x"} for cid, n in zip(COCO80_TO_91, COCO80_NAMES)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.parametrize("nested", [False, True])
def test_real_coco_layouts(tmp_path, nested):
    img_dir = tmp_path / "images" / "val2017" if nested else tmp_path / "val2017"
    _write_coco_like(tmp_path, img_dir, "val2017")
    ds = CocoDetection(tmp_path, split="val2017", img_size=64)
    assert ds.img_dir == img_dir
    assert ds.cat_ids == list(COCO80_TO_91) and ds.names == list(COCO80_NAMES)
    _, t0, iid0, shape0, info0 = ds[0]
    assert iid0 == 397133 and shape0 == (48, 64)
    assert t0[:, 1].tolist() == [coco91_to_80(90), coco91_to_80(1)]  # crowd box left out
    _, t1, _, shape1, info1 = ds[1]
    assert t1[:, 1].tolist() == [coco91_to_80(13)] == [11]
    assert info1.pad == ((64 - 40) // 2, 0)


def test_missing_paths_give_clear_errors(tmp_path, syn):
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(tmp_path / "nowhere", "val")
    assert str(tmp_path / "nowhere") in str(e.value) and "instances_val.json" in str(e.value)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(root, "val2017")
    msg = str(e.value)
    assert str(root / "images" / "val2017") in msg and str(root / "val2017") in msg
    (root / "val2017").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(root, "val2017")
    assert str(root / "annotations" / "instances_val2017.json") in str(e.value)
    _write_coco_like(tmp_path / "gone", tmp_path / "gone" / "val2017", "val2017")
    (tmp_path / "gone" / "val2017" / "000000397134.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000397134.jpg"):
        CocoDetection(tmp_path / "gone", "val2017")
    with pytest.raises(ValueError, match="multiple of the stride 32"):
        CocoDetection(syn, "val", img_size=100)


def test_dataset_splits_coco_or_the_synthetic_default(tmp_path):
    from qcourse.yolo.datasets import dataset_splits, ensure_default_dataset

    assert dataset_splits(tmp_path) == (tmp_path, "train2017", "val2017")
    root, train, val = dataset_splits(None)
    assert (root, train, val) == (ensure_default_dataset(progress=False), "train", "val")
    assert (root / "images" / train).is_dir() and (root / "images" / val).is_dir()
