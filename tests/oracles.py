"""Independent reference implementations used as test oracles."""
import numpy as np


def np_quant(x, amax, num_bits=8, unsigned=False, narrow_range=True):
    """Independent numpy reference: float32 step = amax/max_bound, round half to even."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.asarray(amax, dtype=np.float32)
    max_bound = 2 ** (num_bits - 1 + int(unsigned)) - 1
    min_bound = 0 if unsigned else (-max_bound if narrow_range else -max_bound - 1)
    tiny = amax <= np.float32(2.0 ** -24)
    step = np.where(tiny, np.float32(1), amax / np.float32(max_bound)).astype(np.float32)
    codes = np.clip(np.rint(x / step), min_bound, max_bound).astype(np.float32)
    codes = np.where(tiny, np.float32(0), codes).astype(np.float32)
    return codes, (codes * step).astype(np.float32), step


def coco_eval(gt_dict, dets):
    """pycocotools' COCOeval (bbox) of ``dets`` (rows image_id, x, y, w, h, score, category_id) against
    the ground truth ``gt_dict`` in COCO form, after evaluate / accumulate / summarize, quietly."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev
