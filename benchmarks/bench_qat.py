"""Lesson 7's two figures: what QAT wins back in a stress setting, and what one QAT step costs.

1. Recovery: ``qcourse.yolo.qat.run_qat`` on the embedded default in lesson 7's stress setting
   (``qcourse.yolo.qat.STRESS``: bit widths where PTQ loses > 5 mAP points, the loss and the
   budget of steps), FP32 / PTQ / QAT mAP and the wall time of the whole run (calibration and
   every evaluation included). Goal: QAT recovers >= 70 % of the PTQ loss within 5 minutes on
   2 cores.
2. Step cost on the default (W8A8, batch 16, 160 px): one QAT step (fake quantization, STE
   backward, Adam; with the distillation loss also the FP32 teacher's forward) against one FP32
   training step with the YOLO loss on the same batch. Goal: <= 1.5x.

Run from the repository root: ``python benchmarks/bench_qat.py`` (``--skip-recovery`` for the
step cost alone).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, timed  # noqa: E402

from qcourse.yolo import ptq as yptq  # noqa: E402
from qcourse.yolo import qat as yqat  # noqa: E402
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset  # noqa: E402


def _step(model, loss_fn, batch, opt):
    def run():
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def step_cost(batch_size: int, repeats: int) -> dict:
    """Median seconds of one optimizer step: FP32 (YOLO loss) vs QAT (distillation and YOLO loss)."""
    root = ensure_default_dataset(progress=False)
    loader = create_dataloader(root, "train", img_size=160, batch_size=batch_size, shuffle=False)
    batch = next(iter(loader))
    config = yqat.YoloQATConfig(calib_batches=2, batch_size=batch_size)
    fp32 = yptq.load_float_model().train().requires_grad_(True)
    student = yqat.calibrated_model(yptq.load_float_model(), loader, config).train().requires_grad_(True)
    teacher = yptq.load_float_model()
    cases = {"fp32, YOLO loss": (fp32, yqat.detection_loss(fp32, 160)),
             "qat W8A8, YOLO loss": (student, yqat.detection_loss(student, 160)),
             "qat W8A8, distillation": (student, yqat.distillation_loss(teacher, student))}
    out = {}
    for name, (model, loss_fn) in cases.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-9)  # the cost, not the result, is measured
        out[name] = timed(_step(model, loss_fn, batch, opt), repeats)[1]
    return out


def recovery(settings: dict, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = yqat.run_qat(yqat.YoloQATConfig(**settings, batch_size=batch_size, out=Path(tmp), log=lambda s: None))
        res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per case (default: %(default)s)")
    stress = yqat.STRESS
    ap.add_argument("--epochs", type=int, default=stress["epochs"], help="QAT epochs of the recovery run "
                    "(default: lesson 7's, %(default)s)")
    ap.add_argument("--iters", type=int, default=stress["iters_per_epoch"], help="steps per epoch (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=stress["lr"], help="peak lr (default: %(default)s)")
    ap.add_argument("--loss", choices=yqat.LOSSES, default=stress["loss"], help="QAT loss (default: %(default)s)")
    ap.add_argument("--skip-recovery", action="store_true", help="measure the step cost only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    costs = step_cost(16, args.repeats)
    base = costs["fp32, YOLO loss"]
    print(f"\n{'one training step, batch 16, 160 px':38s} {'ms':>8s} {'x FP32':>7s}")
    for name, s in costs.items():
        print(f"{name:38s} {1e3 * s:8.0f} {s / base:7.2f}")
    if not args.skip_recovery:
        settings = {**yqat.STRESS, "epochs": args.epochs, "iters_per_epoch": args.iters, "lr": args.lr,
                    "loss": args.loss}
        res = recovery(settings, 16)
        label = f"W{settings['w_bits']}A{settings['a_bits']}"
        print(f"\nrecovery at {label}, {args.loss} loss ({args.epochs} x {args.iters} steps, lr {args.lr:g}): "
              f"{res['wall_s']:.0f} s in all (goal: 300 s)")
        for row in res["table"]:
            print(f"  {row['model']:10s} mAP@0.5:0.95 {row['map']:.4f}  mAP@0.5 {row['map50']:.4f}")
        print(f"  recovered {100 * (res['recovered'] or 0):.0f} % of the PTQ loss (goal: 70 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
