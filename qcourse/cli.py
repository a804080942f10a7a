"""The ``qcourse`` command.

    qcourse course [--out runs/course]     the whole course on the embedded default
    qcourse demo   [--out runs/demo]       the core demo only (digits CNN, 4 calibrations, ONNX)
    qcourse train  [--epochs 30 ...]       train YOLOv7-tiny on the synthetic dataset (the default checkpoint)
    qcourse eval   [--weights W --coco DIR] COCO mAP of a checkpoint (default: the shipped model)
    qcourse info                           versions, and whether TensorRT/CUDA are usable
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cmd_info(args) -> int:
    import numpy
    import onnx
    import onnxruntime
    import torch

    import qcourse

    print(f"qcourse {qcourse.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    try:
        import tensorrt  # noqa: F401

        print(f"TensorRT {tensorrt.__version__}")
    except Exception as e:  # ImportError or a broken placeholder package
        print(f"TensorRT: not usable here ({type(e).__name__}); ONNX Runtime on CPU is the engine")
    return 0


def _cmd_demo(args) -> int:
    from qcourse.course import run_demo

    run_demo(Path(args.out), seed=args.seed)
    return 0


def _cmd_course(args) -> int:
    from qcourse.course import find_notebooks, run_demo, run_notebooks

    t0 = time.perf_counter()
    out = Path(args.out)
    print("== core demo: quantize, calibrate, export and check a digits CNN ==")
    run_demo(out / "demo", seed=args.seed)
    notebooks = find_notebooks(args.notebooks)
    if not notebooks:
        where = args.notebooks or "./notebooks"
        print(f"\nno lesson notebooks found in {where}: run this from the course's repository root "
              "(or pass --notebooks DIR). Only the core demo ran.")
        return 0
    print(f"\n== lessons: executing {len(notebooks)} notebooks ==")
    rows = run_notebooks(notebooks, out / "notebooks", timeout=args.timeout)
    print("\nlesson notebook                         time")
    for r in rows:
        print(f"  {r['notebook']:36s} {r['seconds']:5.0f} s")
    print(f"course finished in {time.perf_counter() - t0:.0f} s; executed notebooks are in {out / 'notebooks'}")
    return 0


def _cmd_train(args) -> int:
    from qcourse.datasets import ensure_default_dataset
    from qcourse.train import train

    root = Path(args.data) if args.data else ensure_default_dataset()
    res = train(root, args.out, arch=args.arch, img_size=args.img_size, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
                max_minutes=args.max_minutes, init=args.init)
    print(f"best val mAP@0.5:0.95 = {res['best_map']:.4f}; checkpoint: {Path(args.out) / 'best.pt'}")
    return 0


def _cmd_eval(args) -> int:
    from qcourse import models
    from qcourse.datasets import create_dataloader, ensure_default_dataset
    from qcourse.evaluate import evaluate

    weights = Path(args.weights) if args.weights else default_checkpoint()
    model = models.load_checkpoint(weights)
    img_size = args.img_size or int(model.meta.get("img_size", 640))
    root = Path(args.coco) if args.coco else ensure_default_dataset()
    split = args.split or ("val2017" if args.coco else "val")
    loader = create_dataloader(root, split, img_size=img_size, batch_size=args.batch_size)
    res = evaluate(model, loader, device=args.device, max_batches=args.max_batches)
    print(f"{weights.name} on {root} [{split}] at {img_size} px: mAP@0.5:0.95 = {res['map']:.4f}, "
          f"mAP@0.5 = {res['map50']:.4f} ({res['images']} images, {res['total_s']:.1f} s)")
    return 0


def default_checkpoint() -> Path:
    """The shipped embedded-default checkpoint (``data/yolov7_tiny_shapes.pt``)."""
    here = Path(__file__).resolve().parent.parent / "data" / "yolov7_tiny_shapes.pt"
    if not here.is_file():
        raise FileNotFoundError(f"the default checkpoint {here} is missing; pass --weights PATH "
                                "or train one with `qcourse train`")
    return here


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qcourse", description="INT8 quantization for TensorRT, the course.")
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("course", help="run the whole course on the embedded default")
    p.add_argument("--out", default="runs/course", help="where results and executed notebooks go")
    p.add_argument("--notebooks", default=None, help="lesson notebook folder (default ./notebooks)")
    p.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_course)
    p = sub.add_parser("demo", help="the core demo only")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("train", help="train YOLOv7(-tiny) on a COCO-format dataset (default: the synthetic one)")
    p.add_argument("--data", default=None, help="dataset root (default: generate the synthetic default)")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--arch", default="yolov7-tiny", choices=["yolov7-tiny", "yolov7"])
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--init", default=None, help="start from this checkpoint's weights")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_train)
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint (default: the shipped model on the synthetic val split)")
    p.add_argument("--weights", default=None, help="yolov7.pt, yolov7-tiny.pt or a qcourse checkpoint")
    p.add_argument("--coco", default=None, help="COCO root with val2017/ and annotations/ (default: synthetic)")
    p.add_argument("--split", default=None, help="split name (default val2017 for COCO, val for synthetic)")
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's, else 640")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batches", type=int, default=None)
    p.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("info", help="versions and available engines")
    p.set_defaults(fn=_cmd_info)
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
