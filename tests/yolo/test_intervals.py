"""qcourse.yolo.intervals: bootstrap mAP checked against pycocotools run on the resampled images."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from qcourse.yolo import intervals

from oracles import coco_eval as _coco_eval


def _dataset(seed=0, n_images=30, n_cats=3):
    """Ground truth and noisy detections (random scores: no ties) in COCO form."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"})
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(8, 50), rng.uniform(8, 50)
            cat = int(rng.integers(1, n_cats + 1))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            if rng.random() < 0.8:  # found, with a jittered box, sometimes the wrong class
                jit = rng.normal(0, 4, 4)
                dcat = cat if rng.random() < 0.9 else int(rng.integers(1, n_cats + 1))
                dets.append([i, x + jit[0], y + jit[1], max(2, w + jit[2]), max(2, h + jit[3]), rng.random(), dcat])
        for _ in range(rng.integers(0, 3)):  # false positives
            dets.append([i, *rng.uniform(0, 150, 2), *rng.uniform(5, 40, 2), rng.random() * 0.6,
                         int(rng.integers(1, n_cats + 1))])
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, np.array(dets, dtype=np.float64)


def _duplicated(gt_dict, dets, counts):
    """The dataset with image i present counts[i] times (new ids): what the bootstrap scores."""
    images, anns, new_dets = [], [], []
    ids = [im["id"] for im in sorted(gt_dict["images"], key=lambda im: im["id"])]
    for idx, c in enumerate(counts.astype(int)):
        for _ in range(c):
            new_id = len(images) + 1
            images.append({**gt_dict["images"][idx], "id": new_id})
            for a in gt_dict["annotations"]:
                if a["image_id"] == ids[idx]:
                    anns.append({**a, "id": len(anns) + 1, "image_id": new_id})
            for d in dets[dets[:, 0] == ids[idx]]:
                new_dets.append([new_id, *d[1:]])
    return {**gt_dict, "images": images, "annotations": anns}, np.array(new_dets)


def test_whole_set_gives_pycocotools_map_to_the_last_bit():
    gt, dets = _dataset()
    ev = _coco_eval(gt, dets)
    res = intervals.score(intervals.match_table(ev))
    assert res["map"] == ev.stats[0] and res["map50"] == ev.stats[1]
    assert 0.1 < ev.stats[0] < 0.9  # a case where every part of the computation matters


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_bootstrap_sample_scores_what_pycocotools_gives_for_the_duplicated_images(seed):
    gt, dets = _dataset(seed=seed)
    table = intervals.match_table(_coco_eval(gt, dets))
    counts = intervals.resample(table.n_images, n=10, seed=seed)[:4]
    got = intervals.score(table, counts)
    for s in range(len(counts)):
        ev = _coco_eval(*_duplicated(gt, dets, counts[s]))
        assert got["map"][s] == pytest.approx(ev.stats[0], abs=1e-12)
        assert got["map50"][s] == pytest.approx(ev.stats[1], abs=1e-12)


def test_interval_holds_the_value_and_narrows_with_more_images():
    small = intervals.match_table(_coco_eval(*_dataset(seed=4, n_images=20)))
    large = intervals.match_table(_coco_eval(*_dataset(seed=4, n_images=200)))
    a, b = intervals.bootstrap(small, n=200), intervals.bootstrap(large, n=200)
    for r in (a, b):
        assert r["interval"][0] <= r["value"] <= r["interval"][1]
    assert np.diff(b["interval"])[0] < np.diff(a["interval"])[0]


def test_paired_interval_of_a_model_against_itself_is_zero_and_a_worse_model_is_detected():
    gt, dets = _dataset(seed=5, n_images=120)
    good = intervals.match_table(_coco_eval(gt, dets))
    same = intervals.paired(good, good, n=100)
    assert same["diff"] == 0 and same["interval"] == [0.0, 0.0]
    worse = dets.copy()
    rng = np.random.default_rng(0)
    worse[:, 1:5] += rng.normal(0, 6, (len(worse), 4))  # boxes 6 px further off: lower mAP at high IoU
    bad = intervals.match_table(_coco_eval(gt, worse))
    res = intervals.paired(good, bad, n=300)
    assert res["diff"] > 0 and res["interval"][0] > 0
    assert intervals.verdict(+0.05, res["interval"]) == "reproduced"
    assert intervals.verdict(-0.05, res["interval"]) == "not reproduced"
    assert intervals.verdict(+0.05, [-0.01, 0.02]) == "within noise"


def test_paired_refuses_different_images_and_tiny_settings():
    a = intervals.match_table(_coco_eval(*_dataset(seed=6, n_images=10)))
    b = intervals.match_table(_coco_eval(*_dataset(seed=6, n_images=12)))
    with pytest.raises(ValueError, match="same images"):
        intervals.paired(a, b)
    with pytest.raises(ValueError, match="n >= 1000"):
        intervals.resample(10, n=3)
    with pytest.raises(ValueError, match="at least 2 images"):
        intervals.resample(1)


