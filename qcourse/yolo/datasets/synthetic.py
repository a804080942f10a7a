"""Lessons 5-8 — a deterministic synthetic detection dataset in COCO layout.

No COCO images can be downloaded in the course's default setting, so lessons 5-8 train,
calibrate and evaluate YOLOv7-tiny on a dataset generated here. It is written exactly like
COCO, so one loader (:class:`qcourse.yolo.datasets.CocoDetection`) and one evaluator
(:func:`qcourse.yolo.evaluate.evaluate`, pycocotools) serve both::

    root/images/train/000000.jpg ...      root/annotations/instances_train.json
    root/images/val/000000.jpg ...        root/annotations/instances_val.json
    root/manifest.json                    (generator parameters + sha256 of every file)

What an image contains:

* **Six classes** with distinct geometry: ``circle``, ``square``, ``triangle``, ``star``
  (five points), ``ring`` (an annulus — the background shows through its hole) and
  ``cross`` (a plus sign). Squares, triangles and crosses are rotated by up to 15 degrees,
  stars freely; aspect ratios vary a little. Each object is a crisp (not anti-aliased)
  filled shape in one colour, optionally with a soft brightness ramp.
* **Sizes** (side of the shape's box): 40 % small (10-30 px), 45 % medium (32-80 px), 15 %
  large (90 px up to 90 % of the shorter image side) — COCO's small/medium/large areas are
  ``< 32**2``, ``< 96**2`` and above.
* **Backgrounds**: flat colours, linear and radial gradients, plus (half of the time) a
  texture — stripes, a checkerboard or smooth "plasma" noise — and (60 %) pixel noise over
  the whole image, objects included.
* **Clutter** that is not an object: thin lines, open arcs, poly-lines and dots, drawn on
  the background before the objects.
* **Occlusion**: objects are drawn in order, later ones on top. A placement is accepted only
  if every earlier object keeps at least ``min_visible`` (60 %) of its pixels. The
  annotation describes the *visible* part, as in COCO: ``bbox`` is the tight box of the
  visible pixels (``[x, y, w, h]`` with pixel-edge convention: a mask covering columns
  ``x0 .. x1`` gives ``x = x0, w = x1 - x0 + 1``), ``area`` is the visible pixel count and
  ``segmentation`` is the visible mask as COCO RLE.
* **Image sizes**: 40 % square ``img_size x img_size``; the rest have one side equal to
  ``img_size`` and the other between 70 % and 100 % of it (so the letterbox pads them).
* An object is not placed where its box overlaps the visible box of an earlier object of
  the same class with IoU > 0.5, so the evaluation NMS (IoU 0.65) does not merge two true
  objects.
* Object colours are drawn until they differ clearly from the background under the object
  and from any object within 2 px of it, so every object is visible to the eye.
* 1 to ``max_objects`` (6) objects per image; 3 % of the images are empty.

Everything is drawn from ``numpy.random.default_rng((seed, split, index))``: the same
arguments give byte-identical files (JPEG via Pillow at a fixed quality with 4:4:4 chroma,
or PNG). :func:`ensure_default_dataset` creates the course's default (2000 train + 250 val
images, ``img_size=160``) once in a cache folder and reuses it while its manifest matches.

Safety: the generator deletes or replaces only files that its own manifest lists (a folder
it did not write, such as a real COCO download, is refused, never emptied); images are drawn
into a temporary folder that is removed if the run fails or is interrupted with Ctrl-C; and
concurrent calls of :func:`ensure_default_dataset` take turns through a lock file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

try:  # the lock of ensure_default_dataset (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "DEFAULT_PARAMS",
    "make_synthetic_coco",
    "render_image",
    "verify_synthetic_coco",
    "default_dataset_root",
    "ensure_default_dataset",
]

CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
GENERATOR_VERSION = 1
DEFAULT_PARAMS: Dict[str, int] = {"n_train": 2000, "n_val": 250, "img_size": 160, "seed": 0}
_SPLIT_CODE = {"train": 1, "val": 2}
_MIN_SIDE = 10  # px: no object is smaller than this in either direction of its frame
_SIZE_BINS = ((0.40, 10.0, 30.0), (0.45, 32.0, 80.0), (0.15, 90.0, 1e9))  # (prob, lo, hi)


# ----------------------------------------------------------------------------- rendering
def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_geometry(cls: str, size: float, rng: np.random.Generator):
    """Vertices (centred at 0) or an ellipse spec for one object of nominal ``size`` px."""
    if cls in ("circle", "ring", "square"):
        a = math.exp(rng.uniform(-0.12, 0.12))
    else:
        a = math.exp(rng.uniform(-0.2, 0.2))
    sx, sy = size * a, size / a
    m = min(sx, sy)
    if m < _MIN_SIDE:  # keep the smallest side >= _MIN_SIDE
        sx, sy = sx * _MIN_SIDE / m, sy * _MIN_SIDE / m
    hx, hy = sx / 2.0, sy / 2.0
    if cls == "circle":
        return {"kind": "ellipse", "hx": hx, "hy": hy}
    if cls == "ring":
        r = min(hx, hy)
        k = rng.uniform(0.45, 0.62)
        k = min(k, 1.0 - 2.2 / r)  # the band is at least ~2 px wide
        return {"kind": "ring", "hx": hx, "hy": hy, "k": k}
    if cls == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        theta = math.radians(rng.uniform(-15, 15))
    elif cls == "triangle":
        pts = np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64)
        theta = math.radians(rng.uniform(-15, 15))
    elif cls == "star":
        k = rng.uniform(0.42, 0.52)
        ang = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, k)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        theta = math.radians(rng.uniform(0, 72))
    elif cls == "cross":
        t = rng.uniform(0.3, 0.4)
        pts = np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                        [-t, t], [-1, t], [-1, -t], [-t, -t]], dtype=np.float64)
        theta = math.radians(rng.uniform(-15, 15))
    else:  # pragma: no cover - CLASSES is fixed
        raise ValueError(f"unknown class {cls!r}")
    pts = _rotate(pts * np.array([hx, hy]), theta)
    return {"kind": "poly", "pts": pts}


def _extent(geo) -> Tuple[float, float, float, float]:
    if geo["kind"] == "poly":
        p = geo["pts"]
        return p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()
    return -geo["hx"], -geo["hy"], geo["hx"], geo["hy"]


def _draw_mask(geo, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    if geo["kind"] == "poly":
        pts = geo["pts"] + np.array([cx, cy])
        d.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    else:
        hx, hy = geo["hx"], geo["hy"]
        d.ellipse([cx - hx, cy - hy, cx + hx, cy + hy], fill=255)
        if geo["kind"] == "ring":
            k = geo["k"]
            d.ellipse([cx - hx * k, cy - hy * k, cx + hx * k, cy + hy * k], fill=0)
    return np.asarray(im) > 0


def _background(rng: np.random.Generator, h: int, w: int, mixed: bool) -> np.ndarray:
    c1 = rng.uniform(0, 255, 3)
    if not mixed:
        return np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    kind = rng.choice(3, p=[0.3, 0.45, 0.25])
    if kind == 0:
        bg = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    else:
        c2 = rng.uniform(0, 255, 3)
        if kind == 1:
            a = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(a) + yy * math.sin(a)
        else:
            t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = (c1 + (c2 - c1) * t[..., None]).astype(np.float32)
    if rng.random() < 0.5:
        tex = rng.choice(3)
        if tex == 0:  # stripes
            a = rng.uniform(0, math.pi)
            period = rng.uniform(4, 20)
            phase = rng.uniform(0, 2 * math.pi)
            t = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + phase)
            pattern = t[..., None] * rng.uniform(8, 30)
        elif tex == 1:  # checkerboard
            cell = int(rng.integers(4, 17))
            t = ((xx // cell + yy // cell) % 2) * 2 - 1
            pattern = t[..., None] * rng.uniform(8, 25)
        else:  # smooth plasma noise, per channel
            g = int(rng.integers(3, 7))
            low = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
            up = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
            pattern = (up - 127.5) / 127.5 * rng.uniform(15, 40)
        bg = bg + pattern
    return np.clip(bg, 0, 255)


def _draw_clutter(rng: np.random.Generator, img: Image.Image) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    for _ in range(int(rng.integers(0, 7))):
        kind = rng.choice(4)
        if kind == 0:  # straight line
            p = rng.uniform([0, 0, 0, 0], [w, h, w, h])
            d.line([(p[0], p[1]), (p[2], p[3])], fill=colour(), width=int(rng.integers(1, 3)))
        elif kind == 1:  # open arc (never a closed ring)
            s = rng.uniform(8, 60)
            x0, y0 = rng.uniform(-s / 2, w - s / 2), rng.uniform(-s / 2, h - s / 2)
            start = rng.uniform(0, 360)
            d.arc([x0, y0, x0 + s, y0 + s * rng.uniform(0.6, 1.4)], start,
                  start + rng.uniform(60, 240), fill=colour(), width=1)
        elif kind == 2:  # poly-line scribble
            n = int(rng.integers(3, 6))
            p = rng.uniform([0, 0], [w, h], (n, 2))
            d.line([tuple(q) for q in p], fill=colour(), width=1)
        else:  # sprinkled dots
            c = colour()
            for _ in range(int(rng.integers(3, 16))):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                r = rng.uniform(0.5, 1.5)
                d.ellipse([x - r, y - r, x + r, y + r], fill=c)


def _pick_colour(rng, bg_pixels: np.ndarray, others: List[np.ndarray]) -> np.ndarray:
    """The first of up to 40 random colours that stands out from the background under the object
    (5th percentile of the RGB distance >= 60, mean >= 90) and from nearby objects
    (distance >= 80); the best-scoring one when none does."""
    if len(bg_pixels) > 1024:  # a regular subsample is plenty for the statistics
        bg_pixels = bg_pixels[:: len(bg_pixels) // 1024 + 1]
    best, best_score = None, -1.0
    for _ in range(5):
        cand = rng.uniform(0, 255, (8, 3)).astype(np.float32)
        dist = np.sqrt(((bg_pixels[None, :, :] - cand[:, None, :]) ** 2).sum(2))
        k5 = dist.shape[1] // 20  # 5th percentile (nearest rank)
        score = np.minimum(np.partition(dist, k5, axis=1)[:, k5] / 60.0, dist.mean(1) / 90.0)
        for o in others:
            score = np.minimum(score, np.sqrt(((cand - o) ** 2).sum(1)) / 80.0)
        good = np.flatnonzero(score >= 1.0)
        if len(good):
            return cand[good[0]]
        k = int(np.argmax(score))
        if score[k] > best_score:
            best, best_score = cand[k], float(score[k])
    return best


def _sample_size(rng: np.random.Generator, short_side: int) -> Optional[float]:
    hi_cap = 0.9 * short_side
    u = rng.random()
    acc = 0.0
    for k, (p, lo, hi) in enumerate(_SIZE_BINS):
        acc += p
        if u < acc or k == len(_SIZE_BINS) - 1:
            hi = min(hi, hi_cap)
            if hi < lo:  # the bin does not fit this image: fall back to small objects
                lo, hi = float(_MIN_SIDE), min(30.0, hi_cap)
                if hi < lo:
                    return None
            return float(rng.uniform(lo, hi))
    return None  # pragma: no cover


def _box_of(mask: np.ndarray) -> Tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _box_iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    """IoU of two inclusive pixel boxes ``(x0, y0, x1, y1)``."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def _near(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int], gap: int = 2) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


