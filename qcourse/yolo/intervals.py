"""Lessons 5-8 — how sure a mAP is: bootstrap confidence intervals over images.

A mAP measured on 250 images is one draw: another 250 images of the same kind would give
another number. The bootstrap estimates how far it could move without new images: draw the
images again, with replacement, as many as there are, and score the same detections on that
sample; repeat a thousand times; the middle 95 % of the scores is the interval. A comparison
of two models on the same images (FP32 vs INT8, max vs entropy) is *paired*: each sample
scores both models on the same drawn images, and the interval is that of the difference —
much narrower than the two intervals side by side, because both models find the same images
hard.

Nothing is run again: :func:`match_table` keeps, from pycocotools' ``COCOeval.evaluate()``,
what its ``accumulate()`` needs for mAP (area "all", 100 detections per image): each
detection's image, score order and true/false-positive flag at the ten IoU thresholds, and
each image's count of ground-truth boxes. :func:`score` then does what ``accumulate()`` and
``summarize()`` do — cumulative precision and recall in score order, the precision envelope,
101 recall points — for many samples at once, an image drawn ``c`` times counting ``c``
times. On the whole image set it returns pycocotools' own mAP to the last bit, and on a
sample the mAP pycocotools gives for that sample's images with the duplicates included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["MatchTable", "match_table", "no_detections_table", "score", "resample", "bootstrap", "paired", "interval", "verdict",
           "Resampled", "save_table", "load_table", "VERDICTS"]

#: pycocotools' recall thresholds 0, 0.01, ..., 1 (``COCOeval.params.recThrs``)
_REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
_CHUNK = 64  # bootstrap samples scored at once: bounds the memory to ~64 x detections x 8 bytes
VERDICTS = ("reproduced", "not reproduced", "within noise")


@dataclass(frozen=True)
class MatchTable:
    """What mAP needs from one evaluation, image by image (see :func:`match_table`).

    ``image_ids`` (I,) the evaluated images; ``gt`` (K, I) each category's non-ignored
    ground-truth boxes per image; per category ``k``: ``det_image[k]`` (D,) the image index
    of each detection in pycocotools' order (score descending, stable), ``tp[k]`` and
    ``fp[k]`` (T, D) booleans at the T IoU thresholds (both False for an ignored detection).
    """

    image_ids: np.ndarray
    gt: np.ndarray
    det_image: Tuple[np.ndarray, ...]
    tp: Tuple[np.ndarray, ...]
    fp: Tuple[np.ndarray, ...]

    @property
    def n_images(self) -> int:
        return int(len(self.image_ids))


def match_table(ev) -> MatchTable:
    """The per-image matches of a ``COCOeval`` after ``evaluate()``, for area "all" and 100 detections.

    The images are ``ev.params.imgIds`` in their order, and the detections are concatenated
    and sorted exactly as ``accumulate()`` does, so :func:`score` with no weights returns
    ``ev.stats[0]`` and ``ev.stats[1]`` after ``accumulate(); summarize()``.
    """
    p = ev.params
    if not getattr(ev, "evalImgs", None):
        raise ValueError("the COCOeval has no per-image results: call evaluate() before match_table()")
    if p.useCats != 1 or list(map(tuple, p.areaRng))[0] != (0 ** 2, 1e5 ** 2):
        raise ValueError("match_table expects COCOeval's default bbox parameters (categories on, area 'all' first)")
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    gt = np.zeros((len(p.catIds), n_img), dtype=np.int64)
    det_image, tps, fps = [], [], []
    for k in range(len(p.catIds)):
        base = k * n_area * n_img  # area "all" is index 0
        scores, images, match, ignore = [], [], [], []
        for i in range(n_img):
            e = ev.evalImgs[base + i]
            if e is None:
                continue
            gt[k, i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            s = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
            scores.append(s)
            images.append(np.full(len(s), i, dtype=np.int64))
            match.append(np.asarray(e["dtMatches"])[:, :max_det])
            ignore.append(np.asarray(e["dtIgnore"])[:, :max_det])
        n_thr = len(p.iouThrs)
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # accumulate()'s order
            m = np.concatenate(match, axis=1)[:, order] > 0
            ig = np.concatenate(ignore, axis=1)[:, order] > 0
            det_image.append(np.concatenate(images)[order])
            tps.append(m & ~ig)
            fps.append(~m & ~ig)
        else:
            det_image.append(np.zeros(0, dtype=np.int64))
            tps.append(np.zeros((n_thr, 0), dtype=bool))
            fps.append(np.zeros((n_thr, 0), dtype=bool))
    return MatchTable(np.asarray(p.imgIds, dtype=np.int64), gt, tuple(det_image), tuple(tps), tuple(fps))


def no_detections_table(coco, image_ids: Sequence[int]) -> MatchTable:
    """The table of a model that found nothing on ``image_ids`` (pycocotools refuses to score no detections).

    Ground truth counts as ``evaluate()`` counts it: crowd boxes (and boxes marked ``ignore``) are ignored.
    """
    cat_ids = sorted(coco.getCatIds())
    image_ids = sorted(int(i) for i in image_ids)
    col = {iid: i for i, iid in enumerate(image_ids)}
    row = {cid: k for k, cid in enumerate(cat_ids)}
    gt = np.zeros((len(cat_ids), len(image_ids)), dtype=np.int64)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_ids)):
        if not (ann.get("iscrowd", 0) or ann.get("ignore", 0)) and ann["category_id"] in row:
            gt[row[ann["category_id"]], col[ann["image_id"]]] += 1
    n_thr = 10  # IoU 0.50:0.05:0.95
    empty = tuple(np.zeros((n_thr, 0), dtype=bool) for _ in cat_ids)
    return MatchTable(np.asarray(image_ids, dtype=np.int64), gt,
                      tuple(np.zeros(0, dtype=np.int64) for _ in cat_ids), empty, empty)


def _precision(table: MatchTable, k: int, weights: np.ndarray) -> np.ndarray:
    """(S, T, R) interpolated precision of category ``k`` at the recall thresholds, images weighted
    by ``weights`` (S, I); NaN in a sample with no ground truth of ``k``."""
    n_s = weights.shape[0]
    n_gt = weights @ table.gt[k]  # (S,)
    tp_all, fp_all, img = table.tp[k], table.fp[k], table.det_image[k]
    out = np.full((n_s, tp_all.shape[0], len(_REC_THRS)), np.nan)
    has_gt = n_gt > 0
    if not has_gt.any():
        return out
    d = len(img)
    if d == 0:
        out[has_gt] = 0.0
        return out
    w = weights[:, img]  # (S, D): how often each detection's image was drawn
    # Whole counts (a bootstrap's draws, a split's 0/1) sum exactly in float32 while the running totals
    # stay below 2^24: the same numbers as float64, three times faster. When no detection is ignored
    # (every one is a TP or an FP at every threshold) the FP totals are the detections' totals minus
    # the TP totals: one running sum fewer per threshold, again exact for whole counts.
    whole = bool(np.all(w == np.floor(w))) and float(w.max(initial=0.0)) * d < 2.0 ** 24
    counted = tp_all | fp_all
    shared = whole and bool(np.all(counted == counted[0]))
    if whole:
        w = w.astype(np.float32)
        total = np.cumsum(w * counted[0], axis=1) if shared else None
    rows = np.arange(n_s)[:, None]
    for t in range(tp_all.shape[0]):
        tp = np.cumsum(w * tp_all[t], axis=1)
        fp = total - tp if shared else np.cumsum(w * fp_all[t], axis=1)
        if whole:
            tp, fp = tp.astype(np.float64), fp.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rc = tp / n_gt[:, None]
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
        # searchsorted row by row: recall and the thresholds compare as pycocotools compares them
        idx = np.stack([np.searchsorted(r, _REC_THRS, side="left") if g else np.zeros(len(_REC_THRS), int)
                        for r, g in zip(rc, has_gt)])
        q = np.where(idx < d, pr[rows, np.minimum(idx, d - 1)], 0.0)  # past the last detection: 0
        out[:, t] = q
    out[~has_gt] = np.nan
    return out


def score(table: MatchTable, weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """mAP@0.5:0.95 and mAP@0.5 of ``table`` with images weighted by ``weights`` (S, I) counts.

    ``weights=None`` is every image once: pycocotools' own numbers, as floats. With a (S, I)
    array, arrays of S scores. A category with no ground truth in a sample is left out of
    that sample's mean, as ``summarize()`` leaves it out (precision -1).
    """
    single = weights is None
    w = np.ones((1, table.n_images)) if single else np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != table.n_images:
        raise ValueError(f"weights must have shape (samples, {table.n_images}), got {w.shape}")
    maps, maps50 = [], []
    for lo in range(0, w.shape[0], _CHUNK):
        chunk = w[lo:lo + _CHUNK]
        prec = np.stack([_precision(table, k, chunk) for k in range(len(table.tp))], axis=3)  # (S, T, R, K)
        for q in prec:  # summarize()'s np.mean(s[s > -1]): the same values in the same order, same bits
            valid = ~np.isnan(q[0, 0])
            maps.append(float(np.mean(q[:, :, valid].ravel())) if valid.any() else -1.0)
            maps50.append(float(np.mean(q[0][:, valid].ravel())) if valid.any() else -1.0)
    res = {"map": np.array(maps), "map50": np.array(maps50)}
    return {k: float(v[0]) for k, v in res.items()} if single else res


def resample(n_images: int, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(n, n_images) counts: how often each image is drawn in each of ``n`` bootstrap samples."""
    if n_images < 2:
        raise ValueError(f"a bootstrap needs at least 2 images, got {n_images}; evaluate more images")
    if n < 10:
        raise ValueError(f"n={n} bootstrap samples cannot give a 95% interval; use n >= 1000 (10 at the least)")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n, n_images))
    counts = np.zeros((n, n_images))
    np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
    return counts