def test_table_round_trips_through_npz_without_pickle(tmp_path):
    table = intervals.match_table(_coco_eval(*_dataset(seed=7)))
    path = tmp_path / "matches.npz"
    intervals.save_table(path, table)
    back = intervals.load_table(path)
    assert intervals.score(back) == intervals.score(table)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a match table"):
        intervals.load_table(bad)


def test_no_detections_scores_zero_with_the_ground_truth_of_every_image():
    gt_dict, _ = _dataset(seed=8, n_images=15)
    coco = COCO()
    coco.dataset = gt_dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    ids = [im["id"] for im in gt_dict["images"]]
    table = intervals.no_detections_table(coco, ids)
    expected = sum(1 for a in gt_dict["annotations"] if not a["iscrowd"])
    assert table.gt.sum() == expected and table.n_images == 15
    assert intervals.score(table) == {"map": 0.0, "map50": 0.0}
    assert intervals.bootstrap(table, n=50)["interval"] == [0.0, 0.0]


def test_evaluate_returns_the_matches_its_map_came_from(small_dataset):
    import torch

    from qcourse.yolo import default_checkpoint, models
    from qcourse.yolo.datasets import create_dataloader
    from qcourse.yolo.evaluate import evaluate

    root = small_dataset("intervals", n_train=2, n_val=24, img_size=160, seed=3)
    model = models.load_checkpoint(default_checkpoint())
    torch.manual_seed(0)
    res = evaluate(model, create_dataloader(root, "val", img_size=160, batch_size=12), progress=False,
                   matches=True)
    table = res["matches"]
    assert table.n_images == res["images"] == 24
    assert intervals.score(table) == {"map": res["map"], "map50": res["map50"]}
    assert sum(len(d) for d in table.det_image) <= res["detections"]
    nothing = evaluate(lambda x: torch.zeros(x.shape[0], 10, 11), create_dataloader(root, "val", img_size=160),
                       progress=False, matches=True)
    assert nothing["matches"].gt.sum() == table.gt.sum() and intervals.score(nothing["matches"])["map"] == 0.0


def _noisier(dets, sigma, seed=0):
    """The same detections with boxes ``sigma`` px further off: a worse model on the same images."""
    worse = dets.copy()
    worse[:, 1:5] += np.random.default_rng(seed).normal(0, sigma, (len(worse), 4))
    return worse


def test_recovered_share_is_the_ratio_of_paired_differences_sample_by_sample():
    gt, dets = _dataset(seed=7, n_images=120)
    target, start, middle = (intervals.Resampled(intervals.match_table(_coco_eval(gt, d)), n=200, seed=3)
                             for d in (dets, _noisier(dets, 8), _noisier(dets, 3)))
    res = middle.recovered(start, target)
    maps = {name: _coco_eval(gt, d).stats[0] for name, d in (("t", dets), ("s", _noisier(dets, 8)),
                                                               ("m", _noisier(dets, 3)))}
    assert res["share"] == pytest.approx((maps["m"] - maps["s"]) / (maps["t"] - maps["s"]), abs=1e-12)
    assert 0.0 < res["share"] < 1.0 and res["interval"][0] <= res["share"] <= res["interval"][1]
    # one bootstrap sample, scored by pycocotools on the duplicated images
    counts = intervals.resample(120, n=200, seed=3)[0]
    s = {name: _coco_eval(*_duplicated(gt, d, counts)).stats[0]
         for name, d in (("t", dets), ("s", _noisier(dets, 8)), ("m", _noisier(dets, 3)))}
    expected = (middle.samples - start.samples) / (target.samples - start.samples)
    assert expected[0] == pytest.approx((s["m"] - s["s"]) / (s["t"] - s["s"]), abs=1e-9)
    assert res["interval"] == intervals.interval(expected)
    assert res["gap"]["diff"] == pytest.approx(maps["t"] - maps["s"], abs=1e-12) and res["gap"]["interval"][0] > 0
    assert target.recovered(start, target)["share"] == 1.0 and start.recovered(start, target)["share"] == 0.0


def test_recovered_share_is_refused_when_there_is_no_significant_gap():
    gt, dets = _dataset(seed=8, n_images=60)
    same = intervals.Resampled(intervals.match_table(_coco_eval(gt, dets)), n=100)
    with pytest.raises(ValueError, match="within noise"):
        same.recovered(same, same)
    other = intervals.Resampled(intervals.match_table(_coco_eval(*_dataset(seed=8, n_images=40))), n=100)
    with pytest.raises(ValueError, match="same images"):
        same.recovered(other, same)
