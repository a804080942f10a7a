"""The PTQ stage of ``qcourse course`` at lesson 5's stress setting (issue 22), on a small slice.

The stage runs on the embedded default with one calibration batch and one evaluation batch of 32
images; ``run_ptq`` keeps two of the four methods there (max and percentile) to stay quick, the
stress screen runs all four. The intervals it records are recomputed here from the match tables
it kept (read back with :func:`qcourse.yolo.intervals.load_table`, resampled with the course's draws).
"""
import dataclasses
import json

import pytest

from qcourse import ptq as ptq_core
from qcourse.course import stages
from qcourse.yolo import intervals
from qcourse.yolo import ptq as yptq

BOOT = {"n": stages.BOOTSTRAP["n"], "seed": stages.BOOTSTRAP["seed"], "level": stages.BOOTSTRAP["level"]}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    lines = []
    ctx = stages.StageContext(stages.CourseConfig(out=out, eval_batches=1, calib_batches=1), out / "ptq", {},
                              lines.append)
    real = yptq.run_ptq
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(yptq, "run_ptq", lambda config: real(dataclasses.replace(config, methods=("max", "percentile"))))
        res = stages.ptq(ctx)
    return {"res": res, "folder": ctx.folder, "lines": lines}


@pytest.fixture(scope="module")
def oracle(stage):
    """Each kept table, read back and resampled here (the draws of ``BOOTSTRAP``): FP32 and the four methods."""
    folder, res = stage["folder"], stage["res"]
    files = {"fp32": res["fp32"]["matches"], **{m: row["matches"] for m, row in res["stress"]["methods"].items()}}
    tables = {name: intervals.load_table(folder / f) for name, f in files.items()}
    return {name: intervals.Resampled(t, n=BOOT["n"], seed=BOOT["seed"]) for name, t in tables.items()}


def test_stress_results_hold_every_method_with_its_intervals(stage, oracle):
    res = stage["res"]
    json.dumps(res)  # JSON-able: it goes into results.json
    stress = res["stress"]
    assert stress["setting"] == yptq.METHOD_STRESS.as_dict() and stress["setting"]["name"] == "W8pcA6"
    assert list(stress["methods"]) == list(ptq_core.METHODS)
    for method, row in stress["methods"].items():
        assert row["matches"] == f"stress/{method}.npz" and row["images"] == 32
        assert oracle[method].table.n_images == 32
        assert row["map"] == pytest.approx(float(oracle[method].value), abs=1e-4)
        assert row["interval"] == oracle[method].bootstrap(BOOT["level"])["interval"]
        want = oracle[method].minus(oracle["fp32"], BOOT["level"])
        assert row["vs_fp32"] == {"diff": want["diff"], "interval": want["interval"]}
        assert row["interval"][0] <= row["map"] <= row["interval"][1]


def test_method_gap_is_the_best_histogram_method_minus_max_paired(stage, oracle):
    res = stage["res"]
    best = max(("entropy", "mse", "percentile"), key=lambda m: oracle[m].value)
    want = oracle[best].minus(oracle["max"], BOOT["level"])
    assert res["method_gap"] == {"setting": "W8pcA6", "best_method": best, "gap": want["diff"],
                                 "interval": want["interval"]}
    # the W8A8 run's comparison is still there, beside it
    assert res["best_histogram_vs_max"]["best"] == "percentile" and set(res["int8"]) == {"max", "percentile"}


def test_stress_screen_is_logged_and_its_tables_kept(stage):
    lines, folder = stage["lines"], stage["folder"]
    for method in ptq_core.METHODS:
        assert sum(f"W8pcA6 {method} " in line and "minus FP32" in line for line in lines) == 1, lines
        assert (folder / "stress" / f"{method}.npz").is_file()
    gap = stage["res"]["method_gap"]
    assert sum(f"W8pcA6 {gap['best_method']} minus max {gap['gap']:+.4f}" in line for line in lines) == 1, lines
