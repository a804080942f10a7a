"""Lessons 1-4 — a small real case: scikit-learn's handwritten digits and a CNN trained in seconds.

The 1,797 8x8 grey-scale digits ship inside scikit-learn, so nothing is downloaded. A
three-layer CNN reaches about 94% test accuracy after a few seconds of CPU training;
that is enough for quantization effects (bit width, per-channel scales, calibration
methods) to show up as real accuracy numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsData", "load_digits", "DigitsCNN", "train_digits_cnn", "accuracy", "batches"]


@dataclass
class DigitsData:
    """Train/calibration/test splits as float tensors (N, 1, 8, 8) in [0, 1] and int64 labels."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.3, n_calib: int = 256) -> DigitsData:
    """Load sklearn's digits, split deterministically; calibration images come from train."""
    from sklearn.datasets import load_digits as _load

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = _load()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    if not 0 < n_calib <= len(train):
        raise ValueError(f"n_calib must be in 1..{len(train)}, got {n_calib}")
    calib = train[:n_calib]
    return DigitsData(x[train], y[train], x[calib], y[calib], x[test], y[test])


class DigitsCNN(nn.Module):
    """conv(1->16) - ReLU - conv(16->32, stride 2) - ReLU - conv(32->64, stride 2) - ReLU - avgpool - linear."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def batches(x: torch.Tensor, y: torch.Tensor = None, batch_size: int = 64):
    """A list of ``(x, y)`` (or ``x``) batches, in order — a tiny deterministic loader."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(x[i:i + batch_size] if y is None else (x[i:i + batch_size], y[i:i + batch_size]))
    return out


def train_digits_cnn(data: DigitsData = None, epochs: int = 12, seed: int = 0, width: int = 16,
                     lr: float = 3e-3, batch_size: int = 64) -> Tuple[DigitsCNN, DigitsData]:
    """Train :class:`DigitsCNN` with Adam; deterministic for a given seed. Returns (model, data)."""
    data = data or load_digits(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        sched.step()
    return model.eval(), data


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (a module or any callable on a batch) on ``(x, y)``."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)
