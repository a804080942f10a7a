"""Lessons 5-8 — a COCO-format detection dataset, letterboxing and batching.

One loader serves the course's synthetic dataset (:mod:`qcourse.yolo.datasets.synthetic`) and
real COCO val2017. Two folder layouts are understood::

    root/images/{split}/*.jpg   + root/annotations/instances_{split}.json   (synthetic, YOLO)
    root/{split}/*.jpg          + root/annotations/instances_{split}.json   (COCO's own zips)

so ``CocoDetection("/data/coco", split="val2017")`` finds ``/data/coco/val2017/`` (or
``/data/coco/images/val2017/``) and ``/data/coco/annotations/instances_val2017.json``.

Each item is letterboxed the way YOLOv7 evaluates: resized so the longer side equals
``img_size`` (aspect ratio kept), then padded with grey 114 to ``img_size x img_size``
(a multiple of the model stride). The ratio and the padding are returned, so predicted
boxes can be mapped back to the original pixels (:func:`qcourse.yolo.postprocess.scale_boxes`).

Class indices: a model predicts contiguous indices ``0 .. nc-1``; the dataset maps them to
the json's ``category_id`` by sorting the json's categories by id
(:attr:`CocoDetection.cat_ids`). For real COCO this gives exactly the standard 80-class
mapping :data:`COCO80_TO_91` (COCO's ids run from 1 to 90 with ten gaps).

The files are untrusted input: the annotation file is read only up to
:data:`MAX_ANNOTATION_BYTES` and checked (:class:`CocoFormatError`); an image is read only from
inside the image folder (a ``file_name`` that is absolute or climbs out with ``..`` is refused,
and so is a link leading out), and one that cannot be decoded, or holds more pixels than
``PIL.Image.MAX_IMAGE_PIXELS``, raises :class:`CocoImageError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from qcourse.utils import InputFileError, load_json

__all__ = [
    "COCO80_TO_91",
    "COCO80_NAMES",
    "COCO91_TO_80",
    "coco80_to_91",
    "coco91_to_80",
    "LetterboxInfo",
    "letterbox",
    "CocoDetection",
    "CocoFormatError",
    "CocoImageError",
    "EpochSampler",
    "collate_fn",
    "create_dataloader",
]

# category_id of each of the 80 COCO classes, in the order models index them
COCO80_TO_91: Tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO80_NAMES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
COCO91_TO_80: Dict[int, int] = {cid: i for i, cid in enumerate(COCO80_TO_91)}


def coco80_to_91(index: int) -> int:
    """COCO category id (1..90) of contiguous class ``index`` (0..79)."""
    if not 0 <= int(index) < 80:
        raise ValueError(f"COCO class index must be in 0..79, got {index}")
    return COCO80_TO_91[int(index)]


def coco91_to_80(category_id: int) -> int:
    """Contiguous class index (0..79) of COCO ``category_id`` (1..90, ten ids unused)."""
    try:
        return COCO91_TO_80[int(category_id)]
    except KeyError:
        raise ValueError(
            f"{category_id} is not one of COCO's 80 category ids (1..90 without "
            f"{sorted(set(range(1, 91)) - set(COCO80_TO_91))})") from None


# ----------------------------------------------------------------------------- letterbox
class LetterboxInfo(NamedTuple):
    """How an image was letterboxed: ``x_new = x_orig * ratio + pad[0]``,
    ``y_new = y_orig * ratio + pad[1]``; ``shape`` is the letterboxed ``(height, width)``."""

    ratio: float
    pad: Tuple[int, int]
    shape: Tuple[int, int]


def letterbox(
    img: np.ndarray,
    new_shape: Union[int, Tuple[int, int]] = 160,
    color: int = 114,
    auto: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> Tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping the aspect ratio, then pad — YOLOv7's letterbox.

    Args:
        img: ``(H, W, 3)`` uint8 RGB image.
        new_shape: target ``(height, width)`` in pixels, or one int for a square.
        color: grey level of the padding (114 as in YOLOv7).
        auto: pad only up to the next multiple of ``stride`` (minimal rectangle) instead of
            the full ``new_shape``.
        scaleup: allow enlarging small images (``False``: only shrink).
        stride: see ``auto``.

    Returns:
        ``(image, info)``: the letterboxed uint8 image and a :class:`LetterboxInfo` with the
        gain ``ratio``, the integer ``pad = (left, top)`` in pixels and the output shape.
        The padding offsets are integers, and the same ones are used to map boxes forward
        and back, so the round trip is exact.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be an (H, W, 3) array, got shape {img.shape}")
    if isinstance(new_shape, (int, np.integer)):
        new_shape = (int(new_shape), int(new_shape))
    nh, nw = int(new_shape[0]), int(new_shape[1])
    if nh <= 0 or nw <= 0:
        raise ValueError(f"new_shape must be positive, got {new_shape}")
    h0, w0 = img.shape[:2]
    r = min(nh / h0, nw / w0)
    if not scaleup:
        r = min(r, 1.0)
    uw, uh = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = nw - uw, nh - uh
    if auto:
        dw, dh = dw % stride, dh % stride
    if (uw, uh) != (w0, h0):
        img = np.asarray(Image.fromarray(img).resize((uw, uh), Image.BILINEAR))
    left, top = dw // 2, dh // 2
    out = np.full((uh + dh, uw + dw, 3), color, dtype=np.uint8)
    out[top:top + uh, left:left + uw] = img
    return out, LetterboxInfo(float(r), (int(left), int(top)), (int(out.shape[0]), int(out.shape[1])))


def _augment_hsv(img: np.ndarray, gains: Tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """YOLO-style HSV jitter: hue, saturation and value scaled by ``1 + U(-g, g)``."""
    r = rng.uniform(-1, 1, 3) * np.asarray(gains) + 1
    x = np.arange(256, dtype=np.float64)
    lut_h = (np.floor(x * r[0]) % 256).astype(np.int64)  # Pillow's hue runs 0..255
    lut_s = np.clip(np.floor(x * r[1]), 0, 255).astype(np.int64)
    lut_v = np.clip(np.floor(x * r[2]), 0, 255).astype(np.int64)
    hsv = Image.fromarray(np.ascontiguousarray(img)).convert("HSV")
    hsv = hsv.point(np.concatenate([lut_h, lut_s, lut_v]).tolist())
    return np.asarray(hsv.convert("RGB"))


# ----------------------------------------------------------------------------- annotation file
# The json is checked once, when it is loaded, so that a broken file fails with a message
# that says where and what, instead of a bare KeyError while training or a silent mAP of 0
# in pycocotools. A plain loop with a fast path: about 2 s for train2017's 860k annotations,
# a fraction of the time json parsing takes.
class CocoFormatError(ValueError):
    """An annotation file that breaks the COCO detection format. The message names the
    file, the entry (annotation or image id) and the field, and says how to fix it."""


class CocoImageError(ValueError):
    """An image of the dataset that is not read: not an image, truncated, larger than Pillow
    decodes, or (through a link) outside the image folder. The message names the file, its
    image id and annotation file, and the fix."""


def _fail(ann_file: Path, where: str, entry: dict, field: str, problem: str, fix: str):
    got = "is missing" if field not in entry else f"{problem}, got {entry[field]!r}"
    raise CocoFormatError(f"{ann_file}: {where}: {field!r} {got}; {fix}")


def _entry(ann_file: Path, where: str, value) -> dict:
    if not isinstance(value, dict):
        raise CocoFormatError(f"{ann_file}: {where} must be a JSON object, got {value!r}; "
                              "fix or remove this entry")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """An int, or a finite float (JSON's NaN and Infinity are not numbers here)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


#: the largest annotation file read: COCO's largest, instances_train2017.json, is 448 MiB
MAX_ANNOTATION_BYTES = 1 << 30


def _load_json(ann_file: Path) -> dict:
    try:  # bounded: a 10 GB file or JSON nested 100000 deep is one error, not a MemoryError or a RecursionError
        data = load_json(ann_file, MAX_ANNOTATION_BYTES,
                         "a COCO annotation file (instances_train2017.json, the largest, is 448 MiB)",
                         "pass a COCO instances_*.json annotation file (download or extract it again if it "
                         "is damaged)")
    except InputFileError as e:
        raise CocoFormatError(str(e)) from None
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{ann_file}: the top level must be a JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(data).__name__}; pass a COCO instances_*.json file")
    for key in ("images", "categories") + (("annotations",) if "annotations" in data else ()):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(
                f"{ann_file}: {key!r} must be a list, got {type(data.get(key)).__name__}; "
                "pass a COCO detection (instances_*.json) annotation file")
    return data