@dataclass
class _Scene:
    """The objects drawn so far, one entry per object in drawing order."""

    visible: List[np.ndarray] = field(default_factory=list)   # pixels still visible
    full_counts: List[int] = field(default_factory=list)      # pixels when drawn
    vis_counts: List[int] = field(default_factory=list)       # pixels still visible
    boxes: List[Tuple[int, int, int, int]] = field(default_factory=list)  # drawn box
    colours: List[np.ndarray] = field(default_factory=list)
    classes: List[int] = field(default_factory=list)


def render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    max_objects: int = 6,
    clutter: bool = True,
    background: str = "mixed",
    shading: bool = True,
    min_visible: float = 0.6,
    occlusion: bool = True,
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one synthetic image.

    Returns:
        ``(image, objects)``: ``image`` is an ``(height, width, 3)`` uint8 RGB array;
        ``objects`` lists ``(class_index, visible_mask)`` in drawing order, where
        ``visible_mask`` is an ``(height, width)`` bool array of the object's pixels that
        remain visible in the final image.

    The random draws happen in a fixed order (background, clutter, object count, then per
    object: class, size, placement, colour, shading; then noise): the dataset's bytes, and so
    the shipped checkpoint's figures, depend on that order.
    """
    mixed = background == "mixed"
    canvas = _background(rng, height, width, mixed)
    if clutter:
        pil = Image.fromarray(np.round(canvas).astype(np.uint8))
        _draw_clutter(rng, pil)
        canvas = np.asarray(pil, np.float32).copy()
    bg_snapshot = canvas.copy()

    scene = _Scene()
    n_obj = 0 if rng.random() < 0.03 else int(rng.integers(1, max_objects + 1))
    for _ in range(n_obj):
        cls = int(rng.integers(len(CLASSES)))
        size = _sample_size(rng, min(height, width))
        if size is None:
            continue
        placed = _place(rng, cls, size, height, width, scene, min_visible, occlusion)
        if placed is not None:
            _paint(rng, canvas, bg_snapshot, scene, cls, placed, shading)

    if mixed and rng.random() < 0.6:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, list(zip(scene.classes, scene.visible))


def _place(rng, cls: int, size: float, height: int, width: int, scene: _Scene,
           min_visible: float, occlusion: bool):
    """Up to 20 tries to put a new object where every earlier one stays recognisable.

    Returns ``(mask, n_px, cx, cy, box, slice, cropped mask, overlap with each earlier object,
    size after shrinking)`` or ``None`` when no try succeeds (the object is then skipped).
    """
    geo = _shape_geometry(CLASSES[cls], size, rng)
    for _try in range(20):
        x0, y0, x1, y1 = _extent(geo)
        lo_x, hi_x = 1 - x0, width - 2 - x1
        lo_y, hi_y = 1 - y0, height - 2 - y1
        if hi_x < lo_x or hi_y < lo_y:  # too big for this image: shrink and retry
            size *= 0.9
            geo = _shape_geometry(CLASSES[cls], size, rng)
            continue
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        m = _draw_mask(geo, cx, cy, height, width)
        n_px = int(m.sum())
        if n_px < 30:
            continue
        box = _box_of(m)
        sl = (slice(box[1], box[3] + 1), slice(box[0], box[2] + 1))
        mc = m[sl]
        inter = _overlaps(scene, cls, box, sl, mc, min_visible, occlusion)
        if inter is not None:
            return m, n_px, cx, cy, box, sl, mc, inter, size
    return None


def _overlaps(scene: _Scene, cls: int, box, sl, mc, min_visible: float, occlusion: bool):
    """Pixels the new object would hide of each earlier one, or ``None`` if it hides too much."""
    inter = [0] * len(scene.visible)
    for j, v in enumerate(scene.visible):
        if not _near(box, scene.boxes[j], 0):
            continue
        inter[j] = int((v[sl] & mc).sum())
        if not occlusion and inter[j]:
            return None
        remaining = scene.vis_counts[j] - inter[j]
        if remaining < min_visible * scene.full_counts[j] or remaining < 30:
            return None
        if scene.classes[j] == cls and _box_iou(box, _box_of(scene.visible[j])) > 0.5:
            return None  # keep same-class boxes apart: NMS at IoU 0.65 must not merge them
    return inter


def _paint(rng, canvas: np.ndarray, bg_snapshot: np.ndarray, scene: _Scene, cls: int, placed,
           shading: bool) -> None:
    """Colour the placed object onto ``canvas`` and record it; earlier objects lose what it hides."""
    m, n_px, cx, cy, box, sl, mc, inter, size = placed
    # a colour that stands out from the background under it and from the objects it touches
    overlapped = [scene.colours[j] for j in range(len(scene.visible)) if _near(box, scene.boxes[j], 2)]
    colour = _pick_colour(rng, bg_snapshot[m], overlapped)
    if shading:
        a = rng.uniform(0, 2 * math.pi)
        g = rng.uniform(-0.15, 0.15)
        ys, xs = np.nonzero(m)
        ramp = ((xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)) / (size / 2.0)
        canvas[m] = colour * (1.0 + g * np.clip(ramp, -1, 1))[:, None]
    else:
        canvas[m] = colour
    for j in range(len(scene.visible)):
        if inter[j]:
            scene.visible[j][sl] &= ~mc
            scene.vis_counts[j] -= inter[j]
    scene.visible.append(m.copy())
    scene.full_counts.append(n_px)
    scene.vis_counts.append(n_px)
    scene.boxes.append(box)
    scene.colours.append(colour)
    scene.classes.append(cls)


# ----------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    x0, y0, x1, y1 = _box_of(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        "area": float(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]},
    }


def _resolve_workers(workers: Optional[int], total: int) -> int:
    if workers is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(4, cores)) if total > 500 else 1
    return _check_int("workers", workers, 1)


def _image_name(idx: int, fmt: str) -> str:
    return f"{idx:06d}.{fmt}"


def _make_one(job) -> Tuple[dict, List[dict], str]:
    """Draw, save and annotate one image (module level so that a process pool can run it)."""
    img_dir, split, idx, seed, img_size, non_square, fmt, quality, opts = job
    rng = np.random.default_rng((seed, _SPLIT_CODE[split], idx))
    h = w = img_size
    if non_square and rng.random() < 0.6:
        short = int(round(img_size * rng.uniform(0.7, 1.0)))
        if rng.random() < 0.5:
            h = short
        else:
            w = short
    image, objects = render_image(rng, h, w, **opts)
    name = _image_name(idx, fmt)
    path = Path(img_dir) / name
    pil = Image.fromarray(image)
    if fmt == "jpg":
        pil.save(path, format="JPEG", quality=quality, subsampling=0)
    else:
        pil.save(path, format="PNG", compress_level=6)
    image_id = idx + 1
    anns = [_annotation(m, 0, image_id, cls + 1) for cls, m in objects]
    info = {"id": image_id, "file_name": name, "width": w, "height": h}
    return info, anns, _sha256(path)


def _checked_params(n_train, n_val, img_size, seed, max_objects, clutter, background, shading,
                    non_square, occlusion, min_visible, image_format, jpeg_quality) -> dict:
    """Validate the generator's arguments; return them as the manifest records them (the key
    order is part of the manifest's bytes, so it stays as it is)."""
    n_train = _check_int("n_train", n_train, 0)
    n_val = _check_int("n_val", n_val, 0)
    img_size = _check_int("img_size", img_size, 32)
    seed = _check_int("seed", seed, 0)
    max_objects = _check_int("max_objects", max_objects, 1)
    if background not in ("mixed", "flat"):
        raise ValueError(f"background must be 'mixed' or 'flat', got {background!r}")
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if not 0.0 < float(min_visible) <= 1.0:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    return {
        "n_train": n_train, "n_val": n_val, "img_size": img_size, "seed": seed,
        "max_objects": max_objects, "clutter": bool(clutter), "background": background,
        "shading": bool(shading), "non_square": bool(non_square), "occlusion": bool(occlusion),
        "min_visible": float(min_visible), "image_format": fmt, "jpeg_quality": int(jpeg_quality),
    }


