"""The ``qcourse`` command.

    qcourse course [--out runs/course]     reproduce the course's results: stages, report, notebooks
    qcourse demo   [--out runs/demo]       the core demo only (digits CNN, 4 calibrations, ONNX)
    qcourse train  [--epochs 30 ...]       train YOLOv7-tiny on the synthetic dataset (the default checkpoint)
    qcourse eval   [--weights W --coco DIR] COCO mAP of a checkpoint (default: the shipped model)
    qcourse ptq    [--method all]           post-training quantization with each calibration method (lesson 5)
    qcourse sensitivity [--eval-batches N]  per-layer sensitivity, resumable; top-k layers in float (lesson 6)
    qcourse qat    [--w-bits 4 --epochs 3]   quantization-aware training from the calibrated model (lesson 7)
    qcourse build  [--onnx F --precision P]  an ONNX Runtime / TensorRT engine (default: the default model, int8)
    qcourse bench  --engine G [--engine H]   latency, throughput and mAP of engines, side by side
    qcourse info                           versions, and whether TensorRT/CUDA are usable

A mistake the user can fix (a bad value, a missing file, a run folder made with other
settings, a file qcourse would replace but did not write, a full or read-only disk) prints
one line ``qcourse: error: ...`` that names the value and the fix, and exits
with status 2; Ctrl-C prints one line and exits with 130; a failing lesson notebook prints one
line and exits with 1. ``qcourse --debug ...`` (or ``QCOURSE_DEBUG=1``) shows the traceback
instead. Anything else is a bug in qcourse and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import linecache
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Optional

from qcourse import __version__

__all__ = ["main"]

EXIT_FAILED = 1         # a lesson notebook failed
EXIT_USAGE = 2          # a user error, as argparse reports a bad option
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, what shells report for it


# ------------------------------------------------------------------ the commands
def _cmd_info(args) -> int:
    import numpy
    import onnx
    import onnxruntime
    import torch

    print(f"qcourse {__version__}, python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    try:
        import tensorrt  # noqa: F401

        print(f"TensorRT {tensorrt.__version__}")
    except Exception as e:  # ImportError or a broken placeholder package
        print(f"TensorRT: not usable here ({type(e).__name__}); ONNX Runtime on CPU is the engine")
    return 0


def _cmd_demo(args) -> int:
    from qcourse.course.run import run_demo

    run_demo(Path(args.out), seed=args.seed)
    return 0


def _cmd_course(args) -> int:
    from qcourse.course.run import run_course
    from qcourse.course.stages import CourseConfig

    run_course(CourseConfig(out=Path(args.out), weights=args.weights, coco=args.coco, device=str(args.device),
                            img_size=args.img_size, eval_batches=args.eval_batches, calib_batches=args.calib_batches,
                            scan_batches=args.scan_batches, scan_layers=args.scan_layers, qat_epochs=args.qat_epochs,
                            qat_iters=args.qat_iters, bench_iterations=args.bench_iterations,
                            notebooks=args.notebooks, timeout=args.timeout, seed=args.seed, fresh=args.fresh,
                            only=args.only, skip=tuple(args.skip or ()), progress=sys.stderr.isatty()))
    return 0


def _cmd_train(args) -> int:
    from qcourse.yolo.datasets import ensure_default_dataset
    from qcourse.yolo.train import TrainConfig, train

    root = args.data or ensure_default_dataset()
    # weight_decay and warmup_epochs have no flag: the TrainConfig defaults are the recipe
    config = TrainConfig(arch=args.arch, img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, eval_every=args.eval_every, max_minutes=args.max_minutes,
                         init=args.init)
    res = train(root, args.out, config, resume="force" if args.resume else True)
    if not res["history"]:
        print(f"nothing to train: {args.out} already holds all {args.epochs} epochs of this run")
    print(f"best val mAP@0.5:0.95 = {res['best_map']:.4f}; checkpoint: {Path(args.out) / 'best.pt'}")
    return 0


def _cmd_eval(args) -> int:
    from qcourse.yolo import default_checkpoint, models
    from qcourse.yolo.datasets import create_dataloader, dataset_splits
    from qcourse.yolo.evaluate import evaluate

    weights = args.weights or default_checkpoint()
    model = models.load_checkpoint(weights)
    img_size = args.img_size or model.meta.get("img_size", 640)
    if isinstance(img_size, float) and img_size.is_integer():  # JSON metadata: 640.0 is 640
        img_size = int(img_size)
    problem = None if args.img_size else _img_size_problem(img_size)
    if problem:  # the checkpoint's own record: a file from elsewhere may hold anything
        raise ValueError(f"{weights} records the image size it was trained at as {img_size!r}: {problem} "
                         "with --img-size")
    root, _, val = dataset_splits(args.coco, progress=True)
    split = args.split or val
    loader = create_dataloader(root, split, img_size=img_size, batch_size=args.batch_size)
    res = evaluate(model, loader, device=args.device, max_batches=args.max_batches)
    print(f"{weights.name} on {root} [{split}] at {img_size} px: mAP@0.5:0.95 = {res['map']:.4f}, "
          f"mAP@0.5 = {res['map50']:.4f} ({res['images']} images, {res['total_s']:.1f} s)")
    return 0


def _cmd_ptq(args) -> int:
    from qcourse.ptq import METHODS
    from qcourse.yolo.ptq import PTQConfig, run_ptq

    methods = METHODS if args.method == "all" else (args.method,)
    config = PTQConfig(weights=args.weights, coco=args.coco, img_size=args.img_size, batch_size=args.batch_size,
                       calib_batches=args.calib_batches, methods=methods,
                       ignore=tuple(args.ignore) if args.ignore else None, rules=not args.no_rules,
                       eval_batches=args.eval_batches, device=str(args.device), out=Path(args.out),
                       progress=sys.stderr.isatty())
    res = run_ptq(config)
    print(f"\n{'model':16s} {'mAP@0.5:0.95':>12s} {'mAP@0.5':>8s}  ONNX")
    print(f"{'fp32':16s} {res['fp32']['map']:12.4f} {res['fp32']['map50']:8.4f}  {res['fp32']['onnx']}")
    for method, row in res["int8"].items():
        print(f"{'int8 ' + method:16s} {row['map']:12.4f} {row['map50']:8.4f}  {row['onnx']}, {row['checkpoint']}")
    print(f"{res['quantizers']} quantizers, {len(res['tied_groups'])} tied groups, {len(res['ignored'])} layers "
          f"left in float; results: {Path(args.out) / 'results.json'}")
    return 0


# ------------------------------------------------------------------ option types
# argparse calls these on the text of an option; an ArgumentTypeError becomes the one-line
# "qcourse: error: argument --epochs: ..." before anything slow has started.
def _number(text: str, cast, hint: str):
    """``cast(text)``, or the one-line error that says what to pass instead."""
    try:
        return cast(text)
    except ValueError:
        kind = "whole number" if cast is int else "number"
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}; pass {hint}") from None


#: the largest whole number an option takes: counts, sizes and seeds all fit (a seed is 32 bits), and
#: what code downstream gets stays a machine integer (itertools.islice refuses more than sys.maxsize)
MAX_OPTION_INT = 2**31 - 1
#: the largest --img-size: YOLOv7 runs at 640 (its -w6 models at 1280); one 4096 px image is 200 MB as float32
MAX_IMG_SIZE = 4096


def _int_at_least(low: int, high: int = MAX_OPTION_INT):
    def parse(text: str) -> int:
        value = _number(text, int, f"one from {low} to {high}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; pass a whole number >= {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is too large; pass a whole number from {low} to {high}")
        return value

    return parse


def _img_size_problem(value) -> Optional[str]:
    """What is wrong with ``value`` as an image size (with the fix), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{value!r} is not a whole number of pixels; pass a multiple of 32 such as 640"
    if value <= 0 or value % 32:  # the model downsamples 5 times by 2: other sizes do not tile its grids
        return (f"{value} is not a positive multiple of 32 (the model's largest stride); pass e.g. "
                f"{min(MAX_IMG_SIZE, max(32, round(value / 32) * 32))}")
    if value > MAX_IMG_SIZE:
        return (f"{value} is larger than {MAX_IMG_SIZE} pixels, the largest image size qcourse runs; pass a multiple "
                f"of 32 up to {MAX_IMG_SIZE}, such as 640")
    return None