def _check_categories(ann_file: Path, categories: list) -> set:
    if not categories:
        raise CocoFormatError(f"{ann_file} defines no categories; a detection json needs a "
                              "'categories' list of {'id', 'name'}")
    ids: set = set()
    for k, c in enumerate(categories):
        c = _entry(ann_file, f"categories[{k}]", c)
        if not _is_int(c.get("id")) or c["id"] in ids:
            _fail(ann_file, f"categories[{k}]", c, "id", "must be an integer used by one category",
                  "give every category its own integer id")
        ids.add(c["id"])
    return ids


def _check_images(ann_file: Path, images: list) -> set:
    ids: set = set()
    for k, im in enumerate(images):
        im = _entry(ann_file, f"images[{k}]", im)
        where = f"image id {im['id']}" if _is_int(im.get("id")) else f"images[{k}]"
        if not _is_int(im.get("id")) or im["id"] in ids:
            _fail(ann_file, where, im, "id", "must be an integer used by one image only",
                  "give every image its own integer id")
        if not isinstance(im.get("file_name"), str):
            _fail(ann_file, where, im, "file_name", "must be a string",
                  "add the image's file name, relative to the image folder")
        for field in ("width", "height"):
            if not _is_number(im.get(field)) or im[field] <= 0:
                _fail(ann_file, where, im, field, "must be a positive number of pixels",
                      "add the image's size in pixels")
        ids.add(im["id"])
    return ids


