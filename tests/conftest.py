"""Shared test setup."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    # the tests use small tensors and models that gain nothing from intra-op threads, and on
    # a busy 2-core machine idle OpenMP threads spin: one thread keeps them fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
