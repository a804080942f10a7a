"""Lessons 5-8 — a COCO-format detection dataset, letterboxing and batching.

One loader serves the course's synthetic dataset (:mod:`qcourse.datasets.synthetic`) and
real COCO val2017. Two folder layouts are understood::

    root/images/{split}/*.jpg   + root/annotations/instances_{split}.json   (synthetic, YOLO)
    root/{split}/*.jpg          + root/annotations/instances_{split}.json   (COCO's own zips)

so ``CocoDetection("/data/coco", split="val2017")`` finds ``/data/coco/val2017/`` (or
``/data/coco/images/val2017/``) and ``/data/coco/annotations/instances_val2017.json``.

Each item is letterboxed the way YOLOv7 evaluates: resized so the longer side equals
``img_size`` (aspect ratio kept), then padded with grey 114 to ``img_size x img_size``
(a multiple of the model stride). The ratio and the padding are returned, so predicted
boxes can be mapped back to the original pixels (:func:`qcourse.postprocess.scale_boxes`).

Class indices: a model predicts contiguous indices ``0 .. nc-1``; the dataset maps them to
the json's ``category_id`` by sorting the json's categories by id
(:attr:`CocoDetection.cat_ids`). For real COCO this gives exactly the standard 80-class
mapping :data:`COCO80_TO_91` (COCO's ids run from 1 to 90 with ten gaps).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

__all__ = [
    "COCO80_TO_91",
    "COCO80_NAMES",
    "COCO91_TO_80",
    "coco80_to_91",
    "coco91_to_80",
    "LetterboxInfo",
    "letterbox",
    "CocoDetection",
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


# ----------------------------------------------------------------------------- dataset
def _quiet_coco(ann_file: Path, verbose: bool):
    from pycocotools.coco import COCO

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco = COCO(str(ann_file))
    if verbose:
        print(buf.getvalue(), end="")
    return coco


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
        self.coco = _quiet_coco(self.ann_file, verbose)

        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{self.ann_file} defines no categories; a detection json needs a "
                             "'categories' list of {{'id', 'name'}}")
        self.cat_ids: List[int] = [int(c["id"]) for c in cats]
        self.names: List[str] = [str(c.get("name", c["id"])) for c in cats]
        self.cat_id_to_index: Dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.nc = len(self.cat_ids)

        self.image_ids: List[int] = sorted(int(i) for i in self.coco.getImgIds())
        self._files: List[Path] = []
        self._labels: List[np.ndarray] = []  # per image: (n, 5) class, x1, y1, x2, y2 (orig px)
        missing = []
        for iid in self.image_ids:
            info = self.coco.imgs[iid]
            path = self.img_dir / info["file_name"]
            if not path.is_file():
                missing.append(str(path))
            self._files.append(path)
            rows = []
            for a in self.coco.imgToAnns.get(iid, []):
                if a.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                x1, y1 = max(x, 0.0), max(y, 0.0)
                x2, y2 = min(x + w, float(info["width"])), min(y + h, float(info["height"]))
                if x2 <= x1 or y2 <= y1:
                    continue
                rows.append((self.cat_id_to_index[int(a["category_id"])], x1, y1, x2, y2))
            self._labels.append(np.asarray(rows, dtype=np.float64).reshape(-1, 5))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.ann_file} are missing from {self.img_dir}, "
                f"e.g. {missing[:3]}; check that the image folder matches the annotation file")

        if cache is None:
            cache = len(self.image_ids) * self.img_size ** 2 * 3 <= 2 * 1024 ** 3
        self._cache: Optional[List[Tuple[np.ndarray, Tuple[int, int], LetterboxInfo]]] = None
        if cache:
            self._cache = [self._load_letterboxed(i) for i in tqdm(
                range(len(self.image_ids)), desc=f"cache {self.split}", unit="img", disable=None,
                leave=False)]

    # ------------------------------------------------------------------ paths
    def _resolve_paths(self, ann_file, img_dir) -> Tuple[Path, Path]:
        root, split = self.root, self.split
        layouts = (f"{root}/images/{split}/ + {root}/annotations/instances_{split}.json, or "
                   f"{root}/{split}/ + {root}/annotations/instances_{split}.json")
        if ann_file is None or img_dir is None:
            if not root.exists():
                raise FileNotFoundError(
                    f"dataset root {root} does not exist; expected a COCO-format folder with "
                    f"{layouts}. For the course's synthetic data call "
                    "qcourse.datasets.ensure_default_dataset()")
            if not root.is_dir():
                raise NotADirectoryError(f"dataset root {root} is not a folder; expected {layouts}")
        if img_dir is None:
            tried = [root / "images" / split, root / split]
            found = [p for p in tried if p.is_dir()]
            if not found:
                raise FileNotFoundError(
                    f"no image folder for split {split!r}: tried {', '.join(str(p) for p in tried)}; "
                    f"expected {layouts} (or pass img_dir=...)")
            img_dir = found[0]
        img_dir = Path(img_dir).expanduser()
        if not img_dir.is_dir():
            raise FileNotFoundError(f"image folder {img_dir} does not exist")
        if ann_file is None:
            ann_file = root / "annotations" / f"instances_{split}.json"
            if not ann_file.is_file():
                raise FileNotFoundError(
                    f"annotation file {ann_file} not found; expected {layouts} "
                    "(or pass ann_file=...)")
        ann_file = Path(ann_file).expanduser()
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file {ann_file} not found")
        return ann_file, img_dir

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw used when items are fetched by plain index."""
        self.epoch = int(epoch)

    def load_image(self, index: int) -> np.ndarray:
        """The original image ``index`` as an ``(H, W, 3)`` uint8 RGB array."""
        with Image.open(self._files[index]) as im:
            return np.asarray(im.convert("RGB"))

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