def _img_size(text: str) -> int:
    value = _number(text, int, "a multiple of 32 such as 160")
    problem = _img_size_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "one > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0; pass one above 0")
    return value


def _existing(kind: str, what: str):
    """An argparse type: the path of an existing ``kind`` ("file" or "folder"); ``what`` says which."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if not (path.is_file() if kind == "file" else path.is_dir()):
            found = "not a " + kind if path.exists() else "does not exist"
            raise argparse.ArgumentTypeError(f"{text} {found}; pass {what}")
        return path

    return parse


def _device(text: str):
    """An argparse type: a torch device that exists here (checked before any model is loaded)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is usable here (this torch {torch.__version__} "
                                             "sees none); pass --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0 to "
                                             f"cuda:{count - 1}; pass one of them")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: qcourse runs on cpu or cuda only; pass cpu, cuda or cuda:N")
    return device


# ------------------------------------------------------------------ the parser
class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage block would hide it) and the help to read."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"qcourse: error: {message} (see `{self.prog} --help`)\n")


def _add_course(sub):
    from qcourse.course.stages import QAT_BUDGET, STAGE_NAMES

    p = sub.add_parser(
        "course", help="reproduce the course's results: every stage, a report, every lesson notebook",
        description="Reproduce the course's results in stages: " + ", ".join(STAGE_NAMES) + ". Each stage is "
                    "cached in OUT/STAGE/results.json and skipped when it was done with the same inputs (settings, "
                    "model, data, qcourse's code); Ctrl-C keeps the finished stages. Then OUT/report.md, "
                    "OUT/report.html (one self-contained page) and OUT/results.json are written; the executed "
                    "notebooks are in OUT/notebooks/ with an HTML copy each. With nothing downloaded it runs the "
                    "embedded default; `qcourse course --weights yolov7.pt --coco /data/coco --device cuda` runs "
                    "the same stages on YOLOv7 and COCO (train2017 for calibration and QAT, val2017 for mAP; the "
                    "engines are TensorRT's where it is installed, else ONNX Runtime's on the CPU, slow on all of "
                    "val2017: add --eval-batches N or --skip engines; NVIDIA's QAT budget is --qat-epochs 10 "
                    "--qat-iters 200).")
    p.add_argument("--out", default="runs/course", help="folder for the stages, the report and the executed "
                   "notebooks (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="redo the chosen stages even when done with the same inputs")
    p.add_argument("--only", choices=STAGE_NAMES, default=None, metavar="STAGE",
                   help=f"run this stage only ({', '.join(STAGE_NAMES)}); the stages it needs must be done "
                        "(default: all stages)")
    p.add_argument("--skip", choices=STAGE_NAMES, action="append", default=None, metavar="STAGE",
                   help="leave this stage out, e.g. --skip notebooks (repeatable; default: none)")
    _add_weights(p, "YOLOv7 checkpoint for lessons 5-8, e.g. yolov7.pt with --coco")
    _add_coco(p, "calibration and QAT on train2017, mAP on val2017")
    _add_device(p)
    _add_img_size(p)
    _add_batches(p, calib_default=4, eval_note="of 32 images, in every stage")
    p.add_argument("--scan-batches", type=_int_at_least(1), default=2,
                   help="val batches of 32 images that each step of the sensitivity scan evaluates (default: "
                        "%(default)s)")
    p.add_argument("--scan-layers", type=_int_at_least(3), default=None,
                   help="scan only the first N >= 3 quantized layers, for a quick look (default: all)")
    p.add_argument("--qat-epochs", type=_int_at_least(1), default=None,
                   help="epochs of both QAT runs, W8A8 and lesson 7's stress bits (default: "
                        f"{QAT_BUDGET['w8a8']['epochs']} at W8A8, {QAT_BUDGET['stress']['epochs']} at the stress bits, "
                        "as lesson 7 trains them)")
    p.add_argument("--qat-iters", type=_int_at_least(1), default=None,
                   help="QAT optimizer steps per epoch, both runs (default: "
                        f"{QAT_BUDGET['w8a8']['iters_per_epoch']} at W8A8, {QAT_BUDGET['stress']['iters_per_epoch']} "
                        "at the stress bits)")
    p.add_argument("--bench-iterations", type=_int_at_least(1), default=20,
                   help="timed calls per engine and batch size (default: %(default)s)")
    p.add_argument("--notebooks", type=_existing("folder", "the course's notebooks/ folder"), default=None,
                   help="folder of the lesson notebooks NN_*.ipynb (default: ./notebooks; if that is "
                        "missing, the notebooks stage is left out)")
    p.add_argument("--timeout", type=_int_at_least(1), default=600,
                   help="seconds one notebook cell may run before the notebook counts as failed "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="random seed of the demo's training and calibration and of QAT's data order "
                        "(default: %(default)s)")
    p.set_defaults(fn=_cmd_course)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the core demo only: a digits CNN quantized, calibrated, exported, checked")
    p.add_argument("--out", default="runs/demo", help="folder for digits_int8.onnx (default: %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="random seed of the training and calibration (default: %(default)s)")
    p.set_defaults(fn=_cmd_demo)


def _add_train(sub):
    p = sub.add_parser(
        "train", help="train YOLOv7(-tiny) on a COCO-format dataset (default: the synthetic one)",
        description="Train YOLOv7(-tiny). The run folder --out keeps last.pt after every epoch: rerunning the "
                    "same command resumes an interrupted run; a rerun with other settings is refused unless "
                    "--resume is given.")
    p.add_argument("--data", type=_existing("folder", "a COCO-format dataset root"), default=None,
                   help="dataset root with train and val splits (default: the synthetic shapes dataset, "
                        "generated on first use)")
    p.add_argument("--out", default="runs/train",
                   help="run folder for last.pt, best.pt and log.jsonl (default: %(default)s)")
    p.add_argument("--arch", default="yolov7-tiny", choices=["yolov7-tiny", "yolov7"],
                   help="model architecture (default: %(default)s)")
    p.add_argument("--img-size", type=_img_size, default=160,
                   help="input size in pixels, a multiple of 32 (default: %(default)s)")
    p.add_argument("--epochs", type=_int_at_least(1), default=30,
                   help="epochs of the schedule (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="images per step, at most the number of training images (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=2e-3,
                   help="peak AdamW learning rate, reached after one warm-up epoch (default: %(default)s)")
    p.add_argument("--eval-every", type=_int_at_least(1), default=5,
                   help="evaluate on the val split every N epochs and after the last one; best.pt keeps "
                        "the best (default: %(default)s)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop cleanly after the epoch that crosses this many minutes; rerun to continue "
                        "(default: no limit)")
    p.add_argument("--init", type=_existing("file", "a checkpoint file (.pt)"), default=None,
                   help="start from this checkpoint's weights (default: random weights)")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="random seed of the weights, shuffling and augmentation (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out even if it was made with other settings (dataset, arch, "
                        "img size, epochs, batch size, lr, seed, init), which then apply from its next epoch. "
                        "Without it, a rerun with the same settings resumes and one with other settings is "
                        "refused. --eval-every and --max-minutes may change either way")
    p.set_defaults(fn=_cmd_train)


# ------------------------------------------------------------------ options the YOLOv7 commands share
def _add_weights(p, help_: str = "yolov7.pt, yolov7-tiny.pt or a qcourse checkpoint"):
    p.add_argument("--weights", type=_existing("file", "a checkpoint file (.pt)"), default=None,
                   help=f"{help_} (default: the shipped data/yolov7_tiny_shapes.pt)")


def _add_calibrated(p, help_: str):
    p.add_argument("--calibrated", type=_existing("file", "a calibrated checkpoint of `qcourse ptq` (int8_*.pt)"),
                   default=None, help=help_)


def _add_coco(p, use: str, layout: str = "train2017/, val2017/ and annotations/"):
    p.add_argument("--coco", type=_existing("folder", f"a COCO root with {layout}"), default=None,
                   help=f"COCO root: {use} (default: the synthetic shapes dataset)")


def _add_img_size(p):
    p.add_argument("--img-size", type=_img_size, default=None,
                   help="input size in pixels, a multiple of 32 (default: the checkpoint's, else 640)")


def _add_batches(p, calib_default: int, eval_note: str = "for a quick look"):
    p.add_argument("--calib-batches", type=_int_at_least(1), default=calib_default,
                   help="training batches the calibrators see, exactly (default: %(default)s)")
    p.add_argument("--eval-batches", type=_int_at_least(1), default=None,
                   help=f"evaluate only the first N validation batches, {eval_note} (default: all)")


def _add_device(p):
    p.add_argument("--device", type=_device, default="cpu",
                   help="where the model runs: cpu, cuda or cuda:N (default: %(default)s)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint (default: the shipped model on the synthetic val split)")
    _add_weights(p)
    _add_coco(p, "evaluation on val2017", layout="val2017/ and annotations/")
    p.add_argument("--split", default=None, help="split to evaluate (default: val2017 with --coco, else val)")
    _add_img_size(p)
    p.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per batch (default: %(default)s)")
    _add_device(p)
    p.add_argument("--max-batches", type=_int_at_least(1), default=None,
                   help="evaluate only the first N batches, for a quick look (default: all)")
    p.set_defaults(fn=_cmd_eval)


def _add_ptq(sub):
    import re

    def regex(text: str) -> str:  # checked here; "matches no layer" is checked against the model
        try:
            re.compile(text)
        except re.error as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e}); "
                                             "escape dots as \\. e.g. 'model\\.77\\.m\\..*'") from None
        return text

    p = sub.add_parser(
        "ptq", help="post-training quantization of YOLOv7(-tiny): FP32 vs each calibration method (lesson 5)",
        description="Fuse the model, insert Q/DQ (TensorRT's placement rules applied), calibrate on training "
                    "images, then for each method: evaluate mAP, export INT8 ONNX, save a calibrated checkpoint "
                    "and check the ONNX file in ONNX Runtime. Writes OUT/results.json last.")
    _add_weights(p)
    _add_coco(p, "calibration on train2017, evaluation on val2017")
    _add_img_size(p)
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="images per batch, for calibration and evaluation (default: %(default)s)")
    _add_batches(p, calib_default=8)
    p.add_argument("--method", default="all", choices=["max", "entropy", "mse", "percentile", "all"],
                   help="how amax is chosen from the statistics; all compares the four (default: %(default)s)")
    p.add_argument("--ignore", type=regex, action="append", default=None, metavar="REGEX",
                   help="layers to leave in float, matched from the start of the name (repeatable; replaces "
                        "the default, the detection head's convs such as 'model\\.77\\.m\\..*')")
    p.add_argument("--no-rules", action="store_true",
                   help="do not tie quantizers around Concat/MaxPool (TensorRT then needs reformat layers)")
    _add_device(p)
    p.add_argument("--out", default="runs/ptq",
                   help="folder for results.json, the ONNX files and the INT8 checkpoints (default: %(default)s)")
    p.set_defaults(fn=_cmd_ptq)


