"""qcourse.yolo.qat and ``qcourse qat``: the YOLOv7 side of lesson 7, on small slices of the default.

Oracles: the FP32 model itself (the distillation loss is exactly zero with quantization off),
YoloLoss called directly, an independent evaluation of the saved best.pt (and of the FP32 and
PTQ models: their match tables must be the ones the run kept), the ONNX graph.
The refusals (a user's file in --out, a damaged checkpoint to resume, a batch larger than the
data, an --out that cannot be a folder) must come before any model is loaded or calibrated:
the tests make loading or calibrating fail loudly.
"""
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from qcourse import workflow
from qcourse.course.cli import main
from qcourse.export import list_qdq_nodes, load_onnx
from qcourse.utils import OWNED_LIST, remove_owned
from qcourse.yolo import intervals
from qcourse.yolo import ptq as yptq
from qcourse.yolo import qat as yqat
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset
from qcourse.yolo.evaluate import evaluate
from qcourse.yolo.loss import YoloLoss


@pytest.fixture(scope="module")
def models():
    root = ensure_default_dataset(progress=False)
    calib = create_dataloader(root, "train", img_size=160, batch_size=4, shuffle=False)
    config = yqat.YoloQATConfig(w_bits=4, a_bits=6, calib_batches=1)
    teacher = yptq.load_float_model()
    return teacher, yqat.calibrated_model(teacher, calib, config), next(iter(calib))


def test_distillation_leaves_the_head_out_and_is_zero_without_quantization(models):
    teacher, student, batch = models
    loss_fn = yqat.distillation_loss(teacher, student)
    assert loss_fn.blocks[0] == "model.0" and loss_fn.blocks[-1] == "model.76" and "model.77" not in loss_fn.blocks
    assert len(yqat.distillation_loss(teacher, student, stride=10).blocks) == 9  # 0, 10, ..., 70 and 76
    assert float(loss_fn(student, batch).detach()) > 0
    with workflow.disable_quantization(student):
        assert float(loss_fn(student, batch).detach()) == 0.0


def test_detection_loss_is_the_yolo_loss_and_reaches_the_weights(models):
    _, student, batch = models
    student.train()
    loss = yqat.detection_loss(student, 160)(student, batch)
    want = YoloLoss(student, 160)(student(batch[0]), batch[1])[0]
    assert torch.allclose(loss, want)
    student.zero_grad()
    loss.backward()
    conv = student.model[0].conv
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    student.zero_grad()
    student.eval()


