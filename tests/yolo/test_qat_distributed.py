"""``qcourse qat`` under ``torchrun``: the command as ``qcourse qat --help`` promises it, two processes.

``torchrun --nproc_per_node=2 --no-python qcourse qat ...`` on the CPU (gloo), with the default
label-free loss (which leaves the detection head without a gradient) and with the detection
loss. Oracles: both processes exit 0; results.json records two processes and the SHA-256 of the
final weights of each, which must be equal (DDP keeps the replicas identical only when every
gradient is all-reduced); the head the loss does not reach keeps its calibrated weights.
The same on two GPUs (NCCL, one GPU per process) where a machine has them.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import torchrun
from qcourse.utils import OWNED_LIST
from qcourse.yolo import ptq as yptq
from qcourse.yolo import qat as yqat
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset

QUICK = ["--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "4", "--calib-batches", "1", "--eval-batches", "1"]


def _qcourse() -> str:
    found = shutil.which("qcourse", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    assert found, "the qcourse command is not installed beside this Python (pip install -e .)"
    return found


def _torchrun(args, nproc: int = 2, timeout: int = 300):
    return torchrun(["--no-python", _qcourse(), "qat", *args], nproc, timeout)


def _calibrated_start():
    """The PTQ model every process starts from (the calibration of QUICK: one batch of 4, in file order)."""
    calib = create_dataloader(ensure_default_dataset(progress=False), "train", img_size=160, batch_size=4,
                              shuffle=False)
    return yqat.calibrated_model(yptq.load_float_model(), calib, yqat.YoloQATConfig(calib_batches=1)).state_dict()


@pytest.mark.parametrize("loss", ["distill", "detection"])
def test_two_processes_train_with_the_same_command(tmp_path, loss):
    out = tmp_path / "out"
    done = _torchrun([*QUICK, "--loss", loss, "--out", str(out)])
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["settings"]["loss"] == loss
    digests = res["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # both processes end with the same weights
    assert sorted(p.name for p in out.iterdir() if p.name != OWNED_LIST) == ["best.pt", "fp32.npz", "last.pt", "ptq.npz",
                                                                             "qat.npz", "qat.onnx", "results.json"]
    assert done.stdout.count("qat W8A8") == 1  # rank 0 alone reports
    assert len(res["history"]) == 1 and torch.isfinite(torch.tensor(res["history"][0]["loss"]))
    from qcourse import qat

    got, start = qat.load_state(out / "last.pt")["model"], _calibrated_start()
    head = [k for k in start if k.startswith("model.77.m.")]
    body = [k for k in start if k.startswith("model.0.") and k.endswith("weight")]
    assert head and body
    assert not all(torch.equal(got[k], start[k]) for k in body)  # trained
    if loss == "distill":  # the head is not supervised: it keeps its calibrated weights
        assert all(torch.equal(got[k], start[k]) for k in head)
    else:  # the detection loss reads the head's outputs
        assert not all(torch.equal(got[k], start[k]) for k in head)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs: NCCL runs one process per GPU and refuses two on one")
def test_two_processes_train_on_two_gpus(tmp_path):
    out = tmp_path / "out"
    done = _torchrun([*QUICK, "--device", "cuda", "--out", str(out)])
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and len(set(res["weights_sha256"])) == 1
    assert res["settings"]["device"] == "cuda"  # as asked; each process ran on the GPU of its LOCAL_RANK