def _check_bbox(ann_file: Path, where: str, a: dict) -> None:
    b = a.get("bbox")
    if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
        _fail(ann_file, where, a, "bbox", "must be [x, y, width, height], four finite numbers",
              "fix the box or remove the annotation")
    if b[2] < 0 or b[3] < 0:  # zero is allowed (real COCO has a few); the loader skips them
        _fail(ann_file, where, a, "bbox", "has a negative width or height",
              "COCO boxes are [x, y, width, height], not [x1, y1, x2, y2]: fix the box or "
              "remove the annotation")


def _looks_valid(a, ids: set, image_ids: set, cat_ids: set) -> bool:
    """The fast path: one expression that is true for a well-formed annotation. Only when it
    fails does the slower :func:`_check_annotation` run, to say what is wrong."""
    try:
        b = a["bbox"]
        return (type(a["id"]) is int and a["id"] not in ids and a["image_id"] in image_ids
                and a["category_id"] in cat_ids and type(b) is list and len(b) == 4
                and b[2] >= 0 and b[3] >= 0 and math.isfinite(b[0] + b[1] + b[2] + b[3])
                and a["iscrowd"] in (0, 1) and 0 <= a["area"] < math.inf)
    except (KeyError, TypeError, OverflowError):  # a field is missing, a value not a number
        return False


def _check_annotation(ann_file: Path, k: int, a, ids: set, image_ids: set, cat_ids: set) -> None:
    """Raise a :class:`CocoFormatError` naming the first bad field of annotation ``k``."""
    a = _entry(ann_file, f"annotations[{k}]", a)
    where = f"annotation id {a['id']}" if _is_int(a.get("id")) else f"annotations[{k}]"
    if not _is_int(a.get("id")) or a["id"] in ids:
        _fail(ann_file, where, a, "id", "must be an integer used by one annotation only",
              "give every annotation its own integer id")
    if not (_is_int(a.get("image_id")) and a["image_id"] in image_ids):
        _fail(ann_file, where, a, "image_id", "is not the id of an image in 'images'",
              "point it at a listed image or remove the annotation")
    if not (_is_int(a.get("category_id")) and a["category_id"] in cat_ids):
        _fail(ann_file, where, a, "category_id",
              f"is not one of the ids in 'categories' ({_id_range(cat_ids)})",
              "add the category to 'categories' or fix the annotation")
    _check_bbox(ann_file, where, a)
    if a.get("iscrowd") not in (0, 1):
        _fail(ann_file, where, a, "iscrowd", "must be 0 or 1",
              "set it to 0 (1 marks a crowd region, which evaluation ignores)")
    if not _is_number(a.get("area")) or a["area"] < 0:
        _fail(ann_file, where, a, "area", "must be a number >= 0",
              "set it to the object's area in pixels (w * h of the box will do)")