def test_cli_runs_end_to_end_and_best_reloads_with_its_map(tmp_path, capsys):
    out = tmp_path / "qat"
    rc = main(["qat", "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "4", "--calib-batches", "1",
               "--eval-batches", "1", "--learn-amax", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["table"]] == ["fp32", "ptq W8A8", "qat W8A8"]
    assert len(res["history"]) == 1 and {"loss", "map", "map50", "lr"} <= set(res["history"][0])
    assert names(out) == ["best.pt", "fp32.npz", "last.pt", "ptq.npz", "qat.npz", "qat.onnx", "results.json"]
    # the saved best model, reloaded as a calibrated checkpoint, scores what was recorded, with the kept table
    best = yptq.load_quantized(out / "best.pt")
    val = create_dataloader(ensure_default_dataset(progress=False), "val", img_size=160, batch_size=32)
    r = evaluate(best, val, progress=False, max_batches=1, matches=True)
    assert round(r["map"], 4) == res["table"][2]["map"]
    assert_same_table(intervals.load_table(out / "qat.npz"), r["matches"])
    # W8A8 PTQ loses nothing measurable on these 32 images: no share of it is reported
    lo, hi = res["fp32_minus_ptq"]["interval"]
    assert lo <= 0.0 <= hi and res["recovered_share"] is None
    assert "within noise" in res["recovered_share_reason"], res["recovered_share_reason"]
    qdq = list_qdq_nodes(load_onnx(out / "qat.onnx"))
    assert qdq and res["placement_problems"] == 0
    assert "qat W8A8" in capsys.readouterr().out
    # the same file as a starting point, with other bits: one line, exit 2
    rc = main(["qat", "--calibrated", str(out / "best.pt"), "--w-bits", "4", "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--w-bits 8 --a-bits 8" in err, err


def assert_same_table(got, want):
    assert np.array_equal(got.image_ids, want.image_ids) and np.array_equal(got.gt, want.gt)
    for field in ("det_image", "tp", "fp"):
        a, b = getattr(got, field), getattr(want, field)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), field


def names(folder):
    """The files in ``folder``, without qcourse's list of its own files."""
    return sorted(p.name for p in folder.iterdir() if p.name != OWNED_LIST)


def test_a_rerun_never_leaves_the_earlier_runs_files(tmp_path, monkeypatch, capsys):
    """A W4 rerun into a W8A8 run's folder leaves no W8A8 qat.onnx; an interrupted rerun leaves none
    of the earlier run's files; a user's file stays."""
    out = tmp_path / "qat"
    quick = ["qat", "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "4", "--calib-batches", "1",
             "--eval-batches", "1", "--out", str(out)]
    assert main(quick) == 0
    (out / "notes.txt").write_text("mine")
    tables = ["fp32.npz", "ptq.npz", "qat.npz"]
    assert names(out) == sorted(["best.pt", "last.pt", "notes.txt", "qat.onnx", "results.json", *tables])
    assert main([*quick, "--w-bits", "4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["onnx"] is None and res["table"][1]["model"] == "ptq W4A8"
    assert names(out) == sorted(["best.pt", "last.pt", "notes.txt", "results.json", *tables])
    assert yptq.load_quantized(out / "best.pt").ptq_info["weight_desc"]["num_bits"] == 4

    def interrupted(*args, **kwargs):  # the new run stops before its first file
        raise KeyboardInterrupt

    monkeypatch.setattr(yqat, "calibrated_model", interrupted)
    assert main(quick) == 130
    assert names(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()


@pytest.fixture
def no_work(monkeypatch):
    """Loading or calibrating a model fails the test: a refusal must come first."""
    from qcourse import ptq

    def work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(yptq, "load_float_model", work)
    monkeypatch.setattr(ptq, "calibrate", work)


def _one_line_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qcourse: error: ") and err.count("\n") == 1, (rc, err)
    return err


@pytest.mark.parametrize("name", ["results.json", "best.pt", "last.pt", "qat.onnx", "qat.npz"])
def test_a_users_file_in_out_is_refused_before_any_work(tmp_path, capsys, no_work, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine")
    err = _one_line_error(["qat", "--out", str(out)], capsys)
    assert f"{out / name} exists and was not written by qcourse" in err, err
    assert (out / name).read_text() == "mine"


def test_a_damaged_checkpoint_to_resume_is_named_in_one_line(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"format": "qcourse.qat", "model": Fraction(1, 3)}, out / "pickled.pt")  # not plain data
    for content in (b"garbage", (out / "pickled.pt").read_bytes()):
        (out / "last.pt").write_bytes(content)
        err = _one_line_error(["qat", "--resume", "--out", str(out)], capsys)
        assert f"{out / 'last.pt'} is damaged" in err and "delete it" in err, err
        assert "weights_only" not in err, err


@pytest.mark.parametrize("args, env, message", [
    (["--batch-size", "5000"], {}, "the batch size 5000 is larger than the training data (2000 items); pass a "
                                   "batch size of at most 2000"),
    (["--batch-size", "5"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
     "the batch size 5 does not split over 2 processes"),
    (["--batch-size", "1000", "--calib-batches", "3"], {}, "--calib-batches 3 asks for more batches than the 2"),
])
def test_settings_are_checked_before_calibration(tmp_path, capsys, monkeypatch, args, env, message):
    from qcourse import ptq

    def work(*a, **k):
        raise AssertionError("calibration started before the settings were checked")

    monkeypatch.setattr(ptq, "calibrate", work)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = _one_line_error(["qat", *args, "--out", str(tmp_path / "out")], capsys)
    assert message in err, err


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _one_line_error(["qat", "--out", str(blocker / "out")], capsys)  # NotADirectoryError, also for root
    assert str(blocker / "out") in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = _one_line_error(["qat", "--out", str(ro / "out")], capsys)
    finally:
        ro.chmod(0o700)
    assert "permission denied" in err.lower() and str(ro / "out") in err, err


@pytest.mark.parametrize("args, message", [
    (["--w-bits", "1"], "1 bits is outside 2..8"),
    (["--a-bits", "x"], "'x' is not a whole number"),
    (["--loss", "kl"], "invalid choice: 'kl'"),
    (["--lr", "0"], "not a finite number > 0"),
    (["--iters-per-epoch", "0"], "0 is too small"),
    (["--calibrated", "missing.pt"], "missing.pt does not exist"),
])
def test_bad_options_get_one_line_and_exit_2(args, message, tmp_path, capsys):
    rc = main(["qat", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qcourse: error:") and err.count("\n") == 1 and message in err, err


def test_resumed_cli_run_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    """An interrupted ``qcourse qat`` continued with ``--resume`` ends where an uninterrupted run ends."""
    from qcourse import qat

    args = ["qat", "--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "4", "--calib-batches", "1",
            "--eval-batches", "1", "--loss", "detection", "--w-bits", "4", "--a-bits", "6"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0

    real, calls = yqat.detection_loss, [0]

    def dies_at_step_3(student, img_size, device="cpu"):  # the first step of epoch 2
        loss = real(student, img_size, device)

        def wrapped(model, batch):
            calls[0] += 1
            if calls[0] == 4:  # the first call is qcourse.qat.train's look at which parameters the loss reaches
                raise KeyboardInterrupt
            return loss(model, batch)
        return wrapped

    monkeypatch.setattr(yqat, "detection_loss", dies_at_step_3)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    assert qat.load_state(tmp_path / "cut" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(yqat, "detection_loss", real)
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    want = qat.load_state(tmp_path / "full" / "last.pt")["model"]
    got = qat.load_state(tmp_path / "cut" / "last.pt")["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    full, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "cut"))
    same = ("table", "best_epoch", "fp32_minus_ptq", "qat_minus_ptq", "fp32_minus_qat", "recovered_share",
            "recovered_share_reason")
    assert {k: cut[k] for k in same} == {k: full[k] for k in same}
    for name in ("fp32.npz", "ptq.npz", "qat.npz"):
        assert_same_table(intervals.load_table(tmp_path / "cut" / name), intervals.load_table(tmp_path / "full" / name))
    assert "resumed at epoch 2, step 0" in capsys.readouterr().out
    # a finished run resumed without its best epoch's table evaluates best.pt again, to the same results
    want = intervals.load_table(tmp_path / "full" / "qat.npz")
    assert remove_owned(tmp_path / "full" / "qat.npz")
    assert main([*args, "--out", str(tmp_path / "full"), "--resume"]) == 0
    again = json.loads((tmp_path / "full" / "results.json").read_text())
    assert {k: again[k] for k in same} == {k: full[k] for k in same}
    assert_same_table(intervals.load_table(tmp_path / "full" / "qat.npz"), want)
    assert "evaluating best.pt again" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the intervals of a run
def test_the_kept_tables_reproduce_the_maps_and_the_recovered_share(tmp_path):
    """A short W3A8 run (PTQ loses ~8 points on the first 32 val images, far beyond the noise): the
    saved tables are the ones ``evaluate`` gives for the three models run again, they score the
    reported mAPs, and the share is the ratio of the mAPs they score, with the intervals of
    :mod:`qcourse.yolo.intervals` on the same draws."""
    out = tmp_path / "w3"
    config = yqat.YoloQATConfig(epochs=2, iters_per_epoch=1, batch_size=4, calib_batches=1, eval_batches=1, w_bits=3,
                                loss="detection", out=out, log=lambda line: None)
    res = yqat.run_qat(config)
    tables = {name: intervals.load_table(out / file) for name, file in yqat.TABLES.items()}
    assert res["matches"] == yqat.TABLES and res["bootstrap"] == yqat.BOOTSTRAP
    # the independent oracle: each model evaluated again, outside run_qat
    root = ensure_default_dataset(progress=False)
    val = create_dataloader(root, "val", img_size=160, batch_size=32)
    calib = create_dataloader(root, "train", img_size=160, batch_size=4, shuffle=False)
    fp32 = yptq.load_float_model()
    models = {"fp32": fp32, "ptq": yqat.calibrated_model(fp32, calib, config),
              "qat": yptq.load_quantized(out / "best.pt")}
    maps = {}
    for (name, model), row in zip(models.items(), res["table"]):
        r = evaluate(model, val, progress=False, max_batches=1, matches=True)
        assert_same_table(tables[name], r["matches"])
        got = intervals.score(tables[name])
        assert (round(got["map"], 4), round(got["map50"], 4)) == (row["map"], row["map50"]), name
        assert got["map"] == r["map"]
        assert row["interval"] == intervals.bootstrap(tables[name])["interval"]
        maps[name] = got["map"]
    assert res["history"][res["best_epoch"] - 1]["score"] == maps["qat"]  # the best epoch's table, not the last's
    f, p, q = maps["fp32"], maps["ptq"], maps["qat"]
    assert res["qat_minus_ptq"]["diff"] == q - p and res["fp32_minus_qat"]["diff"] == f - q
    assert res["qat_minus_ptq"]["interval"] == intervals.paired(tables["qat"], tables["ptq"])["interval"]
    assert res["table"][2]["vs_fp32"]["interval"] == intervals.paired(tables["qat"], tables["fp32"])["interval"]
    assert res["fp32_minus_ptq"]["interval"][0] > 0.02, res["fp32_minus_ptq"]  # a loss well beyond the noise
    share = res["recovered_share"]
    assert math.isclose(share["share"], (q - p) / (f - p), rel_tol=1e-12)
    assert share["interval"] == intervals.Resampled(tables["qat"]).recovered(
        intervals.Resampled(tables["ptq"]), intervals.Resampled(tables["fp32"]))["interval"]
    assert res["recovered_share_reason"] is None
    # the same tables with no loss to win back: no share, and the reason says why
    none = yqat.comparisons(tables["fp32"], tables["fp32"], tables["qat"])
    assert none["recovered_share"] is None and "within noise" in none["recovered_share_reason"]
    assert json.loads((out / "results.json").read_text())["recovered_share"] == share


def test_each_epoch_that_beats_the_best_so_far_replaces_the_kept_table(tmp_path, monkeypatch):
    """The rule of qcourse.qat.train's best.pt (a strictly higher score), epoch by epoch, and from a
    resumed run's best score."""
    def table(i):
        empty = (np.zeros((10, 0), dtype=bool),)
        return intervals.MatchTable(np.array([i, i + 1]), np.ones((1, 2), dtype=np.int64),
                                    (np.zeros(0, dtype=np.int64),), empty, empty)

    scores = iter([0.5, 0.7, 0.7, 0.6])
    monkeypatch.setattr(yqat, "_evaluate", lambda model, val, config: (
        lambda m: {"map": m, "map50": m, "matches": table(int(10 * m))})(next(scores)))
    path = tmp_path / "qat.npz"
    evaluate_epoch = yqat._evaluator(None, yqat.YoloQATConfig(), keep=path)
    kept = []
    for _ in range(4):
        assert set(evaluate_epoch(None)) == {"score", "map", "map50"}
        kept.append(int(intervals.load_table(path).image_ids[0]))
    assert kept == [5, 7, 7, 7]
    scores = iter([0.6, 0.8])
    resumed = yqat._evaluator(None, yqat.YoloQATConfig(), keep=path, best=0.7)
    resumed(None)
    assert intervals.load_table(path).image_ids[0] == 7
    resumed(None)
    assert intervals.load_table(path).image_ids[0] == 8


def test_the_course_stage_names_the_stress_runs_share():
    from qcourse.course import stages

    assert yqat.BOOTSTRAP == stages.BOOTSTRAP  # run_qat's intervals are the course's
    settings = {**yqat.STRESS, "epochs": 2, "iters_per_epoch": 10}
    runs = {"stress": {"settings": settings, "recovered_share": {"share": 0.5, "interval": [0.25, 0.75]},
                       "recovered_share_reason": None}}
    assert stages._qat_share(runs, "stress") == {"run": "stress", "setting": f"W{yqat.STRESS['w_bits']}pcA8",
                                                 "share": 0.5, "interval": [0.25, 0.75], "steps": 20}
    runs["stress"].update(recovered_share=None, recovered_share_reason="within noise")
    got = stages._qat_share(runs, "stress")
    assert got["share"] is None and got["interval"] is None and got["reason"] == "within noise"
    assert set(stages.qat_runs(stages.CourseConfig())) == {"w8a8", "stress"}
