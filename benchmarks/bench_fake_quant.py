"""Benchmark: qcourse's fake_tensor_quant vs torch's fused fake-quant kernels (lesson 2).

Prints, side by side in one run, the median time of each on the same 16M-element float32
tensor, the ratio (target: qcourse within 1.3x of torch), and how many elements differ.

    python benchmarks/bench_fake_quant.py [--numel 16777216] [--repeats 15] [--threads N]
"""
import argparse

import torch
from _timing import machine, timed

from qcourse.tensor_quant import fake_tensor_quant


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.numel, generator=g)
    amax = 3.0
    step = amax / 127
    w = torch.randn(256, args.numel // 256, generator=g)
    w_amax = w.abs().amax(dim=1) * 0.9
    zp = torch.zeros(256, dtype=torch.int32)

    cases = [
        ("per-tensor, -128..127",
         lambda: fake_tensor_quant(x, amax, narrow_range=False),
         lambda: torch.fake_quantize_per_tensor_affine(x, step, 0, -128, 127)),
        ("per-tensor, narrow -127..127",
         lambda: fake_tensor_quant(x, amax, narrow_range=True),
         lambda: torch.fake_quantize_per_tensor_affine(x, step, 0, -127, 127)),
        ("per-channel (256 rows)",
         lambda: fake_tensor_quant(w, w_amax.view(-1, 1), narrow_range=False),
         lambda: torch.fake_quantize_per_channel_affine(w, w_amax / 127, zp, 0, -128, 127)),
    ]
    print(f"fake quantization of {args.numel:,} float32 elements, median of {args.repeats} runs")
    print(machine())
    print(f"{'case':32s} {'qcourse ms':>11s} {'torch ms':>9s} {'ratio':>6s} {'differ':>7s}")
    worst = 0.0
    for name, ours, theirs in cases:
        _, t_ours = timed(ours, args.repeats)
        _, t_torch = timed(theirs, args.repeats)
        ratio = t_ours / t_torch
        worst = max(worst, ratio)
        differ = int((ours() != theirs()).sum())
        print(f"{name:32s} {t_ours * 1e3:11.1f} {t_torch * 1e3:9.1f} {ratio:6.2f} {differ:7d}")
    print(f"worst ratio qcourse/torch: {worst:.2f} (target <= 1.30) -> {'PASS' if worst <= 1.3 else 'FAIL'}")
    print("'differ' counts elements where torch's x*(1/scale) and qcourse's x/scale (ONNX's "
          "QuantizeLinear arithmetic) round to neighbouring codes.")


if __name__ == "__main__":
    main()
