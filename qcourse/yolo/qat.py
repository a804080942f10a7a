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
  model saved and exported to ONNX, ``OUT/results.json`` with the FP32 / PTQ / QAT table: each
  mAP with its 95 % bootstrap interval over the val images, QAT minus PTQ and FP32 minus QAT
  with their paired intervals, and the share of PTQ's loss QAT won back with its interval
  (:mod:`qcourse.yolo.intervals`, from the three models' per-image match tables, kept as
  :data:`TABLES`).

Every setting is checked before any work (the files of ``--out``, a resume, the batch size
against the data and the memory, the calibration batches), and a folder never holds two runs'
files: a run that does not resume deletes the earlier run's (:data:`OUTPUT_FILES`, qcourse's
only) before it starts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from qcourse import ptq, qat
from qcourse.export import export_onnx
from qcourse.tensor_quant import QuantDescriptor
from qcourse.utils import atomic_write, check_memory, check_writable, is_int, is_owned, remove_owned

from . import ptq as yptq
from .intervals import Resampled, load_table, save_table, score
from .models import Detect

__all__ = ["YoloQATConfig", "LOSSES", "STRESS", "TABLES", "BOOTSTRAP", "OUTPUT_FILES", "calibrated_model",
           "distillation_loss", "detection_loss", "run_qat", "recovered", "comparisons"]

LOSSES = ("distill", "detection")

#: the per-image match tables :func:`run_qat` keeps in ``--out`` (:func:`qcourse.yolo.intervals.save_table`):
#: the FP32 model's, the PTQ starting point's and the reported QAT model's (the best epoch's)
TABLES = {"fp32": "fp32.npz", "ptq": "ptq.npz", "qat": "qat.npz"}
#: what :func:`run_qat` writes into ``--out``, in the order a new run deletes the earlier run's:
#: results.json first, so that it never describes files that are about to change
OUTPUT_FILES = ("results.json", "qat.onnx", *TABLES.values(), *qat.RUN_FILES)
#: what a resumed run keeps of the interrupted one: the checkpoints and the best epoch's table
_KEPT_ON_RESUME = (*qat.RUN_FILES, TABLES["qat"])
#: the bootstrap behind every interval (as ``qcourse course``'s): 1000 resamples of the evaluated
#: images drawn from a fixed seed, 95 % percentile intervals
BOOTSTRAP = {"n": 1000, "seed": 0, "level": 0.95}

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


def _evaluate(model, val_loader, config: YoloQATConfig) -> dict:
    """:func:`~qcourse.yolo.evaluate.evaluate` on the val split (its first ``eval_batches``), with the match table."""
    from .evaluate import evaluate

    return evaluate(model, val_loader, device=config.device, progress=config.progress,
                    max_batches=config.eval_batches, matches=True)


def _evaluator(val_loader, config: YoloQATConfig, keep: Optional[Path] = None,
               best: Optional[float] = None) -> Callable:
    """``evaluate(model) -> {"score": mAP@0.5:0.95, "map", "map50"}`` on the val split.

    With ``keep`` (a path), the match table of each evaluation that beats ``best`` (the best
    score so far; None: none yet) is saved there: called once per epoch by
    :func:`qcourse.qat.train`, which keeps ``best.pt`` by the same rule (a strictly higher
    score), it leaves the best epoch's table beside ``best.pt``.
    """
    state = {"best": best}

    def evaluate_epoch(model) -> dict:
        r = _evaluate(model, val_loader, config)
        if keep is not None and (state["best"] is None or r["map"] > state["best"]):
            save_table(keep, r["matches"])
            state["best"] = r["map"]
        return {"score": r["map"], "map": round(r["map"], 4), "map50": round(r["map50"], 4)}

    return evaluate_epoch


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
    describes or derives from the weights that are about to change (the checkpoints and the best
    epoch's match table stay: the resumed run goes on from them)."""
    for name in OUTPUT_FILES:
        if resuming and name in _KEPT_ON_RESUME:
            continue
        remove_owned(out / name)


def _baselines(config: YoloQATConfig, float_model, student, calib, val, out: Optional[Path] = None):
    """Calibrate (unless given a calibrated model), and (rank 0) evaluate FP32 and PTQ: the first two rows.

    Their match tables are saved in ``out`` as :data:`TABLES` ``"fp32"`` and ``"ptq"`` (none without ``out``).
    """
    if student is None:
        student = calibrated_model(float_model, calib, config)
    student.requires_grad_(True)
    rows = {}
    if _rank0():
        for name, model in (("fp32", float_model), ("ptq", student)):
            r = _evaluate(model, val, config)
            rows[name] = {"map": round(r["map"], 4), "map50": round(r["map50"], 4)}
            if out is not None:
                save_table(out / TABLES[name], r["matches"])
        config.log(f"FP32 mAP {rows['fp32']['map']:.4f}; PTQ W{config.w_bits}A{config.a_bits} mAP "
                   f"{rows['ptq']['map']:.4f}")
    return student, rows.get("fp32"), rows.get("ptq")


def _best_table(out: Path, res: dict, val, config: YoloQATConfig):
    """The match table of the reported QAT model (the best epoch's), as the per-epoch evaluation kept it.

    Where it is missing or is not the best epoch's (a resumed run whose best epoch came before
    the interruption, written by a qcourse that kept no tables), ``best.pt`` is evaluated again.
    """
    path = out / TABLES["qat"]
    if is_owned(path):
        table = load_table(path)
        if math.isclose(score(table)["map"], res["best_score"], rel_tol=0.0, abs_tol=1e-12):
            return table
    config.log("evaluating best.pt again for its match table")
    table = _evaluate(yptq.load_quantized(out / "best.pt", map_location=config.device), val, config)["matches"]
    save_table(path, table)
    return table


_RESAMPLED: "OrderedDict[tuple, Resampled]" = OrderedDict()  # the last few tables' scores, by content


def _resampled(table, n: int, seed: int) -> Resampled:
    """``Resampled(table, n, seed)``, reused for a table with the same content (``qcourse course``'s two
    runs share the FP32 model's): its bootstrap scores are the costly part, seconds for 250 images."""
    digest = hashlib.sha256()
    for a in (table.image_ids, table.gt, *table.det_image, *table.tp, *table.fp):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}{a.shape};".encode())
        digest.update(a.tobytes())
    key = (digest.hexdigest(), n, seed)
    if key not in _RESAMPLED:
        _RESAMPLED[key] = Resampled(table, n=n, seed=seed)
        while len(_RESAMPLED) > 4:
            _RESAMPLED.popitem(last=False)
    _RESAMPLED.move_to_end(key)
    return _RESAMPLED[key]


