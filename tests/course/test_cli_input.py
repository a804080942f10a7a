"""The ``qcourse`` command on untrusted input: options far out of range, files far larger than any
real one of their kind, a checkpoint that is no checkpoint, a dataset with no images, and inputs
larger than the memory.

The contract is test_cli.py's: one line ``qcourse: error: ...`` naming the value and the fix, exit 2.
Oracles: the exit status and the line; a spy on ``open`` (a file refused for its size is never
opened); stubs that fail the test if the slow work starts (a value refused too late fails, it does
not allocate). Large files are sparse: 10 GiB that take no disk.
"""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import qcourse.utils
from qcourse.course import cli
from qcourse.yolo import datasets, models
from qcourse.yolo import evaluate as yolo_evaluate

from cli_helpers import error_line as one_line, run_cli



def refuse(*a, **k):
    raise AssertionError("the command started working instead of refusing its input")


@pytest.fixture()
def no_work(monkeypatch):
    """Loading a model or a dataset fails the test: a value must be refused before."""
    monkeypatch.setattr(models, "load_checkpoint", refuse)
    monkeypatch.setattr(datasets, "ensure_default_dataset", refuse)


def sparse(path, size=10 << 30):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ------------------------------------------------------------------ options: upper bounds
@pytest.mark.parametrize("argv,names", [
    (["eval", "--batch-size", "99999999999999999999"], ["--batch-size", "99999999999999999999", "2147483647"]),
    (["eval", "--max-batches", str(2**63)], ["--max-batches", str(2**63), "2147483647"]),
    (["train", "--epochs", "1e99"], ["--epochs", "'1e99'"]),
    (["bench", "--engine", "ENGINE", "--iterations", str(2**31)], ["--iterations", str(2**31), "2147483647"]),
    (["eval", "--img-size", "99999968"], ["--img-size", "99999968", "4096"]),
    (["train", "--img-size", "4128"], ["--img-size", "4128", "4096"]),
])
def test_an_option_beyond_its_bound_is_one_line_naming_the_bound(argv, names, tmp_path, no_work, capsys):
    (tmp_path / "e.onnx").write_bytes(b"")  # bench's --engine must exist: its bound is the one checked
    code, out, err = run_cli([tmp_path / "e.onnx" if a == "ENGINE" else a for a in argv], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("qcourse: error: ")
    for n in names:
        assert n in line, f"{n!r} not in {line!r}"


def test_the_bounds_themselves_are_accepted():
    assert cli._img_size("4096") == 4096 and cli._img_size("640") == 640
    assert cli._int_at_least(1)(str(2**31 - 1)) == 2**31 - 1


# ------------------------------------------------------------------ files
def test_a_huge_file_of_zeros_as_weights_is_refused_by_size_unread(tmp_path, opened, capsys):
    weights = sparse(tmp_path / "zeros.pt")
    opened.clear()
    code, out, err = run_cli(["eval", "--weights", weights], capsys)
    line = one_line(err)
    assert code == 2 and str(weights) in line and "10.0 GiB" in line and "tar archive" not in line
    assert "checkpoint" in line and "pass a .pt checkpoint" in line
    assert os.path.realpath(weights) not in opened


def test_a_small_file_of_zeros_as_weights_is_not_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "zeros.pt"
    weights.write_bytes(bytes(1 << 20))
    code, out, err = run_cli(["eval", "--weights", weights], capsys)
    line = one_line(err)
    assert code == 2 and f"{weights} is not a readable PyTorch checkpoint" in line and "tar archive" not in line


def test_a_huge_onnx_file_is_refused_before_it_is_read(tmp_path, opened, capsys):
    model = sparse(tmp_path / "big.onnx")
    opened.clear()
    code, out, err = run_cli(["build", "--onnx", model, "--precision", "fp32", "--out", tmp_path / "e.onnx"], capsys)
    line = one_line(err)
    assert code == 2 and str(model) in line and "10.0 GiB" in line and "2.0 GiB" in line and "protobuf" in line
    assert os.path.realpath(model) not in opened


# ------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small YOLOv7-tiny checkpoint (3 classes) whose metadata records an absurd image size."""
    torch.manual_seed(0)
    model = models.yolov7_tiny(nc=3, names=["a", "b", "c"]).eval()
    return models.save_checkpoint(model, tmp_path_factory.mktemp("w") / "huge_size.pt", img_size=99999968)


def test_a_checkpoints_recorded_image_size_is_checked_too(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "ensure_default_dataset", refuse)
    code, out, err = run_cli(["eval", "--weights", tiny_checkpoint], capsys)
    line = one_line(err)
    assert code == 2 and str(tiny_checkpoint) in line and "99999968" in line and "4096" in line
    assert "--img-size" in line


def _coco(root, n_images: int):
    """A COCO folder whose annotation file lists ``n_images`` images (all on disk)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for k in range(n_images):
        name = f"{k:012d}.jpg"
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(root / "val2017" / name)
        images.append({"id": k + 1, "file_name": name, "width": 32, "height": 32})
    data = {"images": images, "annotations": [], "categories": [{"id": c, "name": n} for c, n in
                                                                 ((1, "a"), (2, "b"), (3, "c"))]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


def test_eval_of_a_dataset_without_images_is_an_error_not_a_map_of_zero(tmp_path, tiny_checkpoint, capsys):
    coco = _coco(tmp_path / "coco", 0)
    code, out, err = run_cli(["eval", "--weights", tiny_checkpoint, "--coco", coco, "--img-size", "64"], capsys)
    line = one_line(err)
    assert code == 2 and "no images to evaluate" in line and str(coco / "val2017") in line and "mAP" not in out


def test_eval_of_a_batch_larger_than_the_memory_is_refused(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    coco = _coco(tmp_path / "coco", 2)
    monkeypatch.setattr(qcourse.utils, "available_memory", lambda: 1 << 30)  # 1 GiB: 256 MiB for a batch
    monkeypatch.setattr(yolo_evaluate, "_predict", refuse)  # no batch is made
    code, out, err = run_cli(["eval", "--weights", tiny_checkpoint, "--coco", coco, "--img-size", "4096",
                              "--batch-size", "32"], capsys)
    line = one_line(err)
    assert code == 2 and "a batch of 2 images of 4096x4096 pixels" in line and "384.0 MiB" in line
    assert "--batch-size" in line and "--img-size" in line


# ------------------------------------------------------------------ bench
def test_bench_refuses_an_engine_input_larger_than_the_memory(tmp_path, monkeypatch, capsys):
    """An engine that declares 3 GiB per image (3x16384x16384 float32): refused before any batch is made."""
    from qcourse.engines import bench

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16384, 16384])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 16384, 16384])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    engine = tmp_path / "huge_input.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(engine))
    monkeypatch.setattr(qcourse.utils, "available_memory", lambda: 8 << 30)  # 8 GiB: 2 GiB for a batch
    monkeypatch.setattr(bench, "benchmark", refuse)
    monkeypatch.setattr(bench, "synthetic_batch", refuse)
    code, out, err = run_cli(["bench", "--engine", engine, "--no-map", "--batch", "1"], capsys)
    line = one_line(err)
    assert code == 2 and str(engine) in line and "(3, 16384, 16384)" in line and "3.0 GiB" in line
    assert "8.0 GiB" in line and "--batch" in line


def test_engine_device_is_checked_against_the_backend():
    import argparse

    import torch

    from qcourse.course.cli import _engine_device

    ort = argparse.Namespace(backend="onnxruntime", device=torch.device("cpu"))
    assert _engine_device(ort) is None
    assert _engine_device(argparse.Namespace(backend="onnxruntime", device=None)) is None
    assert _engine_device(argparse.Namespace(backend="tensorrt", device=None)) == "cuda"
    with pytest.raises(ValueError, match="onnxruntime backend runs on the CPU"):
        _engine_device(argparse.Namespace(backend="onnxruntime", device=torch.device("cuda", 1)))
    assert _engine_device(argparse.Namespace(backend="tensorrt", device=torch.device("cuda", 1))) == "cuda:1"
    with pytest.raises(ValueError, match="TensorRT runs on a CUDA GPU"):
        _engine_device(argparse.Namespace(backend="tensorrt", device=torch.device("cpu")))