def _planned_files(params: dict) -> List[str]:
    """The paths (relative to the root) that a dataset with ``params`` will write, manifest
    excluded — known before anything is drawn, so clashes are found before any work."""
    files = []
    for split in ("train", "val"):
        files += [f"images/{split}/{_image_name(i, params['image_format'])}"
                  for i in range(params[f"n_{split}"])]
        files.append(f"annotations/instances_{split}.json")
    return files


# ----------------------------------------------------------------------------- ownership
# The generator deletes or replaces only files it can prove it wrote: those listed in a
# manifest.json carrying its generator tag. Anything else in the folder — a real COCO
# download, a user's notes — is never touched.
# the tag written into every manifest: a name, kept when the module moved, so that datasets
# generated before still count as the generator's own
_GENERATOR_TAG = "qcourse.datasets.synthetic"
_MANIFEST = "manifest.json"


def _is_own_path(rel) -> bool:
    """A manifest entry this generator could have written: relative, under images/ or
    annotations/, no '..' (so even a forged manifest cannot point outside those folders)."""
    if not isinstance(rel, str):
        return False
    p = PurePosixPath(rel)
    return (not p.is_absolute() and len(p.parts) >= 2 and ".." not in p.parts
            and p.parts[0] in ("images", "annotations"))


def _own_manifest(root: Path) -> Optional[dict]:
    """The manifest of ``root`` when this generator wrote it, else ``None``."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != _GENERATOR_TAG:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_is_own_path(rel) for rel in files):
        return None
    return manifest


def _claim_output(root: Path, params: dict, overwrite: bool) -> Set[str]:
    """Check that writing a dataset with ``params`` into ``root`` replaces only this
    generator's own files; return the files of the earlier dataset there (empty if none)."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a folder; choose a folder for the dataset")
    present = [n for n in ("images", "annotations", _MANIFEST) if (root / n).exists()]
    if not present:  # every file the generator writes lies under these three names
        return set()
    if not overwrite:
        raise FileExistsError(
            f"{root} already holds a dataset ({', '.join(present)}); pass overwrite=True to "
            "replace it or choose an empty folder")
    manifest = _own_manifest(root)
    if manifest is None:
        raise FileExistsError(
            f"{root} holds {', '.join(present)} but no manifest.json written by "
            f"{_GENERATOR_TAG}, so overwrite=True would delete files this generator did not "
            f"write; choose another folder, or remove {root} yourself if you no longer need it")
    old_files = set(manifest["files"])
    clashes = [rel for rel in _planned_files(params) if rel not in old_files and (root / rel).exists()]
    if clashes:
        raise FileExistsError(
            f"{root} holds {len(clashes)} file(s) that the new dataset would overwrite but that "
            f"its manifest does not list, e.g. {clashes[:3]}; move them away or choose another folder")
    return old_files