# ------------------------------------------------------------------ QAT (lesson 7)
def _cmd_qat(args) -> int:
    from qcourse.yolo.qat import YoloQATConfig, run_qat

    config = YoloQATConfig(weights=args.weights, calibrated=args.calibrated, coco=args.coco, img_size=args.img_size,
                           epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
                           lr=args.lr, loss=args.loss, supervision_stride=args.supervision_stride,
                           w_bits=args.w_bits, a_bits=args.a_bits, learn_amax=args.learn_amax,
                           calib_batches=args.calib_batches, eval_batches=args.eval_batches,
                           device=str(args.device), out=Path(args.out), resume=args.resume, seed=args.seed,
                           progress=sys.stderr.isatty())
    res = run_qat(config)
    if res is None:  # a torchrun rank other than 0: rank 0 prints and writes
        return 0
    print(f"\n{'model':10s} {'mAP@0.5:0.95':>12s} {'[95% interval]':>18s} {'mAP@0.5':>8s}")
    for row in res["table"]:
        iv = row.get("interval")
        cell = f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "-"
        print(f"{row['model']:10s} {row['map']:12.4f} {cell:>18s} {row['map50']:8.4f}")
    got = res.get("recovered_share")
    if got and got.get("share") is not None:
        lo, hi = got["interval"]
        share = f"{100 * got['share']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] (95 % interval over the val images)"
    else:
        share = f"no share: {res.get('recovered_share_reason') or 'PTQ lost nothing measurable'}"
    print(f"QAT won back {share} of the PTQ loss (best epoch {res['best_epoch']}); files in {args.out}: best.pt, "
          f"last.pt, {'qat.onnx, ' if res['onnx'] else ''}fp32.npz, ptq.npz, qat.npz (per-image matches), results.json")
    return 0