def interval(samples: np.ndarray, level: float = 0.95) -> List[float]:
    """The percentile interval ``[lo, hi]`` holding the middle ``level`` of ``samples``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}; e.g. 0.95")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap(table: MatchTable, n: int = 1000, seed: int = 0, level: float = 0.95,
              metric: str = "map") -> Dict[str, object]:
    """``{"value", "interval", "n"}``: the mAP of ``table`` and its bootstrap interval over images."""
    return Resampled(table, n, seed, metric).bootstrap(level)


def _check_same_images(a: MatchTable, b: MatchTable) -> None:
    if not np.array_equal(a.image_ids, b.image_ids):
        raise ValueError(f"a paired comparison needs the same images: {a.n_images} vs {b.n_images} images, "
                         f"{len(np.setxor1d(a.image_ids, b.image_ids))} differ; evaluate both on one split")


def paired(a: MatchTable, b: MatchTable, n: int = 1000, seed: int = 0, level: float = 0.95,
           metric: str = "map") -> Dict[str, object]:
    """``{"diff", "interval", "n"}``: mAP(a) - mAP(b) and its paired bootstrap interval (same draws)."""
    _check_same_images(a, b)
    return Resampled(a, n, seed, metric).minus(Resampled(b, n, seed, metric), level)


class Resampled:
    """One table's bootstrap scores, computed once: what :func:`bootstrap` and :func:`paired` return, bit for bit.

    A report that gives every model an interval and compares each with a reference scores
    each table once (``n`` samples, drawn from ``seed``) instead of once per comparison:
    ``Resampled(a).bootstrap()`` is ``bootstrap(a)`` and ``Resampled(a).minus(Resampled(b))``
    is ``paired(a, b)``, because the same ``n`` and ``seed`` draw the same images.
    """

    def __init__(self, table: MatchTable, n: int = 1000, seed: int = 0, metric: str = "map"):
        self.table, self.n, self.seed, self.metric = table, n, seed, metric
        self.value = score(table)[metric]
        self.samples = score(table, resample(table.n_images, n, seed))[metric]

    def bootstrap(self, level: float = 0.95) -> Dict[str, object]:
        """``{"value", "interval", "n"}``, as :func:`bootstrap` returns them."""
        return {"value": self.value, "interval": interval(self.samples, level), "n": self.n}

    def minus(self, other: "Resampled", level: float = 0.95) -> Dict[str, object]:
        """``{"diff", "interval", "n"}`` of this table minus ``other``, as :func:`paired` returns them."""
        _check_same_images(self.table, other.table)
        if (self.n, self.seed, self.metric) != (other.n, other.seed, other.metric):
            raise ValueError(f"a paired comparison needs the same draws: n={self.n}, seed={self.seed}, {self.metric} "
                             f"vs n={other.n}, seed={other.seed}, {other.metric}; resample both alike")
        return {"diff": self.value - other.value, "interval": interval(self.samples - other.samples, level),
                "n": self.n}


    def recovered(self, start: "Resampled", target: "Resampled", level: float = 0.95) -> Dict[str, object]:
        """``{"share", "interval", "n", "gap"}``: the share of the gap from ``start`` to ``target`` this table closes.

        ``share = (self - start) / (target - start)`` (e.g. QAT's gain over PTQ as a share of what
        PTQ lost to FP32; 1 is all of it), its interval from the same draws, each sample's ratio
        of paired differences; ``gap`` is ``target - start`` with its paired interval. A gap
        whose interval holds 0 leaves the share undefined: it is refused.
        """
        for other in (start, target):
            self.minus(other)  # the same images and draws, or a clear error
        gap = target.minus(start, level)
        if gap["interval"][0] <= 0.0 <= gap["interval"][1]:
            raise ValueError(f"the gap to recover ({gap['diff']:+.4f}, interval [{gap['interval'][0]:+.4f}, "
                             f"{gap['interval'][1]:+.4f}]) is within noise, so no share of it can be measured; "
                             "compare in a setting where the start is significantly below the target")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = (self.samples - start.samples) / (target.samples - start.samples)
        ratios = ratios[np.isfinite(ratios)]
        return {"share": (self.value - start.value) / (target.value - start.value),
                "interval": interval(ratios, level), "n": self.n, "gap": gap}


def verdict(published_diff: float, measured_interval: Sequence[float]) -> str:
    """How a measured difference stands against a published one (same sign convention).

    *reproduced*: the interval excludes 0 on the published side; *not reproduced*: it
    excludes 0 on the other side; *within noise*: it holds 0.
    """
    lo, hi = float(measured_interval[0]), float(measured_interval[1])
    if lo <= 0.0 <= hi:
        return "within noise"
    same_side = (lo > 0) == (published_diff > 0)
    return "reproduced" if same_side and published_diff != 0 else "not reproduced"


def save_table(path: Union[str, os.PathLike], table: MatchTable) -> None:
    """Write ``table`` as one ``.npz`` of plain arrays (no pickle), atomically."""
    from qcourse.utils import atomic_write

    arrays = {"image_ids": table.image_ids, "gt": table.gt}
    for k in range(len(table.tp)):
        arrays[f"det_image_{k}"] = table.det_image[k]
        arrays[f"tp_{k}"] = table.tp[k]
        arrays[f"fp_{k}"] = table.fp[k]
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_table(path: Union[str, os.PathLike]) -> MatchTable:
    """Read a table :func:`save_table` wrote (plain arrays only: nothing in the file is executed)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            k = int(f["gt"].shape[0])
            return MatchTable(f["image_ids"], f["gt"], tuple(f[f"det_image_{i}"] for i in range(k)),
                              tuple(f[f"tp_{i}"] for i in range(k)), tuple(f[f"fp_{i}"] for i in range(k)))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a match table qcourse wrote ({type(e).__name__}); rerun the "
                         "evaluation that made it") from None
