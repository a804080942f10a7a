"""The shipped embedded default: data/yolov7_tiny_shapes.pt on the synthetic val split."""
from pathlib import Path

import pytest
import torch

from qcourse.yolo import models
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset
from qcourse.yolo.evaluate import evaluate

CKPT = Path(__file__).resolve().parents[2] / "data" / "yolov7_tiny_shapes.pt"


def test_checkpoint_is_plain_data_and_small():
    assert CKPT.stat().st_size < 25 * 2 ** 20
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)  # no code can run from it
    assert raw["arch"] == "yolov7-tiny" and raw["nc"] == 6
    assert raw["meta"]["img_size"] == 160


def test_checkpoint_reproduces_its_recorded_map():
    model = models.load_checkpoint(CKPT)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert [m for m in model.named_modules()][-1][0].startswith("model.77")
    recorded = model.meta["map"]
    assert recorded >= 0.6, f"the shipped checkpoint records mAP {recorded:.3f} < 0.6"
    loader = create_dataloader(ensure_default_dataset(progress=False), "val", img_size=160, batch_size=32)
    res = evaluate(model, loader, progress=False)
    assert res["images"] == 250
    assert res["map"] == pytest.approx(recorded, abs=0.005)
    assert res["map50"] > res["map"]