def _check_annotations(ann_file: Path, annotations: list, image_ids: set, cat_ids: set) -> None:
    ids: set = set()
    for k, a in enumerate(annotations):
        if not _looks_valid(a, ids, image_ids, cat_ids):
            _check_annotation(ann_file, k, a, ids, image_ids, cat_ids)
        ids.add(a["id"])


def _id_range(ids: set) -> str:
    s = sorted(ids)
    return f"{len(s)} ids from {s[0]} to {s[-1]}" if len(s) > 8 else ", ".join(map(str, s))


def _load_coco(ann_file: Path, verbose: bool):
    """Read and check ``ann_file``; return it as a ``pycocotools.coco.COCO`` object."""
    from pycocotools.coco import COCO

    t0 = time.perf_counter()
    data = _load_json(ann_file)
    cat_ids = _check_categories(ann_file, data["categories"])
    image_ids = _check_images(ann_file, data["images"])
    _check_annotations(ann_file, data.get("annotations", []), image_ids, cat_ids)
    coco = COCO()
    coco.dataset = data
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco.createIndex()
    if verbose:
        print(f"loaded and checked {ann_file} in {time.perf_counter() - t0:.2f}s")
        print(buf.getvalue(), end="")
    return coco


def _splits_found(root: Path) -> str:
    """A hint naming the splits that ``root/annotations`` does have (or nothing)."""
    names = sorted(p.name[len("instances_"):-len(".json")]
                   for p in (root / "annotations").glob("instances_*.json"))
    return f"; {root / 'annotations'} has annotations for split(s) {names}" if names else ""