def _bits(text: str) -> int:
    value = _number(text, int, "a whole number from 2 to 8")
    if not 2 <= value <= 8:  # 1 bit has no symmetric grid; above 8, TensorRT's INT8 has no use for it
        raise argparse.ArgumentTypeError(f"{value} bits is outside 2..8; pass e.g. 8 (INT8) or 4 (a stress test)")
    return value


def _add_qat(sub):
    p = sub.add_parser(
        "qat", help="quantization-aware training of YOLOv7(-tiny) from its calibrated PTQ model (lesson 7)",
        description="Calibrate as `qcourse ptq` (or load --calibrated), then fine-tune with fake quantization in "
                    "the loop, NVIDIA's recipe: Adam, lr low-high-low by epoch, a fixed number of iterations per "
                    "epoch, label-free distillation by default. Evaluates every epoch and keeps the best; writes "
                    "OUT/best.pt, last.pt, qat.onnx and results.json (FP32 / PTQ / QAT table); a run that does not "
                    "resume first deletes the earlier run's. The same command under `torchrun "
                    "--nproc_per_node=N` trains with DistributedDataParallel (with --device cuda, each process "
                    "on the GPU of its LOCAL_RANK).")
    _add_weights(p, "FP32 yolov7.pt, yolov7-tiny.pt or a qcourse checkpoint, also the distillation teacher")
    _add_calibrated(p, "start from this calibrated checkpoint (default: calibrate as `qcourse ptq`)")
    _add_coco(p, "training images from train2017, evaluation on val2017")
    _add_img_size(p)
    p.add_argument("--epochs", type=_int_at_least(1), default=3,
                   help="epochs; the lr is low, high, then low again by epoch (NVIDIA: 10) (default: %(default)s)")
    p.add_argument("--iters-per-epoch", type=_int_at_least(1), default=20,
                   help="optimizer steps per epoch (NVIDIA: 200) (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16,
                   help="images per step over all processes, and per calibration batch (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=1e-4,
                   help="peak Adam learning rate; epochs in the low phases use a tenth (NVIDIA: 1e-5) "
                        "(default: %(default)s)")
    p.add_argument("--loss", default="distill", choices=["distill", "detection"],
                   help="distill: MSE to the FP32 model's block outputs, no labels; detection: the YOLO loss "
                        "on the labels (default: %(default)s)")
    p.add_argument("--supervision-stride", type=_int_at_least(1), default=1,
                   help="with --loss distill, compare every N-th block (the last one always) (default: %(default)s)")
    p.add_argument("--w-bits", type=_bits, default=8,
                   help="weight bits, per channel; 4 is a stress setting where PTQ loses more (default: %(default)s)")
    p.add_argument("--a-bits", type=_bits, default=8,
                   help="activation (input) bits, per tensor; 5 or 6 is a stress setting (default: %(default)s)")
    p.add_argument("--learn-amax", action="store_true",
                   help="also train the activation ranges (PACT gradient); weight ranges stay calibrated")
    _add_batches(p, calib_default=4)
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="random seed of the data order (default: %(default)s)")
    _add_device(p)
    p.add_argument("--out", default="runs/qat",
                   help="folder for best.pt, last.pt, qat.onnx and results.json (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same settings), ending with the weights an "
                        "uninterrupted run would have")
    p.set_defaults(fn=_cmd_qat)


