"""The statistics of lesson 6 on made-up detections: split-half rho, top-k vs random, and tables kept on resume.

Oracles: pycocotools' COCOeval run on each half's images alone (tests/oracles.py) and scipy's
Spearman; the split itself is documented as ``numpy.random.default_rng(seed).permutation(n)``,
its first ``n // 2`` positions one half, the rest the other.
"""
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from oracles import coco_eval
from qcourse import sensitivity as sens
from qcourse.yolo import intervals
from qcourse.yolo import sensitivity as ys


def _dataset(seed=0, n_images=16, n_cats=2):
    """Ground truth and detections (random scores, no ties) in COCO form."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(10, 50), rng.uniform(10, 50)
            cat = int(rng.integers(1, n_cats + 1))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:
                jit = rng.normal(0, 3, 4)
                dets.append([i, x + jit[0], y + jit[1], max(2, w + jit[2]), max(2, h + jit[3]), rng.random(), cat])
        dets.append([i, *rng.uniform(0, 150, 2), *rng.uniform(5, 40, 2), rng.random() * 0.5,
                     int(rng.integers(1, n_cats + 1))])
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, np.array(dets, dtype=np.float64)


def _noisier(dets, sigma, seed):
    worse = dets.copy()
    worse[:, 1:5] += np.random.default_rng(seed).normal(0, sigma, (len(worse), 4))
    return worse


def _subset(gt, dets, ids):
    """The dataset restricted to the images ``ids``: what pycocotools scores for one half."""
    keep = set(int(i) for i in ids)
    return ({**gt, "images": [im for im in gt["images"] if im["id"] in keep],
             "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]},
            dets[np.isin(dets[:, 0], list(keep))])


@pytest.fixture(scope="module")
def made_up():
    """FP32-like detections, an INT8-like (noisier) model, and 6 'layers in float' of varied noise."""
    gt, dets = _dataset()
    models = {"int8": _noisier(dets, 6.0, 1)}
    for j, sigma in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 5.5]):
        models[f"model.{j}"] = _noisier(dets, sigma, 10 + j)
    tables = {name: intervals.match_table(coco_eval(gt, d)) for name, d in models.items()}
    return gt, models, tables


def test_split_half_rho_is_spearman_of_pycocotools_drops_on_each_half(made_up):
    gt, models, tables = made_up
    layers = {k: t for k, t in tables.items() if k != "int8"}
    res = ys.split_half(layers, tables["int8"], seed=3, splits=7)
    n = tables["int8"].n_images
    perm = np.random.default_rng(3).permutation(n)
    ids = tables["int8"].image_ids
    drops = []
    for half in (perm[: n // 2], perm[n // 2:]):
        half_ids = ids[half]
        int8 = coco_eval(*_subset(gt, models["int8"], half_ids)).stats[0]
        drops.append([coco_eval(*_subset(gt, models[name], half_ids)).stats[0] - int8 for name in layers])
    want = spearmanr(drops[0], drops[1])[0]
    assert res["rho"] == pytest.approx(want, abs=1e-9)
    assert res["halves"] == [n // 2, n - n // 2] and res["seed"] == 3 and res["splits"] == 7
    # the median and the 5-95 % range are over all 7 splits, the first included
    w = ys.halves(n, 3, 7)
    _, rhos = ys.split_rhos(list(layers.values()), tables["int8"], w)
    assert rhos[0] == pytest.approx(want, abs=1e-9)
    assert res["median"] == pytest.approx(np.median(rhos)) and res["p05_p95"][0] <= res["median"] <= res["p05_p95"][1]
    half_a = sorted(layers, key=lambda name: -drops[0][list(layers).index(name)])[:5]
    assert set(res["top5_halves"][0]) == set(half_a)


def test_top_k_vs_random_and_the_criteria(made_up):
    _, _, tables = made_up
    fp32 = tables["model.0"]  # the least noisy stands in for FP32
    layers = {k: t for k, t in tables.items() if k != "int8"}
    rand = [tables["model.4"], tables["model.5"]]
    res = ys.statistics(fp32, tables["int8"], layers, tables["model.1"], rand, boot=200, seed=0, splits=5)
    r = {k: intervals.Resampled(t, n=200, seed=0) for k, t in tables.items()}
    want_diff = r["model.1"].value - np.mean([r["model.4"].value, r["model.5"].value])
    assert res["topk"]["vs_random"]["diff"] == pytest.approx(want_diff, abs=1e-12)
    want_iv = intervals.interval(r["model.1"].samples - (r["model.4"].samples + r["model.5"].samples) / 2)
    assert res["topk"]["vs_random"]["interval"] == pytest.approx(want_iv, abs=1e-12)
    rec = r["model.1"].recovered(r["int8"], r["model.0"])
    assert res["topk"]["recovered_share"] == pytest.approx(rec["share"]) and res["topk"]["interval"] == rec["interval"]
    assert res["loss"]["diff"] == pytest.approx(r["model.0"].value - r["int8"].value)
    assert res["holds"] == all(res["criteria"].values()) and len(res["criteria"]) == 4
    # a ranking that is not stable is not "the most sensitive layers"
    unstable = {**res, "holds": False}
    assert ys.ranking_title(unstable) == "the layers the scan ranks first"
    assert ys.ranking_title({**res, "holds": True}) == "the most sensitive layers"


def test_random_draws_are_seeded_and_in_model_order():
    layers = [f"model.{i}" for i in range(20)]
    a, b = ys.random_draws(layers, 5, 3, seed=4), ys.random_draws(layers, 5, 3, seed=4)
    assert a == b and len(a) == 3 and all(len(set(d)) == 5 for d in a)
    assert all(d == sorted(d, key=layers.index) for d in a) and a != ys.random_draws(layers, 5, 3, seed=5)


class _Prep:
    """A stand-in for ys.Prepared: ``evaluate_matches`` gives a table whose ground truth encodes the score."""

    def __init__(self, evaluate):
        self.evaluate, self.calls = evaluate, []

    def evaluate_matches(self, model):
        value = self.evaluate(model)
        self.calls.append(value)
        empty = (np.zeros((10, 0), dtype=bool),)
        table = intervals.MatchTable(np.array([1, 2]), np.array([[int(value * 1e9), 1]]),
                                     (np.zeros(0, dtype=np.int64),), empty, empty)
        return value, table


def test_tables_are_kept_across_a_resumed_scan(tmp_path):
    import importlib.util

    # the tiny network of tests/test_sensitivity.py, by path: tests/yolo/ has a module of the same name
    spec = importlib.util.spec_from_file_location("tiny_sensitivity_net", Path(__file__).with_name("test_sensitivity.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    evaluate, make_quantized = tiny.evaluate, tiny.make_quantized

    model = make_quantized()
    layers = sens.quantized_layers(model)
    path, folder = tmp_path / "sensitivity.json", tmp_path / "tables"
    prep = _Prep(evaluate)
    keeper = ys.TableKeeper(prep, folder, layers)

    def stop_after_two_layers(m):
        if len(prep.calls) == 4:  # FP32, INT8, two layers
            raise KeyboardInterrupt
        return keeper(m)

    with pytest.raises(KeyboardInterrupt):
        sens.sensitivity_analysis(model, stop_after_two_layers, path)
    first = {p.name: p.read_bytes() for p in folder.glob("*.npz")}
    assert set(first) == {"fp32.npz", "int8.npz", f"float-{layers[0]}.npz", f"float-{layers[1]}.npz"}

    prep2 = _Prep(evaluate)
    keeper2 = ys.TableKeeper(prep2, folder, layers)
    scan = sens.sensitivity_analysis(model, keeper2, path)
    assert len(prep2.calls) == len(layers) - 2  # only the layers not yet done
    for name, data in first.items():  # the interrupted run's tables are still there, unchanged
        assert (folder / name).read_bytes() == data
    # every row of the scan has its own table, the one its value came from
    for row in scan["layers"]:
        t = keeper2.table(keeper2.name_for([row["layer"]]))
        assert t.gt[0, 0] == int(row["map"] * 1e9)
    assert keeper2.table("fp32").gt[0, 0] == int(scan["fp32"]["map"] * 1e9)
    (folder / f"float-{layers[-1]}.npz").unlink()
    with pytest.raises(ValueError, match="missing"):
        ys.TableKeeper(prep2, folder, layers).table(f"float-{layers[-1]}")