# ----------------------------------------------------------------------------- dataset
class CocoDetection(Dataset):
    """COCO-format detection dataset with letterboxing and optional augmentation.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        split: ``"train"``, ``"val"``, ``"val2017"``, ... — selects
            ``annotations/instances_{split}.json`` and the image folder.
        img_size: square network input in pixels; must be a multiple of ``stride``.
        ann_file, img_dir: explicit paths overriding the layout search.
        stride: the model's largest stride (32 for YOLOv7).
        cache: keep every letterboxed image in memory (``None``: when they fit in 2 GiB).
        augment: random horizontal flip (probability ``flip_lr``) and HSV jitter (gains
            ``hsv``) — deterministic given ``seed``, the item index and the epoch.
        seed: augmentation seed.
        verbose: let pycocotools print while loading the annotations.

    An item is ``(image, targets, image_id, orig_shape, letterbox_info)``:

    * ``image``: ``(3, img_size, img_size)`` float32 tensor, RGB, values in ``[0, 1]``;
    * ``targets``: ``(n, 6)`` float32 tensor of rows ``(0, class, cx, cy, w, h)`` — the box
      centre and size normalised by the letterboxed width/height (YOLO's label format; the
      first column becomes the image's index in the batch in :func:`collate_fn`);
      crowd annotations are left out;
    * ``image_id``: the json's image id (int);
    * ``orig_shape``: ``(height, width)`` of the original image;
    * ``letterbox_info``: :class:`LetterboxInfo`.

    Attributes: ``coco`` (the ``pycocotools.coco.COCO`` object), ``image_ids``, ``cat_ids``
    (class index -> category_id), ``cat_id_to_index``, ``names``, ``nc``, ``ann_file``,
    ``img_dir``.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "val",
        img_size: int = 160,
        *,
        ann_file: Optional[Union[str, os.PathLike]] = None,
        img_dir: Optional[Union[str, os.PathLike]] = None,
        stride: int = 32,
        cache: Optional[bool] = None,
        augment: bool = False,
        flip_lr: float = 0.5,
        hsv: Tuple[float, float, float] = (0.015, 0.7, 0.4),
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size <= 0:
            raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
        if int(stride) <= 0 or img_size % int(stride):
            raise ValueError(
                f"img_size must be a multiple of the stride {stride}, got {img_size}; "
                f"try {max(int(stride), round(img_size / int(stride)) * int(stride))}")
        if not 0.0 <= float(flip_lr) <= 1.0:
            raise ValueError(f"flip_lr must be in [0, 1], got {flip_lr}")
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.img_size = int(img_size)
        self.stride = int(stride)
        self.augment = bool(augment)
        self.flip_lr = float(flip_lr)
        self.hsv = tuple(float(g) for g in hsv)
        self.seed = int(seed)
        self.epoch = 0
        self.ann_file, self.img_dir = self._resolve_paths(ann_file, img_dir)
        self.coco = _load_coco(self.ann_file, verbose)  # checked: raises CocoFormatError

        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.cat_ids: List[int] = [int(c["id"]) for c in cats]
        self.names: List[str] = [str(c.get("name", c["id"])) for c in cats]
        self.cat_id_to_index: Dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.nc = len(self.cat_ids)

        self.image_ids: List[int] = sorted(int(i) for i in self.coco.getImgIds())
        self._img_dir_real = Path(os.path.realpath(self.img_dir))  # links resolved: see _inside
        self._files = [self._image_path(i) for i in self.image_ids]
        missing = [str(p) for p in self._files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.ann_file} are missing from {self.img_dir}, "
                f"e.g. {missing[:3]}; check that the image folder matches the annotation file")
        # per image: (n, 5) rows class, x1, y1, x2, y2 in original pixels
        self._labels: List[np.ndarray] = [self._image_labels(i) for i in self.image_ids]

        if cache is None:
            cache = len(self.image_ids) * self.img_size ** 2 * 3 <= 2 * 1024 ** 3
        self._cache: Optional[List[Tuple[np.ndarray, Tuple[int, int], LetterboxInfo]]] = None
        if cache:
            self._cache = [self._load_letterboxed(i) for i in tqdm(
                range(len(self.image_ids)), desc=f"cache {self.split}", unit="img", disable=None,
                leave=False)]

    def _image_labels(self, image_id: int) -> np.ndarray:
        """``(n, 5)`` rows ``class, x1, y1, x2, y2`` of an image's boxes, clipped to the
        image; crowd regions and boxes with no area inside the image are left out."""
        info = self.coco.imgs[image_id]
        rows = []
        for a in self.coco.imgToAnns.get(image_id, []):
            if a["iscrowd"]:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, float(info["width"])), min(y + h, float(info["height"]))
            if x2 <= x1 or y2 <= y1:
                continue
            rows.append((self.cat_id_to_index[a["category_id"]], x1, y1, x2, y2))
        return np.asarray(rows, dtype=np.float64).reshape(-1, 5)

    # ------------------------------------------------------------------ paths
    def _image_path(self, image_id: int) -> Path:
        """The image's path: its ``file_name`` under the image folder, never outside it (checked by
        name here, for every image at once; links are followed when it is read, in :meth:`_inside`)."""
        name = self.coco.imgs[image_id]["file_name"]
        if not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise CocoFormatError(
                f"{self.ann_file}: image id {image_id}: 'file_name' {name!r} is not a path inside the image "
                f"folder {self.img_dir}; give the image's file name relative to that folder (no leading / "
                "and no '..')")
        return self.img_dir / name

    def _inside(self, index: int) -> Path:
        """Image ``index``'s path, after checking that it resolves (links followed) into the image folder."""
        path = self._files[index]
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._img_dir_real):
            raise CocoImageError(
                f"{path} (image id {self.image_ids[index]} of {self.ann_file}) leads through a link to {real}, "
                f"outside the image folder {self.img_dir}, which qcourse does not read; copy the image into the "
                "folder instead of linking to it")
        return path

    def _resolve_paths(self, ann_file, img_dir) -> Tuple[Path, Path]:
        root, split = self.root, self.split
        layouts = (f"{root}/images/{split}/ + {root}/annotations/instances_{split}.json, or "
                   f"{root}/{split}/ + {root}/annotations/instances_{split}.json")
        if ann_file is None or img_dir is None:
            if not root.exists():
                raise FileNotFoundError(
                    f"dataset root {root} does not exist; expected a COCO-format folder with "
                    f"{layouts}. For the course's synthetic data call "
                    "qcourse.yolo.datasets.ensure_default_dataset()")
            if not root.is_dir():
                raise NotADirectoryError(f"dataset root {root} is not a folder; expected {layouts}")
        if img_dir is None:
            tried = [root / "images" / split, root / split]
            found = [p for p in tried if p.is_dir()]
            if not found:
                raise FileNotFoundError(
                    f"no image folder for split {split!r}: tried {', '.join(str(p) for p in tried)}; "
                    f"expected {layouts} (or pass img_dir=...){_splits_found(root)}")
            img_dir = found[0]
        img_dir = Path(img_dir).expanduser()
        if not img_dir.is_dir():
            raise FileNotFoundError(f"image folder img_dir={str(img_dir)!r} does not exist; pass "
                                    "the folder that holds the images the annotation file lists")
        if ann_file is None:
            ann_file = root / "annotations" / f"instances_{split}.json"
            if not ann_file.is_file():
                raise FileNotFoundError(
                    f"annotation file {ann_file} not found; expected {layouts} "
                    f"(or pass ann_file=...){_splits_found(root)}")
        ann_file = Path(ann_file).expanduser()
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file ann_file={str(ann_file)!r} not found; pass "
                                    "the path of a COCO instances_*.json file")
        return ann_file, img_dir

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw used when items are fetched by plain index."""
        self.epoch = int(epoch)

    def load_image(self, index: int) -> np.ndarray:
        """The original image ``index`` as an ``(H, W, 3)`` uint8 RGB array.

        An image that is not read raises :class:`CocoImageError` naming the file: one outside the
        image folder (through a link), one Pillow cannot decode (not an image, truncated), and one
        with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's guard against decompression
        bombs, which alone would only warn below twice that limit).
        """
        path = self._inside(index)
        where = f"image id {self.image_ids[index]} of {self.ann_file}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    return np.asarray(im.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise CocoImageError(
                f"{path} ({where}) is larger than Pillow decodes ({str(e).rstrip('.')}; the limit is "
                f"PIL.Image.MAX_IMAGE_PIXELS); resize the image, or remove it from {self.ann_file.name}") from None
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            if isinstance(e, OSError) and e.errno is not None:  # from the OS (unreadable file): as is
                raise
            raise CocoImageError(
                f"{path} ({where}) cannot be read as an image ({type(e).__name__}: {e}); the file may be "
                f"truncated or not an image: replace it, or remove it from {self.ann_file.name}") from None

    def labels_xyxy(self, index: int) -> np.ndarray:
        """``(n, 5)`` float64 rows ``class, x1, y1, x2, y2`` in original-image pixels."""
        return self._labels[index].copy()

    def _load_letterboxed(self, index: int):
        img = self.load_image(index)
        shape = (int(img.shape[0]), int(img.shape[1]))
        lb_img, info = letterbox(img, self.img_size, stride=self.stride)
        return lb_img, shape, info

    def __getitem__(self, key):
        if isinstance(key, tuple):  # (index, epoch) from EpochSampler
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index %= len(self)
        if self._cache is not None:
            img, shape, info = self._cache[index]
        else:
            img, shape, info = self._load_letterboxed(index)
        lab = self._labels[index]
        hl, wl = info.shape
        targets = np.zeros((len(lab), 6), dtype=np.float32)
        if len(lab):
            xyxy = lab[:, 1:] * info.ratio + np.array([info.pad[0], info.pad[1]] * 2)
            targets[:, 1] = lab[:, 0]
            targets[:, 2] = (xyxy[:, 0] + xyxy[:, 2]) / 2 / wl
            targets[:, 3] = (xyxy[:, 1] + xyxy[:, 3]) / 2 / hl
            targets[:, 4] = (xyxy[:, 2] - xyxy[:, 0]) / wl
            targets[:, 5] = (xyxy[:, 3] - xyxy[:, 1]) / hl
        if self.augment:
            rng = np.random.default_rng((self.seed, epoch, index))
            if any(self.hsv):
                img = _augment_hsv(img, self.hsv, rng)
            if rng.random() < self.flip_lr:
                img = img[:, ::-1]
                targets[:, 2] = 1.0 - targets[:, 2]
        # numpy does the conversion: torch's intra-op threads cost more than they save on
        # arrays this small (and much more when other processes share the cores)
        chw = np.empty((3,) + img.shape[:2], dtype=np.float32)
        np.multiply(img.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=chw)
        return torch.from_numpy(chw), torch.from_numpy(targets), self.image_ids[index], shape, info

    def __repr__(self) -> str:
        return (f"CocoDetection({str(self.root)!r}, split={self.split!r}, img_size={self.img_size}, "
                f"images={len(self)}, classes={self.nc}, augment={self.augment})")


# ----------------------------------------------------------------------------- batching
def collate_fn(batch):
    """Batch items of :class:`CocoDetection`.

    Returns:
        ``(images, targets, image_ids, orig_shapes, letterbox_infos)`` where ``images`` is
        ``(B, 3, H, W)`` float32, ``targets`` is ``(N, 6)`` float32 with rows
        ``(image_index_in_batch, class, cx, cy, w, h)`` (normalised, as YOLOv7's loader),
        and the last three are lists of length ``B``.
    """
    images, targets, ids, shapes, infos = zip(*batch)
    rows = []
    for i, t in enumerate(targets):
        t = (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.float32).reshape(-1, 6)
        t[:, 0] = i
        rows.append(t)
    # stacked by numpy: see CocoDetection.__getitem__
    imgs = np.stack([im.numpy() if isinstance(im, torch.Tensor) else np.asarray(im) for im in images], 0)
    return (torch.from_numpy(imgs), torch.from_numpy(np.concatenate(rows, 0)), list(ids),
            list(shapes), list(infos))


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys so that augmentation differs per epoch and stays
    deterministic with any number of workers; shuffles with ``numpy`` seeded by
    ``(seed, epoch)``. The epoch advances each time a loader iterates over it."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = int(n), bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        order = (np.random.default_rng((self.seed, epoch)).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        return iter([(int(i), epoch) for i in order])


def create_dataloader(
    source: Union[str, os.PathLike, CocoDetection],
    split: str = "val",
    img_size: int = 160,
    batch_size: int = 32,
    *,
    shuffle: Optional[bool] = None,
    augment: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    **dataset_kwargs,
) -> DataLoader:
    """A ``DataLoader`` over a COCO-format dataset, batching with :func:`collate_fn`.

    Args:
        source: a dataset root (a :class:`CocoDetection` is built with ``split``,
            ``img_size``, ``augment``, ``seed`` and ``dataset_kwargs``) or an existing
            :class:`CocoDetection`.
        batch_size: images per batch.
        shuffle: visit images in a new random order each epoch (default: ``augment``).
        augment: random flip + HSV jitter (training).
        seed: seeds the order and (for a dataset built here) the augmentation; iterating the
            loader twice gives epochs 0 and 1 (``loader.sampler.set_epoch(e)`` to resume at
            epoch ``e``). A :class:`CocoDetection` passed in keeps its own augmentation seed.
        num_workers: worker processes (0 = load in the main process, fastest for the
            in-memory cache of small datasets).

    Each batch is ``(images, targets, image_ids, orig_shapes, letterbox_infos)``.
    """
    if isinstance(source, CocoDetection):
        dataset = source
        if dataset_kwargs:
            raise ValueError(f"dataset options {sorted(dataset_kwargs)} cannot be applied to an "
                             "existing CocoDetection; set them when you build it")
        if augment and not dataset.augment:
            raise ValueError("augment=True cannot be applied to an existing CocoDetection built "
                             "with augment=False; build it with CocoDetection(..., augment=True)")
    else:
        dataset = CocoDetection(source, split, img_size, augment=augment, seed=seed, **dataset_kwargs)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle is None:
        shuffle = dataset.augment
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        num_workers=int(num_workers),
        collate_fn=collate_fn,
        drop_last=bool(drop_last),
        persistent_workers=int(num_workers) > 0,
    )