def comparisons(fp32, ptq_table, qat_table, bootstrap: Optional[dict] = None) -> dict:
    """The intervals of a QAT run from the three models' match tables (same images), as ``results.json`` has them.

    Returns ``{"intervals": {"fp32", "ptq", "qat"}`` (each mAP@0.5:0.95's bootstrap interval over
    the images), ``"fp32_minus_ptq"``, ``"qat_minus_ptq"``, ``"fp32_minus_qat"``, ``"vs_fp32":
    {"ptq", "qat"}`` (each model minus FP32, as the course report reads a row; all ``{"diff",
    "interval"}``, paired: the same draws), ``"recovered_share"`` (``{"share", "interval"}``: the
    share of PTQ's loss QAT won back, :meth:`~qcourse.yolo.intervals.Resampled.recovered`; None
    when PTQ's loss is not significantly above 0, there being nothing measurable to win back) and
    ``"recovered_share_reason"`` (why it is None; None otherwise)}. ``bootstrap``:
    ``{"n", "seed", "level"}`` (:data:`BOOTSTRAP`).
    """
    b = {**BOOTSTRAP, **(bootstrap or {})}
    s = {name: _resampled(t, b["n"], b["seed"]) for name, t in (("fp32", fp32), ("ptq", ptq_table), ("qat", qat_table))}

    def paired(a, c) -> dict:
        d = s[a].minus(s[c], b["level"])
        return {"diff": d["diff"], "interval": d["interval"]}

    res = {"intervals": {name: r.bootstrap(b["level"])["interval"] for name, r in s.items()},
           "fp32_minus_ptq": paired("fp32", "ptq"), "qat_minus_ptq": paired("qat", "ptq"),
           "fp32_minus_qat": paired("fp32", "qat"), "vs_fp32": {m: paired(m, "fp32") for m in ("ptq", "qat")},
           "recovered_share": None, "recovered_share_reason": None}
    lost = res["fp32_minus_ptq"]
    lo, hi = lost["interval"]
    if lo > 0.0:
        rec = s["qat"].recovered(s["ptq"], s["fp32"], b["level"])
        res["recovered_share"] = {"share": rec["share"], "interval": rec["interval"]}
    else:
        res["recovered_share_reason"] = (
            f"PTQ's loss to FP32 ({lost['diff']:+.4f} mAP, 95 % interval [{lo:+.4f}, {hi:+.4f}]) is "
            + ("within noise" if hi >= 0.0 else "negative: PTQ scores above FP32")
            + ", so no share of it can be measured")
    return res


