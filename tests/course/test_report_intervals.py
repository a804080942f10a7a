"""The intervals and verdicts of the course's report, recomputed independently.

Ground truth and six models' detections are made up here, scored by pycocotools, and their
match tables stored as ``.npz`` files the way the PTQ and engines stages store them. The
stages' interval code (:func:`qcourse.course.stages.ptq_intervals` and
:func:`~qcourse.course.stages.engine_intervals`) then fills the results, and what the report
prints (the tables, ``claims``) is checked against :func:`qcourse.yolo.intervals.paired` and
:func:`~qcourse.yolo.intervals.bootstrap` run here on the stored tables, against pycocotools'
own mAP, and against the verdict rule written out here.
"""
import json

import numpy as np
import pytest

from qcourse.course import report, stages
from qcourse.yolo import intervals

from oracles import coco_eval as _evaluated

N_IMAGES, N_CATS = 40, 3


def _ground_truth(seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, N_IMAGES + 1):
        images.append({"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(10, 50), rng.uniform(10, 50)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, N_CATS + 1)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in range(1, N_CATS + 1)]}


def _detections(gt, seed, found, jitter):
    """Each object found with probability ``found`` (box jittered by ``jitter`` px), plus false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < found:
            x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, jitter, 4)
            dets.append([a["image_id"], x, y, max(w, 2), max(h, 2), rng.uniform(0.3, 1), a["category_id"]])
    for i in range(1, N_IMAGES + 1):
        for _ in range(rng.integers(0, 3)):
            dets.append([i, *rng.uniform(0, 150, 2), *rng.uniform(5, 40, 2), rng.uniform(0, 0.6),
                         int(rng.integers(1, N_CATS + 1))])
    return np.array(dets, dtype=np.float64)


#: (seed, fraction of objects found, box jitter in px) of each made-up model: mse a copy of FP32 but for
#: the scores (within noise), max much worse (the histogram methods clearly better), the QAT engine better
#: than the reference engine (against the published direction)
MODELS = {"fp32": (1, 0.9, 1.0), "mse": (2, 0.9, 1.0), "entropy": (3, 0.8, 2.0), "percentile": (4, 0.85, 1.5),
          "max": (5, 0.35, 6.0), "ref engine": (6, 0.6, 4.0), "int8 PTQ engine": (7, 0.55, 4.0),
          "int8 QAT engine": (8, 0.95, 0.5)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The made-up models' tables stored as the stages store them, and the results the stages make of them."""
    out = tmp_path_factory.mktemp("course")
    gt = _ground_truth()
    rng = np.random.default_rng(11)
    fp32_dets = _detections(gt, *MODELS["fp32"])
    evals, tables = {}, {}
    for name, spec in MODELS.items():
        dets = _detections(gt, *spec)
        if name == "mse":  # FP32's boxes, scores a little off: a difference the images cannot resolve
            dets = fp32_dets.copy()
            dets[:, 5] = np.clip(dets[:, 5] + rng.normal(0, 0.02, len(dets)), 0.01, 1)
        evals[name] = _evaluated(gt, dets)
        tables[name] = intervals.match_table(evals[name])
    files = {"fp32": "ptq/fp32.npz", **{m: f"ptq/int8_{m}.npz" for m in ("max", "entropy", "mse", "percentile")},
             "ref engine": "engines/ort_fp32.npz", "int8 PTQ engine": "engines/ort_int8_ptq.npz",
             "int8 QAT engine": "engines/ort_int8_qat.npz"}
    for name, f in files.items():
        intervals.save_table(out / f, tables[name])

    def row(name):
        return {"map": round(float(evals[name].stats[0]), 4), "map50": round(float(evals[name].stats[1]), 4),
                "images": N_IMAGES, "matches": files[name].split("/")[1]}

    ptq = stages.ptq_intervals({"fp32": row("fp32"), "tied_groups": {},
                                "int8": {m: row(m) for m in ("max", "entropy", "mse", "percentile")}}, out / "ptq")
    labels = {"ref engine": "ORT fp32", "int8 PTQ engine": "ORT int8 PTQ", "int8 QAT engine": "ORT int8 QAT"}
    timing = {"1": {"latency_ms_median": 1.0, "latency_ms_p90": 1.0, "latency_ms_p99": 1.0, "throughput_img_s": 9.0}}
    eng = stages.engine_intervals({"machine": "a CPU", "iterations": 2, "reference": "ORT fp32",
                                   "timing": {label: timing for label in labels.values()},
                                   "map": {label: row(name) for name, label in labels.items()}},
                                  out / "engines", out / "ptq" / "fp32.npz")
    base = {"fp32": row("fp32")}
    base["fp32"]["interval"] = intervals.bootstrap(tables["fp32"])["interval"]
    data = {"settings": {"weights": None}, "stages": {
        "baseline": {"results": base}, "ptq": {"results": json.loads(json.dumps(ptq))},
        "engines": {"results": json.loads(json.dumps(eng))}, "sensitivity": {"results": None}}}
    return {"out": out, "data": data, "evals": evals,
            "stored": {name: intervals.load_table(out / f) for name, f in files.items()}, "labels": labels}


def _verdict(published, interval):
    """The issue's rule: within noise when the interval holds 0, else reproduced when it is on the published side."""
    lo, hi = interval
    if lo <= 0 <= hi:
        return "within noise"
    return "reproduced" if (lo > 0) == (published > 0) else "not reproduced"


def _reading(interval):
    lo, hi = interval
    return "within noise" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")


def test_resampled_is_bootstrap_and_paired_bit_for_bit(run):
    a, b = run["stored"]["entropy"], run["stored"]["fp32"]
    ra, rb = intervals.Resampled(a), intervals.Resampled(b)
    assert ra.bootstrap() == intervals.bootstrap(a)
    assert ra.minus(rb) == intervals.paired(a, b)
    with pytest.raises(ValueError, match="same draws"):
        ra.minus(intervals.Resampled(b, seed=1))


def test_claims_are_paired_intervals_of_the_stored_tables(run):
    t, data = run["stored"], run["data"]
    pub = report.PUBLISHED
    (_, fp16), (_, ptq_m), _ = pub["pytorch"]["rows"]
    (_, trt_fp16, _), _, (_, trt_qat, _) = pub["trt"]["rows"]
    maps = {m: run["evals"][m].stats[0] for m in ("entropy", "mse", "percentile")}
    best = max(maps, key=maps.get)  # pycocotools' ranking of the histogram methods
    expected = [  # (published diff, the paired comparison recomputed here, which way round)
        (0.003, intervals.paired(t["fp32"], t["mse"])),
        (ptq_m - fp16, intervals.paired(t["mse"], t["fp32"])),
        (0.509 - 0.444, intervals.paired(t[best], t["max"])),
        (trt_qat - trt_fp16, intervals.paired(t["int8 QAT engine"], t["ref engine"])),
    ]
    got = report.claims(data)
    assert len(got) == len(expected)
    for claim, (published, want) in zip(got, expected):
        assert set(claim) == {"name", "published", "measured", "interval", "verdict"}
        assert claim["published"] == pytest.approx(published, abs=1e-9)
        assert claim["measured"] == pytest.approx(want["diff"], abs=1e-12)
        assert claim["interval"] == pytest.approx(want["interval"], abs=1e-12)
        assert claim["verdict"] == _verdict(published, want["interval"]), claim["name"]
    assert f"the best histogram method, {best}, minus max" in got[2]["name"]
    # the made-up models were built to give each verdict once at least
    assert [c["verdict"] for c in got] == ["within noise", "within noise", "reproduced", "not reproduced"]


def test_published_table_prints_the_claims(run):
    header, rows = report.published_table(run["data"])
    assert header[-1] == "verdict"
    by_figure = {r[0]: r for r in rows}
    claims = report.claims(run["data"])
    pub = report.PUBLISHED
    for figure, claim in zip(["PTQ, histogram calibration", pub["pytorch"]["rows"][1][0], "PTQ, max calibration",
                              pub["trt"]["rows"][2][0]], claims):
        lo, hi = claim["interval"]
        assert f"{claim['measured']:+.4f} [{lo:+.4f}, {hi:+.4f}]" in by_figure[figure][3]
        assert by_figure[figure][4] == claim["verdict"]
    others = [r for r in rows if r[4] not in intervals.VERDICTS]
    assert len(others) == len(rows) - 4 and all(r[4].startswith("no verdict: ") for r in others)
    assert "not measured here" in by_figure[pub["trt"]["rows"][1][0]][3]


def test_map_tables_print_intervals_and_paired_differences(run):
    t, data = run["stored"], run["data"]
    rows = {r[0]: r for r in report.map_table(data)[1]}
    for method in ("max", "entropy", "mse", "percentile"):
        b, d = intervals.bootstrap(t[method]), intervals.paired(t[method], t["fp32"])
        assert b["value"] == run["evals"][method].stats[0]  # the table is pycocotools' evaluation
        row = rows[f"PTQ INT8, {method} calibration"]
        assert row[1] == f"{b['value']:.4f} [{b['interval'][0]:.4f}, {b['interval'][1]:.4f}]"
        lo, hi = d["interval"]
        assert row[3] == f"{100 * d['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] {_reading(d['interval'])}"
    assert rows["PTQ INT8, mse calibration"][3].endswith(" within noise")
    assert rows["PTQ INT8, max calibration"][3].endswith(" lower")

    eng = {r[0]: r for r in report.engine_map_table(data)[1]}
    for name, label in run["labels"].items():
        b, d = intervals.bootstrap(t[name]), intervals.paired(t[name], t["fp32"])
        assert eng[label][1] == f"{b['value']:.4f} [{b['interval'][0]:.4f}, {b['interval'][1]:.4f}]"
        assert eng[label][2] == (f"{100 * d['diff']:+.2f} [{100 * d['interval'][0]:+.2f}, "
                                 f"{100 * d['interval'][1]:+.2f}] {_reading(d['interval'])}")
    d = intervals.paired(t["int8 QAT engine"], t["ref engine"])
    assert eng["ORT int8 QAT"][3].startswith(f"{100 * d['diff']:+.2f} [") and eng["ORT fp32"][3] == "(the reference)"


def test_a_claim_needs_its_paired_interval(run):
    data = json.loads(json.dumps(run["data"]))
    del data["stages"]["ptq"]["results"]["int8"]["mse"]["vs_fp32"]
    data["stages"]["engines"]["results"] = None
    names = [c["name"] for c in report.claims(data)]
    assert len(names) == 1 and names[0].startswith("max calibration")
    rows = {r[0]: r for r in report.published_table(data)[1]}
    assert rows["PTQ, histogram calibration"][3:] == ["-", "no verdict: not measured in this run"]