# ------------------------------------------------------------------ engines (lesson 8)
def _cmd_build(args) -> int:
    from qcourse.engines import build_engine

    from qcourse.utils import check_writable

    name = f"{args.backend}_{args.precision}{'.engine' if args.backend == 'tensorrt' else '.onnx'}"
    out = Path(args.out or f"runs/engines/{name}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; pass the engine file to write, e.g. --out {out / name}")
    onnx_path = args.onnx
    # the default model is exported next to the engine: a user's fp32.onnx / qdq.onnx there is refused too
    check_writable(out, *((out.parent / "fp32.onnx", out.parent / "qdq.onnx") if onnx_path is None else ()))
    if onnx_path is None:  # the embedded default: export it first, next to the engine
        from qcourse.yolo.engines import export_default_onnx

        files = export_default_onnx(out.parent, calib_batches=args.calib_batches)
        onnx_path = files["qdq" if args.precision == "int8" else "fp32"]
        print(f"exported the default YOLOv7-tiny to {files['fp32']} and {files['qdq']} (Q/DQ, "
              f"{args.calib_batches} calibration batches)")
    calibration = None
    if args.backend == "onnxruntime" and args.precision == "int8" and args.output_calib != "none":
        calibration = _build_calibration(onnx_path, args)
    t0 = time.perf_counter()
    engine = build_engine(onnx_path, out, backend=args.backend, precision=args.precision, batch=args.batch,
                          calibration=calibration, calib_method=args.output_calib, device=_engine_device(args))
    extra = getattr(engine, "info", {})
    done = f"; {extra['convs']} Convs run integer kernels, {extra['float_convs']} float" if "convs" in extra else ""
    if extra.get("calibrated_convs"):
        done += f" ({extra['calibrated_convs']} with outputs calibrated by {extra['calib_method']})"
    print(f"built {engine.describe()} from {onnx_path} in {time.perf_counter() - t0:.1f} s{done}")
    return 0


def _engine_device(args):
    """The CUDA device a TensorRT engine builds on (None for ONNX Runtime, which runs on the CPU)."""
    if args.backend != "tensorrt":
        if args.device is not None and args.device.type != "cpu":
            raise ValueError(f"--device {args.device}: the onnxruntime backend runs on the CPU; drop --device or "
                             "pass --backend tensorrt")
        return None
    if args.device is not None and args.device.type != "cuda":
        raise ValueError(f"--device {args.device}: TensorRT runs on a CUDA GPU; pass cuda or cuda:N, or "
                         "--backend onnxruntime for the CPU")
    return "cuda" if args.device is None else str(args.device)


def _build_calibration(onnx_path: Path, args):
    """Training images at the ONNX input's size for the Convs that feed float Convs, or None if none do."""
    from qcourse.engines.base import onnx_input_shape
    from qcourse.engines.ort_int8 import calibration_targets
    from qcourse.export import load_onnx
    from qcourse.yolo.datasets import dataset_splits
    from qcourse.yolo.engines import calibration_batches

    model = load_onnx(onnx_path)
    if not calibration_targets(model):
        return None
    dims = list(onnx_input_shape(model))
    if len(dims) != 4 or dims[2] is None or dims[2] != dims[3]:
        raise ValueError(f"{onnx_path} takes input of shape {dims}; calibrating its conv outputs needs a fixed "
                         "square image size (export with one), or pass --output-calib none")
    root, train, _ = dataset_splits(args.coco, progress=False)
    return calibration_batches(img_size=dims[2], batches=args.calib_batches, root=root, split=train)


def _bench_table(results, maps, machine: str) -> str:
    lines = [f"machine: {machine}", "engine | batch | latency ms median | p90 | p99 | images/s | mAP@0.5:0.95"]
    for name, per_batch in results.items():
        for b, r in per_batch.items():
            m = maps.get(name)
            lines.append(f"{name} | {b} | {r['latency_ms_median']:.2f} | {r['latency_ms_p90']:.2f} | "
                         f"{r['latency_ms_p99']:.2f} | {r['throughput_img_s']:.1f} | "
                         f"{'-' if m is None else f'{m:.4f}'}")
    return "\n".join(lines)


