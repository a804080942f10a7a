"""Lesson 8 engines on the YOLOv7-tiny default: ORT FP32 vs ORT INT8 vs PyTorch, side by side.

Every engine is timed in the same run, taking turns (qcourse.engines.bench.benchmark), so
the ratios hold on a busy machine; mAP@0.5:0.95 is on the 250 val images.

    python benchmarks/bench_engines.py --threads 2 --iterations 60

Targets (issue 11): ORT INT8 >= 1.5x ORT FP32 at batch 1 and >= 2x at batch 8, its mAP
within 0.3 points of the PyTorch fake-quant model's.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _timing import machine
from qcourse.engines import load_engine
from qcourse.engines.bench import benchmark, machine_line
from qcourse.engines.ort import build as ort_build
from qcourse.engines.ort_int8 import cpu_has_vnni
from qcourse.yolo.engines import calibration_batches, evaluate_engine, export_default_onnx


def _torch_fn(model):
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))[0]
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=60, help="timed calls per engine and batch size")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-map", action="store_true", help="skip the mAP column")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    files = export_default_onnx(work)
    fp32_model, fq_model = files["models"]
    from qcourse.engines import build_engine

    calib = calibration_batches(batches=4)
    int8 = load_engine(ort_build(files["qdq"], work / "int8.onnx", "int8", calibration=calib), threads=args.threads)
    engines = {
        "ORT FP32": build_engine(files["fp32"], work / "fp32e.onnx", precision="fp32", threads=args.threads),
        # the TensorRT-style Q/DQ export loaded as it is: what ORT makes of it without the rewrite
        "ORT Q/DQ as exported": load_engine(files["qdq"], threads=args.threads),
        "ORT INT8 (qcourse)": int8,
        # the three Convs before the float head left float: the fake-quant model exactly
        "ORT INT8, head inputs float": load_engine(ort_build(files["qdq"], work / "int8_exact.onnx", "int8"),
                                                   threads=args.threads),
        "PyTorch FP32": _torch_fn(fp32_model),
    }
    res = benchmark(engines, args.batch, args.iterations, warmup=3)
    maps = {}
    if not args.no_map:
        for name, fn in list(engines.items()) + [("PyTorch fake-quant", fq_model)]:
            maps[name] = evaluate_engine(fn if isinstance(fn, torch.nn.Module) else (lambda x, f=fn: f(x.numpy())),
                                         img_size=160)["map"]
    print(machine())
    print(machine_line(), f"| {args.threads} threads, 160 px, {args.iterations} calls per cell")
    print(f"VNNI: {cpu_has_vnni()}, INT8 weights stored as {int8.info['weight_dtype']}; "
          f"{int8.info['convs']} Convs INT8 ({int8.info['calibrated_convs']} outputs calibrated), "
          f"{int8.info['float_convs']} float")
    base = {b: res["ORT FP32"][b]["latency_ms_median"] for b in args.batch}
    head = " | ".join(f"batch {b}: ms (p90) | x FP32" for b in args.batch)
    print(f"| engine | {head} | mAP@0.5:0.95 |")
    for name in list(engines) + (["PyTorch fake-quant"] if maps else []):
        cells = []
        for b in args.batch:
            r = res.get(name, {}).get(b)
            cells.append("- | -" if r is None else
                         f"{r['latency_ms_median']:.1f} ({r['latency_ms_p90']:.1f}) | {base[b] / r['latency_ms_median']:.2f}")
        m = maps.get(name)
        print(f"| {name} | {' | '.join(cells)} | {'-' if m is None else f'{m:.4f}'} |")


if __name__ == "__main__":
    main()
