"""Lesson 7's application — YOLOv7 quantization-aware training, as ``qcourse qat`` and the notebook run it.

The model-agnostic parts (the distillation loss, the schedule, the loop, checkpoints, DDP)
live in :mod:`qcourse.qat`; this module adds what is YOLOv7's:

* :func:`calibrated_model` — lesson 5's starting point: the fused model quantized by
  :func:`qcourse.yolo.ptq.quantize` (placement ties kept, the head in float) with ``w_bits``
  / ``a_bits`` for the stress settings, calibrated on training images — or a calibrated
  checkpoint of ``qcourse ptq`` / ``qcourse qat``;
* :func:`distillation_loss` — NVIDIA's label-free loss over the ``model.N`` blocks, the
  ``Detect`` head left out; :func:`detection_loss` — the YOLO loss on the labels;
* :func:`run_qat` — FP32 and PTQ evaluated, QAT run with an evaluation every epoch, the best
  model saved and exported to ONNX, ``OUT/results.json`` with the FP32 / PTQ / QAT table.

Every setting is checked before any work (the files of ``--out``, a resume, the batch size
against the data and the memory, the calibration batches), and a folder never holds two runs'
files: a run that does not resume deletes the earlier run's (:data:`OUTPUT_FILES`, qcourse's
only) before it starts.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from qcourse import ptq, qat
from qcourse.export import export_onnx
from qcourse.tensor_quant import QuantDescriptor
from qcourse.utils import atomic_write, check_memory, check_writable, is_int, remove_owned

from . import ptq as yptq
from .models import Detect

__all__ = ["YoloQATConfig", "LOSSES", "STRESS", "OUTPUT_FILES", "calibrated_model", "distillation_loss",
           "detection_loss", "run_qat", "recovered"]

LOSSES = ("distill", "detection")

#: what :func:`run_qat` writes into ``--out``, in the order a new run deletes the earlier run's:
#: results.json first, so that it never describes files that are about to change
OUTPUT_FILES = ("results.json", "qat.onnx", *qat.RUN_FILES)

#: lesson 7's stress setting on the embedded default: bit widths where PTQ loses > 5 mAP points,
#: with the QAT budget that wins most of it back (``qcourse course`` and the notebook use it)
STRESS = {"w_bits": 3, "a_bits": 8, "loss": "detection", "epochs": 4, "iters_per_epoch": 40, "lr": 1e-4}


@dataclass(frozen=True)
class YoloQATConfig:
    """One ``qcourse qat`` run. ``epochs``/``iters_per_epoch``/``lr`` follow NVIDIA's recipe
    (10 x 200 at a 1e-5 peak on COCO), shrunk for the 160-px default, which learns in minutes."""

    weights: Optional[Path] = None  # FP32 checkpoint (None: the embedded default)
    calibrated: Optional[Path] = None  # calibrated checkpoint to start from (None: calibrate here)
    coco: Optional[Path] = None  # COCO root (None: the synthetic dataset)
    img_size: Optional[int] = None  # None: the checkpoint's, else 640
    epochs: int = 3
    iters_per_epoch: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    loss: str = "distill"
    supervision_stride: int = 1
    w_bits: int = 8
    a_bits: int = 8
    learn_amax: bool = False
    calib_batches: int = 4
    method: str = "mse"  # how the input quantizers' amax comes from the histograms
    eval_batches: Optional[int] = None  # None: the whole val split
    device: str = "cpu"
    out: Path = Path("runs/qat")
    resume: bool = False
    seed: int = 0
    progress: bool = False
    log: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.method not in ptq.METHODS:
            raise ValueError(f"method must be one of {', '.join(ptq.METHODS)}, got {self.method!r}")
        for name, low in (("w_bits", 2), ("a_bits", 2)):
            v = getattr(self, name)
            if not is_int(v) or not low <= v <= 8:
                raise ValueError(f"{name} must be a whole number from 2 to 8, got {v!r}")
        for name in ("batch_size", "calib_batches", "supervision_stride"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        self.qat_config()  # epochs, iters_per_epoch, lr, seed: checked by qcourse.qat

    def qat_config(self) -> qat.QATConfig:
        shaping = ("weights", "calibrated", "coco", "img_size", "batch_size", "loss", "supervision_stride", "w_bits",
                   "a_bits", "calib_batches", "method")
        fingerprint = json.dumps({k: str(getattr(self, k)) for k in shaping}, sort_keys=True)
        return qat.QATConfig(epochs=self.epochs, iters_per_epoch=self.iters_per_epoch, lr=self.lr,
                             learn_amax=self.learn_amax, seed=self.seed, fingerprint=fingerprint)


def _rank0() -> bool:
    # read from the environment: the process group only exists inside qcourse.qat.train
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------- the model and the losses
def calibrated_model(model, calib_loader, config: YoloQATConfig):
    """The PTQ starting point: ``config.calibrated`` loaded, or ``model`` quantized and calibrated."""
    if config.calibrated is not None:
        qmodel = yptq.load_quantized(config.calibrated)
        bits = (qmodel.ptq_info["weight_desc"]["num_bits"], qmodel.ptq_info["input_desc"]["num_bits"])
        if bits != (config.w_bits, config.a_bits):
            raise ValueError(f"{config.calibrated} holds W{bits[0]}A{bits[1]} quantizers, not the "
                             f"W{config.w_bits}A{config.a_bits} asked for; pass --w-bits {bits[0]} --a-bits "
                             f"{bits[1]}, or drop --calibrated to calibrate here")
        return qmodel.to(config.device)
    qmodel, _ = yptq.quantize(model, input_desc=QuantDescriptor(num_bits=config.a_bits, calib_method="histogram"),
                              weight_desc=QuantDescriptor(num_bits=config.w_bits, axis=0))
    qmodel.to(config.device)
    ptq.calibrate(qmodel, calib_loader, config.calib_batches, device=config.device, progress=config.progress)
    ptq.load_amax(qmodel, config.method)
    return qmodel


def distillation_loss(teacher, student, stride: int = 1, device="cpu") -> qat.DistillationLoss:
    """MSE between the quantized and FP32 outputs of the ``model.N`` blocks, the Detect head left out."""
    blocks = qat.select_blocks(student, r"model\.\d+", lambda name, m: not isinstance(m, Detect), stride)
    return qat.DistillationLoss(teacher.to(device), blocks, input_fn=lambda batch: batch[0].to(device))


def detection_loss(student, img_size: int, device="cpu") -> Callable:
    """The YOLO loss on the labels (box, objectness, class), as training uses it."""
    from .loss import YoloLoss

    yolo = YoloLoss(student, img_size)

    def loss(model, batch):
        return yolo(model(batch[0].to(device)), batch[1].to(device))[0]

    return loss


def recovered(fp32: float, ptq_map: float, qat_map: float) -> Optional[float]:
    """The fraction of the PTQ loss that QAT won back (None when PTQ lost nothing)."""
    lost = fp32 - ptq_map
    return None if lost <= 0 else (qat_map - ptq_map) / lost


# ----------------------------------------------------------------------------- the run
def _loaders(config: YoloQATConfig, img_size: int):
    from .datasets import create_dataloader, dataset_splits

    root, train, val = dataset_splits(config.coco, config.progress)
    # calibration as lesson 5: the first N training batches in file order; QAT: the same images,
    # shuffled by qcourse.qat from the seed, without augmentation (a short fine-tune, not training)
    calib = create_dataloader(root, train, img_size=img_size, batch_size=config.batch_size, shuffle=False)
    fit = create_dataloader(root, train, img_size=img_size, batch_size=config.batch_size, shuffle=True)
    return root, calib, fit, create_dataloader(root, val, img_size=img_size, batch_size=32)


def _evaluator(val_loader, config: YoloQATConfig) -> Callable:
    """``evaluate(model) -> {"score": mAP@0.5:0.95, "map", "map50"}`` on the val split."""
    from .evaluate import evaluate

    def score(model) -> dict:
        r = evaluate(model, val_loader, device=config.device, progress=config.progress,
                     max_batches=config.eval_batches)
        return {"score": r["map"], "map": round(r["map"], 4), "map50": round(r["map50"], 4)}

    return score


def _save(meta: dict) -> Callable:
    def save(model, path):  # the calibrated-checkpoint format of lesson 5: `--calibrated` reloads it
        yptq.save_quantized(model, path, **meta)
    return save


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _table(fp32: dict, ptq_row: dict, qat_row: dict, label: str) -> list:
    return [{"model": "fp32", **fp32}, {"model": f"ptq {label}", **ptq_row}, {"model": f"qat {label}", **qat_row}]


def _check_data(config: YoloQATConfig, calib, fit) -> None:
    """The batch size against the training data and the memory, and the calibration batches."""
    qat.check_batches(fit)  # fewer images than one batch, or a batch that does not split over the processes
    world = qat.launched_world_size()
    n, s = config.batch_size // world, fit.dataset.img_size
    check_memory(n * 3 * s * s * 4, f"a training batch of {n} images of {s}x{s} pixels (float32) per process",
                 "pass a smaller --batch-size or --img-size")
    if config.calibrated is None and len(calib) < config.calib_batches:
        raise ValueError(f"--calib-batches {config.calib_batches} asks for more batches than the {len(calib)} of "
                         f"{config.batch_size} training images there are; pass --calib-batches {len(calib)} or less")


def _start(config: YoloQATConfig):
    """The models and the data, loaded and checked (a ``--calibrated`` model too); nothing calibrated yet.

    Returns ``(FP32 model, calibrated model or None (calibrate it), img_size, root, calib, fit, val)``.
    """
    float_model = yptq.load_float_model(config.weights).to(config.device)
    img_size = config.img_size or int(float_model.meta.get("img_size", 640))
    root, calib, fit, val = _loaders(config, img_size)
    _check_data(config, calib, fit)
    student = calibrated_model(float_model, calib, config) if config.calibrated is not None else None
    return float_model, student, img_size, root, calib, fit, val


def _clear(out: Path, resuming: bool) -> None:
    """Delete the earlier run's files (qcourse's, unchanged): all of them, or, when resuming it, what
    describes or derives from the weights that are about to change."""
    for name in OUTPUT_FILES:
        if resuming and name in qat.RUN_FILES:
            continue
        remove_owned(out / name)


def _baselines(config: YoloQATConfig, float_model, student, calib, val):
    """Calibrate (unless given a calibrated model), and (rank 0) evaluate FP32 and PTQ: the first two rows."""
    if student is None:
        student = calibrated_model(float_model, calib, config)
    student.requires_grad_(True)
    score, keep = _evaluator(val, config), ("map", "map50")
    fp32 = ptq_row = None
    if _rank0():
        fp32 = {k: v for k, v in score(float_model).items() if k in keep}
        ptq_row = {k: v for k, v in score(student).items() if k in keep}
        config.log(f"FP32 mAP {fp32['map']:.4f}; PTQ W{config.w_bits}A{config.a_bits} mAP {ptq_row['map']:.4f}")
    return student, fp32, ptq_row


def _export(out: Path, img_size: int, config: YoloQATConfig) -> Optional[str]:
    """The best model as INT8 Q/DQ ONNX; None for other bit widths (ONNX Q/DQ and TensorRT are 8-bit)."""
    if (config.w_bits, config.a_bits) != (8, 8):
        config.log(f"no ONNX for W{config.w_bits}A{config.a_bits}: Q/DQ (opset 13) and TensorRT's INT8 are 8-bit; "
                   "the stress settings are for study, a deployable model is W8A8")
        return None
    best = yptq.load_quantized(out / "best.pt", map_location=config.device)
    export_onnx(best, torch.zeros(1, 3, img_size, img_size, device=config.device), out / "qat.onnx")
    return "qat.onnx"


def run_qat(config: YoloQATConfig) -> Optional[dict]:
    """FP32, PTQ and QAT of one model; writes ``best.pt``, ``last.pt``, ``qat.onnx`` (W8A8 only) and ``results.json``.

    Before any work: a file of those names in ``config.out`` that qcourse did not write is
    refused, so is a resume of a damaged or different run, a batch size the data or the
    memory cannot hold, and a device the processes cannot share; then a run that does not
    resume deletes the earlier run's files (results.json first). Under ``torchrun`` every
    process calibrates the same way (deterministic) on its own device and trains on its
    shard; rank 0 evaluates, writes the files and returns the results (the others: None).
    """
    t0 = time.perf_counter()
    requested = config
    out = Path(config.out)
    device = qat.rank_device(config.device)  # cuda: this process's own GPU
    qat.bind_device(device)
    config = replace(config, device=str(device))
    # a damaged last.pt is said to be damaged (it is no longer qcourse's file either)
    resuming = config.resume and qat.resume_state(out, config.qat_config()) is not None
    if _rank0():  # rank 0 alone owns the folder: the others only read a checkpoint to resume
        check_writable(*(out / name for name in OUTPUT_FILES))
        out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be a folder fails here
    float_model, student, img_size, root, calib, fit, val = _start(config)
    if _rank0():
        _clear(out, resuming)
    student, fp32, ptq_row = _baselines(config, float_model, student, calib, val)
    if config.loss == "distill":
        loss_fn = distillation_loss(float_model, student, config.supervision_stride, config.device)
    else:
        loss_fn = detection_loss(student, img_size, config.device)
    res = qat.train(student, loss_fn, fit, config.qat_config(), evaluate=_evaluator(val, config),
                    out_dir=out, resume=resuming, device=config.device, log=config.log,
                    save_model=_save({"img_size": img_size, "w_bits": config.w_bits, "a_bits": config.a_bits}))
    if not _rank0():
        return None
    onnx = _export(out, img_size, config)
    qat_row = {k: v for k, v in res["history"][res["best_epoch"] - 1].items() if k in ("map", "map50")}
    label = f"W{config.w_bits}A{config.a_bits}"
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(requested).items() if k != "log"},
        "data": str(root), "img_size": img_size, "history": res["history"], "best_epoch": res["best_epoch"],
        "world_size": res["world_size"], "weights_sha256": res["weights_sha256"],
        "table": _table(fp32, ptq_row, qat_row, label),
        "recovered": recovered(fp32["map"], ptq_row["map"], qat_row["map"]),
        "onnx": onnx, "placement_problems": len(ptq.check_qdq_placement(out / onnx)) if onnx else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    _write_json(out / "results.json", results)
    return results
