"""Lesson 4 benchmark: entropy (and mse) calibration, reference loop vs qcourse.

Collects a realistic activation histogram — the ReLU output of a randomly initialised
3x3 convolution on a batch of random images, about 3.3 million samples — at 2048 and
8192 bins, then times the reference algorithm (the candidate-by-candidate Python loop
that pytorch_quantization runs, kept as the test oracle in ``qcourse/calib/reference.py``)
against ``qcourse.calib.compute_amax_entropy``, and checks that both return the same amax.

    python benchmarks/bench_entropy.py            # 2048 and 8192 bins
    python benchmarks/bench_entropy.py --bins 2048 --repeat 5

The 8192-bin reference run takes tens of seconds: that slowness is the point.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from _timing import machine, timed

from qcourse.calib.reference import ref_amax_entropy, ref_amax_mse  # noqa: E402

from qcourse import calib  # noqa: E402


def activations(seed: int = 0) -> torch.Tensor:
    """ReLU(conv3x3(images)) with Kaiming-initialised weights: ~3.3M non-negative samples."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, 160, 160, generator=g) * 2 - 1
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / 27) ** 0.5)
        conv.bias.copy_(torch.randn(16, generator=g) * 0.1)
        return torch.relu(conv(images))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeat", type=int, default=7, help="timed runs of the qcourse version")
    ap.add_argument("--no-mse", action="store_true", help="skip the mse rows")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = activations()
    print(f"activations: {x.numel():,} samples, {float((x == 0).float().mean()):.0%} zeros, "
          f"max {float(x.max()):.4f}")
    print(machine())
    calib.compute_amax_entropy(np.arange(1, 300), np.arange(300.0), start_bin=200)   # warm-up

    rows = []
    ok = True
    for nb in args.bins:
        cal = calib.HistogramCalibrator(8, None, False, num_bins=nb)
        cal.collect(x)
        hist, edges = cal.histogram, cal.bin_edges
        methods = [("entropy", calib.compute_amax_entropy, ref_amax_entropy)]
        if not args.no_mse:
            methods.append(("mse", calib.compute_amax_mse, ref_amax_mse))
        for name, fast, ref in methods:
            t0 = time.perf_counter()
            want = ref(hist, edges)
            t_ref = time.perf_counter() - t0
            got, t_fast = timed(lambda: fast(hist, edges), args.repeat, warmup=0)
            same = got == want
            ok &= same
            rows.append((name, nb, t_ref, t_fast, t_ref / t_fast, want, got, same))

    print()
    print(f"{'method':8s} {'bins':>5s} {'reference':>11s} {'qcourse':>10s} {'speed-up':>9s}  "
          f"{'amax (reference)':>18s} {'amax (qcourse)':>18s}  same")
    for name, nb, t_ref, t_fast, ratio, want, got, same in rows:
        print(f"{name:8s} {nb:5d} {t_ref * 1e3:9.0f}ms {t_fast * 1e3:8.1f}ms {ratio:8.0f}x  "
              f"{want:18.12g} {got:18.12g}  {'yes' if same else 'NO'}")
    print("\nqcourse time: median of", args.repeat, "runs; reference: one run.")

    # collecting the histogram: exact int64 counts vs torch.histc (float32 counts)
    print(f"\ncollect() of {x.numel():,} samples (median of {args.repeat}):")
    for nb in args.bins:
        cal = calib.HistogramCalibrator(8, None, False, num_bins=nb)
        cal.collect(x)
        top = float(x.max())
        _, a = timed(lambda: cal.collect(x), args.repeat, warmup=0)
        _, b = timed(lambda: torch.histc(x, nb, 0.0, top), args.repeat, warmup=0)
        print(f"  {nb:5d} bins: qcourse {a * 1e3:7.1f} ms ({a / x.numel() * 1e9:5.1f} ns/sample), "
              f"torch.histc {b * 1e3:7.1f} ms -> {a / b:.2f}x histc's time")
    if not ok:
        print("FAIL: qcourse's amax differs from the reference's", file=sys.stderr)
        return 1
    slow = [r for r in rows if r[0] == "entropy" and r[4] < 50]
    if slow:
        print(f"WARNING: entropy speed-up below the 50x target: {[(r[1], round(r[4])) for r in slow]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
