"""What every benchmark here shares: timing a callable and naming the machine."""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats: int, warmup: int = 1):
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; return (last result, median s)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def machine() -> str:
    """One line: processor, cores, threads and library versions, printed above every table."""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
            f"{torch.get_num_threads()} torch threads, python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}")
