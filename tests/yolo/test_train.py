"""Tests of qcourse.yolo.train: TrainConfig, train()'s guard rails and resuming, directly and through ``qcourse train``.

A tiny synthetic dataset (4 training images of 64 px) keeps a real one-epoch run near a
second. Oracles: the files in the run folder, the settings recorded in ``last.pt``, and the
one-line errors of the command.
"""
import dataclasses
import inspect
import json

import pytest
import torch

from qcourse.course import cli
from qcourse.yolo.train import RESUME_SETTINGS, TrainConfig, train

TINY = dict(img_size=64, epochs=1, batch_size=2, eval_every=1, progress=False)
_RUNTIME = ("resume", "progress", "log")  # train()'s keyword switches; the rest goes into TrainConfig


def run(data, out, **kw):
    """``train`` with flat keyword arguments: config fields go into a TrainConfig (built here, so a
    bad value raises inside the caller's ``pytest.raises``), the runtime switches stay keywords."""
    runtime = {k: kw.pop(k) for k in _RUNTIME if k in kw}
    return train(data, out, TrainConfig(**kw), **runtime)


@pytest.fixture(scope="module")
def data(small_dataset):
    return small_dataset("tiny", n_train=4, n_val=2, img_size=64, seed=1)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A completed one-epoch run: its folder and last.pt as bytes (to check nothing touched it)."""
    out = tmp_path_factory.mktemp("run")
    run(data, out, **TINY, log=lambda *a: None)
    return out, (out / "last.pt").read_bytes()


def _quiet(**kw):
    return {**TINY, "log": lambda *a: None, **kw}


# ------------------------------------------------------------------ bad values, refused up front
@pytest.mark.parametrize("kw,name", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(eval_every=0), "eval_every"),
    (dict(img_size=0), "img_size"), (dict(img_size=100), "img_size"), (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"), (dict(max_minutes=0), "max_minutes"), (dict(arch="yolov9"), "arch"),
    (dict(epochs=2.5), "epochs"), (dict(resume="yes"), "resume"),
])
def test_bad_values_raise_naming_the_argument(data, tmp_path, kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be .*got {kw[name]!r}"):
        run(data, tmp_path / "out", **_quiet(**kw))
    assert not (tmp_path / "out").exists()  # refused before any work


def test_batch_larger_than_the_training_set_names_both_numbers(data, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=5 is larger than the training set \(4 images"):
        run(data, tmp_path / "out", **_quiet(batch_size=5))
    assert not (tmp_path / "out" / "last.pt").exists()


# ------------------------------------------------------------------ rerunning into the same out_dir
def test_last_pt_records_the_settings(finished_run, data):
    out, _ = finished_run
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    s = state["settings"]
    assert set(s) == set(RESUME_SETTINGS)
    assert s["epochs"] == 1 and s["batch_size"] == 2 and s["img_size"] == 64
    assert s["data_root"] == str(data.resolve()) and s["init"] is None


@pytest.mark.parametrize("kw,change", [
    (dict(epochs=2), "epochs was 1, now 2"),
    (dict(lr=1e-3), "lr was 0.002, now 0.001"),
    (dict(seed=3), "seed was 0, now 3"),
])
def test_rerun_with_other_settings_is_refused(finished_run, data, kw, change):
    out, before = finished_run
    with pytest.raises(ValueError, match="other settings") as info:
        run(data, out, **_quiet(**kw))
    assert change in str(info.value) and "--out" in str(info.value) and "--resume" in str(info.value)
    assert (out / "last.pt").read_bytes() == before


def test_rerun_with_the_same_settings_resumes(finished_run, data):
    out, before = finished_run
    said = []
    res = run(data, out, **{**TINY, "eval_every": 3}, log=said.append)  # eval_every may change
    assert res["history"] == [] and any("resumed" in s for s in said)
    assert (out / "last.pt").read_bytes() == before


def test_forced_resume_continues_with_the_new_settings(data, tmp_path):
    out = tmp_path / "run"
    run(data, out, **_quiet())
    said = []
    res = run(data, out, **{**TINY, "epochs": 2}, resume="force", log=said.append)
    assert [row["epoch"] for row in res["history"]] == [2]
    assert any("epochs was 1, now 2" in s for s in said)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["settings"]["epochs"] == 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_forced_resume_with_nothing_to_resume(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(data, tmp_path / "empty", **_quiet(), resume="force")


# ------------------------------------------------------------------ through the command
def _cli(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err.strip().splitlines()


def _cmd(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--img-size", "64", "--epochs", "1", "--batch-size", "2",
            "--eval-every", "1", *extra]


def test_command_trains_then_refuses_other_settings_unless_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _cli(_cmd(data, out), capsys)
    assert code == 0 and f"checkpoint: {out / 'best.pt'}" in stdout and (out / "best.pt").is_file()

    code, stdout, err = _cli(_cmd(data, out, "--epochs", "2"), capsys)  # the later --epochs wins
    assert code == 2 and len(err) == 1
    assert err[0].startswith("qcourse: error: ") and "epochs was 1, now 2" in err[0]
    assert "--out" in err[0] and "--resume" in err[0]

    code, stdout, err = _cli(_cmd(data, out), capsys)  # the same command: resumes, nothing left
    assert code == 0 and "nothing to train" in stdout

    code, stdout, err = _cli(_cmd(data, out, "--epochs", "2", "--resume"), capsys)
    assert code == 0 and '"epoch": 2' in stdout


def test_command_batch_larger_than_the_data_is_one_line(data, tmp_path, capsys):
    code, stdout, err = _cli(_cmd(data, tmp_path / "run", "--batch-size", "5"), capsys)
    assert code == 2 and len(err) == 1
    assert "batch_size=5" in err[0] and "4 images" in err[0] and "at most 4" in err[0]


# ------------------------------------------------------------------ TrainConfig
def test_config_defaults_are_the_commands_defaults():
    args = cli._build_parser().parse_args(["train"])
    cfg = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            assert getattr(cfg, f.name) == getattr(args, f.name), f.name
    # the two knobs without a flag keep the recipe of the shipped checkpoint
    assert (cfg.weight_decay, cfg.warmup_epochs) == (5e-4, 1.0)


def test_config_is_frozen_and_replace_validates():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert dataclasses.replace(cfg, epochs=45).epochs == 45
    with pytest.raises(ValueError, match=r"^weight_decay must be .*got -1"):
        dataclasses.replace(cfg, weight_decay=-1)


@pytest.mark.parametrize("kw,name", [
    (dict(warmup_epochs=float("inf")), "warmup_epochs"), (dict(seed=-1), "seed"), (dict(seed=True), "seed"),
    (dict(batch_size=2.0), "batch_size"), (dict(max_minutes=float("nan")), "max_minutes"),
])
def test_config_validate_names_the_bad_field(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be .*got "):
        TrainConfig(**kw)


def test_config_settings_round_trip(tmp_path):
    init = tmp_path / "w.pt"
    cfg = TrainConfig(epochs=45, batch_size=16, lr=2e-3, eval_every=5, max_minutes=80, init=str(init))
    s = cfg.settings(tmp_path / "data")
    assert tuple(s) == RESUME_SETTINGS  # exactly what decides a resume, in order
    assert s["data_root"] == str((tmp_path / "data").resolve()) and s["init"] == str(init.resolve())
    torch.save({"settings": s}, tmp_path / "s.pt")  # last.pt loads with weights_only=True: plain data only
    assert torch.load(tmp_path / "s.pt", weights_only=True)["settings"] == s
    again = TrainConfig(**{k: v for k, v in s.items() if k != "data_root"})
    assert again.settings(tmp_path / "data") == s
    # eval_every and max_minutes decide when to look and stop, not what is learned: not recorded
    assert dataclasses.replace(cfg, eval_every=1, max_minutes=None).settings(tmp_path / "data") == s


def test_train_rejects_a_non_config(data, tmp_path):
    with pytest.raises(TypeError, match="TrainConfig"):
        train(data, tmp_path / "out", dict(epochs=1))
    assert not (tmp_path / "out").exists()


def test_train_epoch_is_public_and_documented():
    from qcourse.yolo import train as train_mod
    from qcourse.yolo.loss import YoloLoss
    from qcourse.yolo.train import ModelEMA, lr_schedule, train_epoch

    assert {"train_epoch", "lr_schedule", "ModelEMA", "TrainConfig"} <= set(train_mod.__all__)
    doc = inspect.getdoc(train_epoch)
    assert doc and "QAT" in doc and "loss" in doc
    assert list(inspect.signature(train_epoch).parameters)[:6] == [
        "model", "loss_fn", "optimizer", "ema", "loader", "lr_at"]
    assert train_mod.YoloLoss is YoloLoss and inspect.getdoc(lr_schedule) and inspect.getdoc(ModelEMA)