def _cmd_bench(args) -> int:
    import json

    from qcourse.engines import load_engine
    from qcourse.engines.bench import benchmark, machine_line
    from qcourse.utils import atomic_write, check_memory, check_writable

    if args.json:  # both files are refused before any engine runs if a user's file has their name
        if args.json.suffix.lower() == ".png":
            raise ValueError(f"--json {args.json} would be replaced by the chart written next to it; pass a "
                             f"path ending in .json, e.g. {args.json.with_suffix('.json')}")
        check_writable(args.json, args.json.with_suffix(".png"))
    engines = {}
    for path in args.engine:
        engine = load_engine(path, threads=args.threads,
                             device=None if args.device is None or path.suffix == ".onnx" else str(args.device))
        engines[f"{path.name} ({engine.backend} {engine.precision})"] = engine
    shape = next(iter(engines.values())).image_shape
    if None in shape:
        raise ValueError(f"{args.engine[0]} has a free input size {shape}; bench needs engines built for one "
                         "image size (export with a fixed size)")
    check_memory(max(args.batch) * math.prod(shape) * 4,  # float32 images: refused before any is allocated
                 f"a batch of {max(args.batch)} image(s) of the input shape {tuple(shape)} of {args.engine[0]} "
                 "(float32)", "pass a smaller --batch, or build the engine for a smaller image size")
    results = benchmark(engines, args.batch, args.iterations, warmup=args.warmup, shape=shape)
    maps = {}
    if not args.no_map:  # the detections of each engine, scored like any model
        from qcourse.yolo.engines import evaluate_engine

        maps = {name: evaluate_engine(engine)["map"] for name, engine in engines.items()}
    machine = machine_line() + f", {args.threads} threads"
    print(_bench_table(results, maps, machine))
    if args.json:
        from qcourse.course.plots.engines import plot_engine_benchmark
        from qcourse.course.report import save_figure

        with atomic_write(args.json, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"machine": machine, "results": results, "map": maps}, indent=1))
        png = save_figure(plot_engine_benchmark(results, maps, title=machine), args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {png}")
    return 0


def _add_build(sub):
    p = sub.add_parser("build", help="build an ONNX Runtime or TensorRT engine from an ONNX file (lesson 8)",
                       description="Build an engine. Without --onnx, the embedded default YOLOv7-tiny is "
                                   "calibrated and exported first (fp32.onnx and qdq.onnx next to --out).")
    p.add_argument("--onnx", type=_existing("file", "an ONNX file (float, or exported with Q/DQ for int8)"),
                   default=None, help="the ONNX file (default: export the embedded default model)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (CPU, writes .onnx) or tensorrt (GPU, writes .engine) (default: %(default)s)")
    p.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"],
                   help="int8 needs a Q/DQ ONNX; fp16 needs tensorrt (default: %(default)s)")
    p.add_argument("--out", default=None, help="engine file (default: runs/engines/BACKEND_PRECISION.onnx|.engine)")
    p.add_argument("--batch", type=_int_at_least(1), nargs=3, default=[1, 8, 32], metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT's dynamic-batch profile (default: 1 8 32; ONNX Runtime takes any batch)")
    p.add_argument("--calib-batches", type=_int_at_least(1), default=4,
                   help="train batches of 32 images that calibrate the default model and the outputs "
                        "--output-calib calibrates (default: %(default)s)")
    p.add_argument("--output-calib", default="entropy", choices=["entropy", "mse", "percentile", "max", "none"],
                   help="onnxruntime int8: how to calibrate the outputs of the quantized Convs that feed float "
                        "Convs (the 3 before YOLOv7's float head), so that ORT runs them in INT8 too; 'none' "
                        "leaves them float: exactly the fake-quant model, slower (default: %(default)s)")
    _add_coco(p, "its train2017 images calibrate those outputs", layout="train2017/ and annotations/")
    p.add_argument("--device", type=_device, default=None,
                   help="tensorrt only: the GPU to build on, cuda or cuda:N (a plan runs on the GPU model it was "
                        "built for; default: torch's current CUDA device); onnxruntime runs on the CPU")
    p.set_defaults(fn=_cmd_build)


def _add_bench(sub):
    p = sub.add_parser("bench", help="latency, throughput and mAP of engines, side by side (lesson 8)")
    p.add_argument("--engine", type=_existing("file", "an engine file built by qcourse build"), action="append",
                   required=True, help="an engine file (.onnx or .engine); repeat to compare several")
    p.add_argument("--batch", type=_int_at_least(1), nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--iterations", type=_int_at_least(1), default=50,
                   help="timed calls per engine and batch size, taking turns (default: %(default)s)")
    p.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed calls first (default: %(default)s)")
    p.add_argument("--threads", type=_int_at_least(1), default=2, help="ONNX Runtime threads (default: %(default)s)")
    p.add_argument("--no-map", action="store_true", help="skip the mAP of each engine on the val split")
    p.add_argument("--device", type=_device, default=None,
                   help="the GPU that runs TensorRT .engine files, cuda or cuda:N (default: torch's current "
                        "CUDA device); .onnx engines run on the CPU")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results here, and a PNG chart next to it (default: print the table only)")
    p.set_defaults(fn=_cmd_bench)


# ------------------------------------------------------------------ sensitivity (lesson 6)
def _sensitivity_setting(text: str) -> str:
    """``--setting``: a name like W8pcA4, checked here (the amax method comes from --method)."""
    import re

    m = re.fullmatch(r"w(\d)(pc|pt)a(\d)", text.strip().lower())
    if not m or not (2 <= int(m[1]) <= 8 and 2 <= int(m[3]) <= 8):
        raise argparse.ArgumentTypeError(f"{text!r} is not a setting like W8pcA4 (W: weight bits 2-8, pc per-channel "
                                         "or pt per-tensor weights, A: activation bits 2-8)")
    return text.strip()


def _cmd_sensitivity(args) -> int:
    from qcourse.utils import check_writable
    from qcourse.yolo.ptq import Setting
    from qcourse.yolo.sensitivity import SensitivityConfig, run_sensitivity

    out = Path(args.out)
    if args.calibrated and args.setting:
        raise ValueError(f"--setting {args.setting} cannot re-calibrate {args.calibrated.name}: it was calibrated at its "
                         "own setting; drop --setting, or drop --calibrated to calibrate here")
    setting = Setting.parse(args.setting, args.method or "mse") if args.setting else None
    config = SensitivityConfig(weights=args.weights, calibrated=args.calibrated, coco=args.coco, setting=setting,
                               method=args.method or "mse", img_size=args.img_size, batch_size=args.batch_size,
                               calib_batches=args.calib_batches, eval_batches=args.eval_batches,
                               proxy_batches=args.proxy_batches, proxy_only=args.proxy, top=args.top,
                               device=str(args.device), out=out, fresh=args.fresh, progress=sys.stderr.isatty())
    if args.calibrated and args.method:  # the checkpoint's own method is what its amax came from
        raise ValueError(f"--method {args.method} cannot re-calibrate {args.calibrated.name}: it holds its amax; "
                         "drop --method, or drop --calibrated to calibrate here")
    if not args.proxy:  # the chart _print_sensitivity draws; run_sensitivity checks its own files
        check_writable(out / "sensitivity.png")
    try:
        res = run_sensitivity(config)
    except KeyboardInterrupt as e:  # the scan's own message says how many layers are saved
        raise KeyboardInterrupt(str(e) or f"interrupted; {out / 'sensitivity.json'} keeps every finished "
                                "layer: rerun the same command to resume") from None
    _print_sensitivity(res, out, args.top)
    return 0


def _print_sensitivity(res: dict, out: Path, top: int) -> None:
    if "top" not in res:  # --proxy: the label-free ranking only
        print(f"\nlabel-free ranking (lowest SQNR first), top {top}:")
        for row in res["proxy_top"]:
            print(f"  {row['rank']:2d}  {row['layer']:12s} {row['sqnr_db']:6.1f} dB")
        print(f"results: {out / 'results.json'}")
        return
    from qcourse.course.plots.sensitivity import plot_sensitivity_summary
    from qcourse.course.report import save_figure
    from qcourse.sensitivity import load_results
    from qcourse.yolo.sensitivity import ranking_title, summary_lines

    # "most sensitive" only where the ranking passed its tests (stable, worth keeping in float, beats chance)
    print(f"\nFP32 mAP {res['fp32']['map']:.4f}, INT8 {res['int8']['map']:.4f}; {ranking_title(res)}, top {top}:")
    print(f"  {'#':>2s}  {'layer':12s} {'mAP in float':>12s} {'drop':>8s} {'SQNR dB':>8s}")
    for r in res["top"]:
        sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        print(f"  {r['rank']:2d}  {r['layer']:12s} {r['map']:12.4f} {r['drop']:+8.4f} {sqnr:>8s}")
    rho = res["proxy_correlation"]["spearman"]
    print(f"proxy (SQNR) vs mAP ranking: Spearman rho = {'n/a' if rho is None else f'{rho:.3f}'} "
          f"over {res['proxy_correlation']['layers']} layers")
    print(f"\n{'k in float':>10s} {'mAP [95% interval]':>26s} {'INT8 layers':>12s}")
    for r in res["map_vs_k"]:
        iv = r["interval"]
        print(f"{r['k']:10d} {r['map']:8.4f} [{iv[0]:.4f}, {iv[1]:.4f}] {r['int8_layers']:12d}")
    print()
    for line in summary_lines(res):
        print(line)
    scan = load_results(out / "sensitivity.json")
    save_figure(plot_sensitivity_summary(scan["layers"], res["map_vs_k"], res["fp32"]["map"], top=top),
                out / "sensitivity.png")
    print(f"files: {out / 'sensitivity.json'}, {out / 'results.json'}, {out / 'sensitivity.png'}")


def _add_sensitivity(sub):
    p = sub.add_parser(
        "sensitivity", help="per-layer sensitivity of the INT8 model, resumable; top-k layers in float (lesson 6)",
        description="Calibrate as `qcourse ptq` does (or load --calibrated), then evaluate the model with each "
                    "layer (model.N) in float in turn. OUT/sensitivity.json is saved after every layer: Ctrl-C "
                    "stops cleanly and rerunning the same command resumes. Then re-quantizes with the top-k layers "
                    "in float (k = 0, 1, 3, 5, 10), compares the first 5 with 5 random layers, scores the ranking "
                    "on two halves of the images (split-half rho), and writes OUT/results.json, OUT/sensitivity.png "
                    "and each evaluation's per-image matches in OUT/tables/. The ranking is called 'most "
                    "sensitive' only where quantization costs >= 3 points, split-half rho >= 0.7, the top 5 win "
                    "back >= half the loss and beat 5 random layers.")
    _add_weights(p, "float yolov7.pt, yolov7-tiny.pt or a qcourse checkpoint to calibrate here")
    _add_calibrated(p, "a calibrated INT8 checkpoint of `qcourse ptq` (int8_<method>.pt) instead of "
                       "calibrating here (default: none; calibrate as `qcourse ptq` does)")
    _add_coco(p, "calibration on train2017, evaluation on val2017")
    p.add_argument("--method", default=None, choices=["max", "entropy", "mse", "percentile"],
                   help="how amax is chosen from the statistics when calibrating here (default: mse)")
    p.add_argument("--setting", type=_sensitivity_setting, default=None, metavar="WxxAy",
                   help="bit widths when calibrating here, named W<weight bits><pc|pt>A<activation bits> (pc: "
                        "per-channel, pt: per-tensor weights), e.g. W8pcA4 (default: W8pcA8, what TensorRT runs). "
                        "On the embedded default 8-bit quantization costs under a point of mAP, so the scan "
                        "ranks noise; lesson 6's stress setting, where layers differ measurably, is "
                        "--setting W8pcA4 --method entropy")
    _add_img_size(p)
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="images per batch, for calibration and evaluation (default: %(default)s)")
    _add_batches(p, calib_default=8, eval_note="for a fast look; recorded in sensitivity.json, so a rerun "
                                               "with another N is refused")
    p.add_argument("--proxy", action="store_true",
                   help="only the label-free ranking: SQNR of each layer's output with only it quantized, one pass "
                        "over --proxy-batches training batches; no evaluation")
    p.add_argument("--proxy-batches", type=_int_at_least(1), default=2,
                   help="training batches the proxy sees (default: %(default)s)")
    p.add_argument("--top", type=_int_at_least(1), default=10,
                   help="rows of the printed ranking, red bars in the chart (default: %(default)s)")
    _add_device(p)
    p.add_argument("--out", default="runs/sensitivity",
                   help="folder for sensitivity.json, results.json and sensitivity.png (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: replace OUT/sensitivity.json instead of resuming it (needed when it was made "
                        "with other settings, or is damaged)")
    p.set_defaults(fn=_cmd_sensitivity)