def _export(out: Path, img_size: int, config: YoloQATConfig) -> Optional[str]:
    """The best model as INT8 Q/DQ ONNX; None for other bit widths (ONNX Q/DQ and TensorRT are 8-bit)."""
    if (config.w_bits, config.a_bits) != (8, 8):
        config.log(f"no ONNX for W{config.w_bits}A{config.a_bits}: Q/DQ (opset 13) and TensorRT's INT8 are 8-bit; "
                   "the stress settings are for study, a deployable model is W8A8")
        return None
    best = yptq.load_quantized(out / "best.pt", map_location=config.device)
    export_onnx(best, torch.zeros(1, 3, img_size, img_size, device=config.device), out / "qat.onnx")
    return "qat.onnx"


def _bracket(d: dict, fmt: str = "+.4f") -> str:
    lo, hi = d["interval"]
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def run_qat(config: YoloQATConfig) -> Optional[dict]:
    """FP32, PTQ and QAT of one model; writes ``best.pt``, ``last.pt``, ``qat.onnx`` (W8A8 only), the match
    tables :data:`TABLES` and ``results.json`` (see :func:`comparisons` for its intervals).

    Before any work: a file of those names in ``config.out`` that qcourse did not write is
    refused, so is a resume of a damaged or different run, a batch size the data or the
    memory cannot hold, and a device the processes cannot share; then a run that does not
    resume deletes the earlier run's files (results.json first). Under ``torchrun`` every
    process calibrates the same way (deterministic) on its own device and trains on its
    shard; rank 0 evaluates, writes the files and returns the results (the others: None).
    A resumed run keeps the interrupted one's ``best.pt``, ``last.pt`` and best-epoch table
    and ends with the results the uninterrupted run would have written.
    """
    t0 = time.perf_counter()
    requested = config
    out = Path(config.out)
    device = qat.rank_device(config.device)  # cuda: this process's own GPU
    qat.bind_device(device)
    config = replace(config, device=str(device))
    # a damaged last.pt is said to be damaged (it is no longer qcourse's file either)
    state = qat.resume_state(out, config.qat_config()) if config.resume else None
    resuming = state is not None
    if _rank0():  # rank 0 alone owns the folder: the others only read a checkpoint to resume
        check_writable(*(out / name for name in OUTPUT_FILES))
        out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be a folder fails here
    float_model, student, img_size, root, calib, fit, val = _start(config)
    if _rank0():
        _clear(out, resuming)
    student, fp32, ptq_row = _baselines(config, float_model, student, calib, val, out if _rank0() else None)
    if config.loss == "distill":
        loss_fn = distillation_loss(float_model, student, config.supervision_stride, config.device)
    else:
        loss_fn = detection_loss(student, img_size, config.device)
    evaluate = _evaluator(val, config, keep=out / TABLES["qat"] if _rank0() else None,
                          best=state.get("best_score") if resuming else None)
    res = qat.train(student, loss_fn, fit, config.qat_config(), evaluate=evaluate,
                    out_dir=out, resume=resuming, device=config.device, log=config.log,
                    save_model=_save({"img_size": img_size, "w_bits": config.w_bits, "a_bits": config.a_bits}))
    if not _rank0():
        return None
    onnx = _export(out, img_size, config)
    qat_row = {k: v for k, v in res["history"][res["best_epoch"] - 1].items() if k in ("map", "map50")}
    found = comparisons(load_table(out / TABLES["fp32"]), load_table(out / TABLES["ptq"]),
                        _best_table(out, res, val, config))
    for name, row in (("fp32", fp32), ("ptq", ptq_row), ("qat", qat_row)):
        row["interval"] = found["intervals"][name]
        if name != "fp32":
            row["vs_fp32"] = found["vs_fp32"][name]
    label = f"W{config.w_bits}A{config.a_bits}"
    share = found["recovered_share"]
    config.log(f"QAT minus PTQ {found['qat_minus_ptq']['diff']:+.4f} {_bracket(found['qat_minus_ptq'])}, FP32 minus "
               f"QAT {found['fp32_minus_qat']['diff']:+.4f} {_bracket(found['fp32_minus_qat'])}; "
               + (f"share of PTQ's loss won back {share['share']:.2f} {_bracket(share, '.2f')}" if share else
                  found["recovered_share_reason"]))
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(requested).items() if k != "log"},
        "data": str(root), "img_size": img_size, "history": res["history"], "best_epoch": res["best_epoch"],
        "world_size": res["world_size"], "weights_sha256": res["weights_sha256"],
        "table": _table(fp32, ptq_row, qat_row, label),
        "recovered": recovered(fp32["map"], ptq_row["map"], qat_row["map"]),
        "matches": dict(TABLES), "bootstrap": dict(BOOTSTRAP),
        **{k: found[k] for k in ("fp32_minus_ptq", "qat_minus_ptq", "fp32_minus_qat", "recovered_share",
                                 "recovered_share_reason")},
        "onnx": onnx, "placement_problems": len(ptq.check_qdq_placement(out / onnx)) if onnx else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    _write_json(out / "results.json", results)
    return results
