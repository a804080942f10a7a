"""Lesson 8 — time an engine the way ``trtexec`` reports it: warm-up, then latency percentiles.

Latency is the wall time of one ``engine(batch)`` call (host arrays in and out, as a
user's code sees it); throughput is images per second at the median latency. Every backend
returns the same thing per call, the one output asked for (the graph's first): a TensorRT
engine computes all its outputs on the GPU but copies only that one back, as ONNX Runtime
computes and returns only that one, so the timings compare like for like.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

__all__ = ["time_calls", "benchmark", "machine_line", "synthetic_batch"]


def synthetic_batch(batch: int, shape=(3, 160, 160), seed: int = 0) -> np.ndarray:
    """A fixed random float32 batch in [0, 1]: timing does not depend on the pixel values."""
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def time_calls(fn: Callable[[], object], iterations: int, warmup: int = 3) -> np.ndarray:
    """Seconds of each of ``iterations`` calls of ``fn`` after ``warmup`` untimed ones."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {iterations} and {warmup}")
    for _ in range(warmup):  # first calls allocate buffers and pick kernels
        fn()
    times = np.empty(iterations)
    for k in range(iterations):
        t0 = time.perf_counter()
        fn()
        times[k] = time.perf_counter() - t0
    return times


def summarize(times: np.ndarray, batch: int) -> Dict[str, float]:
    """trtexec's summary numbers from per-call seconds: latency ms min / median / p90 / p99 / max, mean, images/s."""
    ms = 1e3 * np.asarray(times)
    median = float(np.median(ms))
    return {"batch": batch, "iterations": int(ms.size), "latency_ms_median": median,
            "latency_ms_min": float(ms.min()), "latency_ms_max": float(ms.max()),
            "latency_ms_p90": float(np.percentile(ms, 90)), "latency_ms_p99": float(np.percentile(ms, 99)),
            "latency_ms_mean": float(ms.mean()), "throughput_img_s": 1e3 * batch / median}


def benchmark(engines: Dict[str, Callable], batches: Sequence[int], iterations: int, warmup: int = 3,
              shape=(3, 160, 160), rounds: Optional[int] = None) -> Dict[str, Dict[int, Dict[str, float]]]:
    """Time every engine at every batch size, side by side.

    The engines take turns in ``rounds`` rounds of ``iterations / rounds`` calls each
    (default: 5 rounds), so a burst of load on a shared machine hits them all instead of
    one; each turn starts with an untimed call, so what the previous engine left behind
    (its threads winding down, its weights in the caches) is not timed. Returns
    ``{name: {batch: summary}}``.
    """
    rounds = max(1, min(rounds or 5, iterations))
    per_round = max(1, iterations // rounds)
    out = {name: {} for name in engines}
    for b in batches:
        x = synthetic_batch(b, shape)
        times = {name: [] for name in engines}
        for r in range(rounds):
            for name, fn in engines.items():
                times[name].append(time_calls(lambda: fn(x), per_round, warmup if r == 0 else 1))
        for name in engines:
            out[name][b] = summarize(np.concatenate(times[name]), b)
    return out


def machine_line() -> str:
    """One line naming the processor, cores and library versions, printed above every table."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    line = (f"{cpu}, {os.cpu_count()} cpus, python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")
    trt = sys.modules.get("tensorrt")  # loaded only where a TensorRT engine was
    if trt is not None:
        import torch

        gpus = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        line += f", tensorrt {getattr(trt, '__version__', '?')} on {' / '.join(gpus) or 'no GPU'}"
    return line