# ----------------------------------------------------------------------------- writing
def _ignore_sigint() -> None:  # pragma: no cover - runs in the pool's worker processes
    # Ctrl-C reaches every process of the terminal's group: the workers ignore it and the
    # parent, which gets KeyboardInterrupt, terminates them and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pool.terminate() ends the workers with SIGTERM: a handler the parent had installed
    # (a test runner, a notebook kernel) is inherited by fork and would keep them alive,
    # and terminate() would then wait for them forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _image_pool(n_workers: int):
    """A process pool (``None`` for one worker) that never outlives an error: on any
    exception — Ctrl-C included — it is terminated at once. (``close()`` + ``join()`` would
    wait for every queued image, and forever if a worker died.)"""
    if n_workers == 1:
        yield None
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(n_workers, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _staging_prefix(root: Path) -> str:
    return f".{root.name}.tmp-"


@contextlib.contextmanager
def _staging_dir(root: Path):
    """A new folder to generate into, removed on every exit: an interrupted or failed run
    leaves nothing behind. It lies next to ``root`` — on the same file system, so the
    finished files move into place by renaming — or inside an existing ``root`` that is a
    mount point or has a read-only parent (renames cannot cross file systems)."""
    root = Path(os.path.abspath(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    where = root.parent
    if root.is_dir() and (root.stat().st_dev != root.parent.stat().st_dev
                          or not os.access(root.parent, os.W_OK)):
        where = root
    staging = where / f"{_staging_prefix(root)}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_split(out: Path, split: str, n: int, params: dict, pool, bar) -> Dict[str, str]:
    """Draw the ``n`` images of ``split`` and its json into ``out``; return their sha256."""
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    render_opts = {k: params[k] for k in ("max_objects", "clutter", "background", "shading",
                                          "min_visible", "occlusion")}
    jobs = [(str(img_dir), split, idx, params["seed"], params["img_size"], params["non_square"],
             params["image_format"], params["jpeg_quality"], render_opts) for idx in range(n)]
    results = pool.imap(_make_one, jobs, chunksize=16) if pool else map(_make_one, jobs)
    images, annotations, files = [], [], {}
    for info, anns, digest in results:
        images.append(info)
        for a in anns:
            a["id"] = len(annotations) + 1
            annotations.append(a)
        files[f"images/{split}/{info['file_name']}"] = digest
        bar.update(1)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    ann = {
        "info": {"description": "qcourse synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_path = out / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(ann, separators=(",", ":")))
    files[f"annotations/instances_{split}.json"] = _sha256(ann_path)
    return files


def _write_dataset(out: Path, params: dict, progress: bool, workers: Optional[int]) -> dict:
    """Write both splits and the manifest into the (empty) folder ``out``; return the manifest."""
    total = params["n_train"] + params["n_val"]
    files: Dict[str, str] = {}
    with tqdm(total=total, desc="synthetic dataset", unit="img",
              disable=None if progress else True) as bar, \
            _image_pool(_resolve_workers(workers, total)) as pool:
        for split in ("train", "val"):
            files.update(_write_split(out, split, params[f"n_{split}"], params, pool, bar))
    manifest = {
        "generator": _GENERATOR_TAG,
        "version": GENERATOR_VERSION,
        "params": params,
        "classes": list(CLASSES),
        "files": dict(sorted(files.items())),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _install(staging: Path, root: Path, manifest: dict, old_files: Set[str]) -> None:
    """Move the finished dataset from ``staging`` into ``root``.

    A new or empty ``root`` is replaced by one atomic rename: other processes see either no
    dataset or a complete one. Into a folder that holds other files the files move one by
    one, replacing the earlier dataset's files; files of the earlier manifest that the new
    one lacks are deleted, and nothing else is touched. The manifest moves last, so a folder
    interrupted half-way fails verification and is repaired on the next call."""
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if not root.exists():
        os.replace(staging, root)
        return
    for d in sorted(p for p in staging.rglob("*") if p.is_dir()):  # e.g. an empty images/train
        (root / d.relative_to(staging)).mkdir(parents=True, exist_ok=True)
    for rel in manifest["files"]:
        os.replace(staging / rel, root / rel)
    for rel in sorted(old_files - set(manifest["files"])):
        (root / rel).unlink(missing_ok=True)
    os.replace(staging / _MANIFEST, root / _MANIFEST)


def make_synthetic_coco(
    root: Union[str, os.PathLike],
    n_train: int = 2000,
    n_val: int = 250,
    img_size: int = 160,
    seed: int = 0,
    *,
    max_objects: int = 6,
    clutter: bool = True,
    background: str = "mixed",
    shading: bool = True,
    non_square: bool = True,
    occlusion: bool = True,
    min_visible: float = 0.6,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
    workers: Optional[int] = None,
) -> Path:
    """Write a synthetic detection dataset in COCO layout under ``root``.

    Args:
        root: output folder; created if needed. Other files in it are left alone. It must
            not already hold a dataset (``images/``, ``annotations/`` or ``manifest.json``)
            unless ``overwrite=True``, which replaces an earlier dataset of this generator:
            exactly the files its manifest lists. A folder whose dataset this generator did
            not write (no manifest of its own, e.g. a real COCO download) is refused.
        n_train, n_val: number of images in the ``train`` and ``val`` splits.
        img_size: the longer image side in pixels (>= 32); square images are
            ``img_size x img_size``.
        seed: integer seed; equal arguments give byte-identical files.
        max_objects: at most this many objects per image (1..max_objects, 3 % of images
            are empty).
        clutter: draw non-object lines, arcs and dots.
        background: ``"mixed"`` (gradients, textures, pixel noise) or ``"flat"`` (one
            colour, no noise — used by tests that check boxes against pixels).
        shading: give each object a soft brightness ramp (``False``: one exact colour).
        non_square: 60 % of images get a shorter side of 70-100 % of ``img_size``.
        occlusion: allow later objects to cover up to ``1 - min_visible`` of earlier ones
            (``False``: objects never overlap).
        min_visible: fraction of each object's pixels that must stay visible.
        image_format: ``"jpg"`` (Pillow, fixed ``jpeg_quality``, 4:4:4 chroma) or ``"png"``.
        progress: show a tqdm bar (hidden automatically when not a terminal).
        workers: processes that draw images (``None``: up to 4 CPU cores when there are
            more than 500 images, else 1). The files do not depend on it.

    The images are drawn into a temporary folder (next to ``root``, or inside it when it is a
    mount point) and moved into place when complete; if the run fails or is interrupted
    (Ctrl-C), the worker processes are stopped, the temporary folder is removed, ``root`` is
    unchanged and the exception propagates.

    Returns:
        ``root`` as a :class:`~pathlib.Path`. ``root/manifest.json`` records the parameters
        and the sha256 of every file written.
    """
    params = _checked_params(n_train, n_val, img_size, seed, max_objects, clutter, background,
                             shading, non_square, occlusion, min_visible, image_format,
                             jpeg_quality)
    root = Path(root)
    old_files = _claim_output(root, params, overwrite)
    with _staging_dir(root) as staging:
        manifest = _write_dataset(staging, params, progress, workers)
        _install(staging, root, manifest, old_files)
    return root


def verify_synthetic_coco(root: Union[str, os.PathLike], params: Optional[dict] = None) -> bool:
    """True when ``root`` holds a complete dataset written by :func:`make_synthetic_coco`:
    the manifest exists, has this generator version, its parameters include ``params``
    (if given), and every listed file exists with the recorded sha256."""
    root = Path(root)
    manifest = _own_manifest(root)
    if manifest is None or manifest.get("version") != GENERATOR_VERSION:
        return False
    if params:
        recorded = manifest.get("params", {})
        if any(recorded.get(k) != v for k, v in params.items()):
            return False
    files = manifest["files"]
    if not files:
        return False
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            return False
    return True


def default_dataset_root() -> Path:
    """Where the default dataset lives: ``$QCOURSE_DATA/synthetic-v1`` when the environment
    variable ``QCOURSE_DATA`` is set, else ``~/.cache/qcourse/synthetic-v1``."""
    base = os.environ.get("QCOURSE_DATA")
    base_path = Path(base).expanduser() if base else Path.home() / ".cache" / "qcourse"
    return base_path / f"synthetic-v{GENERATOR_VERSION}"


@contextlib.contextmanager
def _exclusive_lock(root: Path):
    """Hold an exclusive ``flock`` on ``.NAME.lock`` next to ``root``: of several processes
    building the same dataset, one works and the others wait, then find it finished. The
    small lock file stays (deleting it while another process waits on it would let two
    processes lock two different files). Without ``fcntl`` (Windows) there is no lock."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    root = Path(os.path.abspath(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_replaceable(root: Path) -> None:
    """Refuse a folder that exists, is not empty and holds no dataset of this generator.
    (One that another process is building holds nothing, or only that process's staging
    folder, or already our manifest — but for the instant its files move in: see
    _staging_dir and _install.)"""
    if not root.exists():
        return
    if root.is_dir():
        prefix = _staging_prefix(Path(os.path.abspath(root)))
        if all(p.name.startswith(prefix) for p in root.iterdir()) or _own_manifest(root) is not None:
            return
    raise FileExistsError(
        f"{root} exists and is not a qcourse synthetic dataset (no manifest.json written by "
        f"{_GENERATOR_TAG}), so ensure_default_dataset will neither write into it nor delete "
        "anything there. Pass an empty or new folder to ensure_default_dataset(root=...) or "
        f"set QCOURSE_DATA; or remove {root} yourself if you no longer need it")


def ensure_default_dataset(root: Optional[Union[str, os.PathLike]] = None, progress: bool = True) -> Path:
    """Return the folder of the course's default dataset, generating it if needed.

    The default is :data:`DEFAULT_PARAMS` (2000 train + 250 val images, ``img_size=160``,
    seed 0). An existing folder is reused when :func:`verify_synthetic_coco` accepts it.
    Otherwise the dataset is generated next to it and moved into place; a damaged dataset
    of this generator is repaired by replacing the files its manifest lists (other files
    in the folder are kept). A folder that exists, is not empty and was not written by this
    generator is never touched: a :class:`FileExistsError` asks for another location.

    Several processes may call this at once: a lock file next to ``root`` lets one build
    while the others wait and then reuse its result. Ctrl-C during the build leaves no
    temporary files.
    """
    root = Path(root).expanduser() if root is not None else default_dataset_root()
    if verify_synthetic_coco(root, DEFAULT_PARAMS):
        return root
    # Refuse a foreign folder before creating anything, not even the lock file, next to it
    # (safe while another process builds there: see _check_replaceable).
    _check_replaceable(root)
    with _exclusive_lock(root):
        if verify_synthetic_coco(root, DEFAULT_PARAMS):  # another process built it meanwhile
            return root
        make_synthetic_coco(root, **DEFAULT_PARAMS, overwrite=True, progress=progress)
    return root
