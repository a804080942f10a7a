"""Shared test setup. The tests mirror the package: tests/ for the toolkit, tests/yolo/ for
the application, tests/course/ for the course glue."""
import sys
from pathlib import Path

import pytest
import torch

# the shared oracles (tests/oracles.py) import the same way from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    # the tests use small tensors and models that gain nothing from intra-op threads, and on
    # a busy 2-core machine idle OpenMP threads spin: one thread keeps them fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def opened(monkeypatch):
    """The paths opened (builtins.open / io.open) while the test runs: a file refused for its size
    must not be among them."""
    import builtins
    import io
    import os

    paths, real_open = [], builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            paths.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return paths