class _CommandList(argparse.HelpFormatter):
    """``qcourse --help``: one line per command, however wide the terminal."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=24, width=200)

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):  # argparse counts their names 2 columns short
            self._action_max_length += 2


def _build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="qcourse", description="INT8 quantization for TensorRT, the course.",
                 formatter_class=_CommandList,
                 epilog="`qcourse COMMAND --help` explains a command's options. An error prints one line; "
                        "--debug (or QCOURSE_DEBUG=1) shows its traceback.")
    ap.add_argument("--version", action="version", version=f"qcourse {__version__}")
    ap.add_argument("--debug", action="store_true",
                    help="show the full traceback of an error instead of one line (also: QCOURSE_DEBUG=1)")
    ap.set_defaults(fn=None)
    sub = ap.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_course, _add_demo, _add_train, _add_eval, _add_ptq, _add_qat, _add_build, _add_bench,
                _add_sensitivity):
        add(sub)
    sub.add_parser("info", help="versions and available engines").set_defaults(fn=_cmd_info)
    return ap


# ------------------------------------------------------------------ errors
_WRITABLE = "pick a location you may write (e.g. another --out)"
_SPACE = "free space or pick another --out"
#: the fix for an error of the operating system, by errno (any other: _OS_FIX)
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "pass a file, not a folder",
    errno.EEXIST: "a file of that name is in the way; pick another path (e.g. another --out)",
    errno.EACCES: _WRITABLE + ", or check that you may read it",
    errno.EPERM: _WRITABLE + ", or check that you may read it",
    errno.EROFS: _WRITABLE,
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EFBIG: _SPACE,
    errno.ENAMETOOLONG: "pick a shorter path",
}
_OS_FIX = "check the path and the disk (or pick another --out)"
#: the name atomic_write gives its temporary file beside ``name``: ``.name.XXXXXXXX[suffix]``
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$")


def _raised_by_our_check(e: BaseException) -> bool:
    """True when ``e`` comes from a ``raise`` statement in qcourse (outside this file).

    That is our own validation of an argument; a TypeError raised by Python or torch, or by a
    wrong call in this file, is a bug and keeps its traceback.
    """
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    here = Path(__file__).resolve()
    package = here.parents[1]          # qcourse/, this file being qcourse/course/cli.py
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    line = linecache.getline(str(path), tb.tb_lineno).strip()
    return package in path.parents and path != here and line.startswith("raise")


def _exit_code(e: Exception) -> Optional[int]:
    """The status for an error to report in one line, or ``None`` for a bug (keep the traceback)."""
    from qcourse.course.run import NotebookFailed

    if isinstance(e, NotebookFailed):
        return EXIT_FAILED
    if isinstance(e, (ValueError, OSError)):  # CheckpointError is a ValueError; a full or read-only disk an OSError
        return EXIT_USAGE
    if isinstance(e, TypeError) and _raised_by_our_check(e):
        return EXIT_USAGE
    return None


def _os_path(e: OSError, args) -> Optional[str]:
    """The path an error of the OS is about: the destination of a rename, the file a temporary file
    was to become (not the hidden temporary name), or else the command's output (``--out``)."""
    name = e.filename2 if e.filename2 is not None else e.filename
    if name is None:  # e.g. a write() on a full disk: the file is not named
        for option in ("out", "json"):
            if getattr(args, option, None):
                return f"{getattr(args, option)} (--{option})"
        return None
    if not isinstance(name, (str, bytes, os.PathLike)):  # a file descriptor
        return str(name)
    path = Path(os.fsdecode(name))
    temp = _TEMP_NAME.match(path.name)
    if temp and not path.exists():
        return str(path.parent / temp.group("name"))
    return str(path)


def _one_line(e: Exception, args=None) -> str:
    if isinstance(e, OSError) and e.errno is not None and e.strerror:  # from the OS: name the path, add the fix
        fix = _OS_FIXES.get(e.errno, _OS_FIX)
        path = _os_path(e, args)
        return f"{e.strerror.lower()}: {path}; {fix}" if path else f"{e.strerror.lower()}; {fix}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the ``qcourse`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.fn is None:  # a bare `qcourse`: say what it can do, and fail so that scripts notice
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = args.debug or os.environ.get("QCOURSE_DEBUG", "").strip() not in ("", "0")
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"qcourse: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = _exit_code(e)
        if debug or code is None:
            raise
        print(f"qcourse: error: {_one_line(e, args)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
