"""qcourse.yolo.qat and ``qcourse qat``: the YOLOv7 side of lesson 7, on small slices of the default.

Oracles: the FP32 model itself (the distillation loss is exactly zero with quantization off),
YoloLoss called directly, an independent evaluation of the saved best.pt, the ONNX graph.
"""
import json

import pytest
import torch

from qcourse import workflow
from qcourse.course.cli import main
from qcourse.export import list_qdq_nodes, load_onnx
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
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "qat.onnx", "results.json"]
    # the saved best model, reloaded as a calibrated checkpoint, scores what was recorded
    best = yptq.load_quantized(out / "best.pt")
    val = create_dataloader(ensure_default_dataset(progress=False), "val", img_size=160, batch_size=32)
    assert round(evaluate(best, val, progress=False, max_batches=1)["map"], 4) == res["table"][2]["map"]
    qdq = list_qdq_nodes(load_onnx(out / "qat.onnx"))
    assert qdq and res["placement_problems"] == 0
    assert "qat W8A8" in capsys.readouterr().out
    # the same file as a starting point, with other bits: one line, exit 2
    rc = main(["qat", "--calibrated", str(out / "best.pt"), "--w-bits", "4", "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--w-bits 8 --a-bits 8" in err, err


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
            if calls[0] == 3:
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
    assert cut["table"] == full["table"]
    assert "resumed at epoch 2, step 0" in capsys.readouterr().out
