"""Shared setup of the application tests: small synthetic datasets made on the spot."""
import sys
from pathlib import Path

import pytest

from qcourse.yolo.datasets import make_synthetic_coco

# the adversarial checkpoint tests reuse the writers of official-layout files in test_checkpoint
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """``small_dataset(name, **params)``: a synthetic COCO-layout dataset in a fresh folder
    (one worker, no progress bar), for fixtures that need a few real images."""
    def make(name: str, **params):
        root = tmp_path_factory.mktemp(name)
        make_synthetic_coco(root, progress=False, workers=1, **params)
        return root

    return make
