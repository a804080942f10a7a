"""Lessons 5-7 — training YOLOv7 with the YOLO loss: the embedded default checkpoint.

:func:`train` trains a model on a COCO-format dataset with AdamW, warm-up and a cosine
schedule, keeps an exponential moving average (EMA) of the weights, evaluates the EMA on the
validation split, and saves a checkpoint atomically after every epoch so an interrupted run
resumes where it stopped (``resume=True``). The loss is :class:`qcourse.yolo.loss.YoloLoss`.

The knobs that shape a run live in one frozen :class:`TrainConfig` (as nanoGPT keeps its
in one place): a run is ``train(data_root, out_dir, TrainConfig(epochs=45, ...))``. The
pieces a QAT loop (lesson 7) reuses are public: :func:`train_epoch`, :func:`lr_schedule`
and :class:`ModelEMA`.

The shipped default ``data/yolov7_tiny_shapes.pt`` was made with ``qcourse train`` — the
exact command is in ``data/README.md``.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from qcourse.yolo.loss import YoloLoss
from qcourse.utils import atomic_write, is_int

__all__ = ["TrainConfig", "RESUME_SETTINGS", "ModelEMA", "lr_schedule", "train_epoch", "train"]

_ARCHS = ("yolov7-tiny", "yolov7")

#: The settings that shape the weights. ``last.pt`` records them, and a rerun into the same
#: ``out_dir`` resumes only with the same ones: a run that silently switched to a new batch
#: size or schedule half-way would match neither command. ``eval_every`` and ``max_minutes``
#: are left out on purpose: they decide when to look and when to stop, not what is learned.
RESUME_SETTINGS = ("data_root", "arch", "img_size", "epochs", "batch_size", "lr", "weight_decay",
                   "warmup_epochs", "seed", "init")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run, checked when it is made (a bad one raises ``ValueError``).

    The defaults are those of ``qcourse train``. Frozen, so a run's settings cannot drift
    after they were checked; derive a variant with ``dataclasses.replace(config, epochs=45)``.
    """

    arch: str = "yolov7-tiny"  # model architecture: "yolov7-tiny" or "yolov7"
    img_size: int = 160  # square input size in pixels, a multiple of 32 (the largest stride)
    epochs: int = 30  # epochs of the schedule (the cosine reaches its floor at the last one)
    batch_size: int = 32  # images per optimizer step (the last incomplete batch is dropped)
    lr: float = 2e-3  # peak AdamW learning rate, reached at the end of the warm-up
    weight_decay: float = 5e-4  # AdamW weight decay (not applied to biases and norm parameters)
    warmup_epochs: float = 1.0  # epochs (may be fractional) of linear warm-up from ~0 to lr
    seed: int = 0  # seed of the initial weights, the shuffling and the augmentation
    eval_every: int = 5  # evaluate the EMA on val every N epochs (and after the last/stopping one)
    max_minutes: Optional[float] = None  # stop after the epoch that crosses this wall time; None: no limit
    init: Optional[str] = None  # checkpoint whose weights start the run; None: random weights

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad settings before any work, naming the field (the notebooks build configs directly)."""
        checks = [  # (name, is it valid, what it must be)
            ("arch", self.arch in _ARCHS, "'yolov7-tiny' or 'yolov7'"),
            ("img_size", is_int(self.img_size) and self.img_size > 0 and self.img_size % 32 == 0,
             "a positive multiple of 32 (the model's largest stride), e.g. 160 or 640"),
            ("epochs", is_int(self.epochs) and self.epochs >= 1, "an int >= 1"),
            ("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1"),
            ("eval_every", is_int(self.eval_every) and self.eval_every >= 1,
             "an int >= 1 (evaluate every N epochs)"),
            ("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            ("lr", _is_number(self.lr) and self.lr > 0, "a finite number > 0, e.g. 2e-3"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("warmup_epochs", _is_number(self.warmup_epochs) and self.warmup_epochs >= 0, "a finite number >= 0"),
            ("max_minutes", self.max_minutes is None or (_is_number(self.max_minutes) and self.max_minutes > 0),
             "None or a number > 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    def settings(self, data_root) -> Dict:
        """The run's :data:`RESUME_SETTINGS` as plain data, as recorded in ``last.pt``.

        Plain types only, so ``last.pt`` loads with ``weights_only=True``; paths are resolved
        so that the same run started from another folder still counts as the same run.
        """
        return {"data_root": str(Path(data_root).resolve()), "arch": self.arch, "img_size": int(self.img_size),
                "epochs": int(self.epochs), "batch_size": int(self.batch_size), "lr": float(self.lr),
                "weight_decay": float(self.weight_decay), "warmup_epochs": float(self.warmup_epochs),
                "seed": int(self.seed), "init": None if self.init is None else str(Path(self.init).resolve())}


class ModelEMA:
    """Exponential moving average of a model's weights (decay ramps up: ``d * (1 - e^(-n/tau))``)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def _atomic_save(obj, path: Path):
    # write aside, then rename: a run killed mid-save keeps the previous last.pt intact
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _check_resume(resume) -> None:
    if not (resume is True or resume is False or resume == "force"):
        raise ValueError(f"resume must be True, False or 'force', got {resume!r}")


def _resume_state(last: Path, settings: Dict, resume, log) -> Optional[Dict]:
    """The state saved in ``last`` to continue from, or ``None`` to start a new run.

    ``resume=True`` continues only a run made with the same :data:`RESUME_SETTINGS`;
    ``"force"`` continues whatever they were (the new ones apply from now on).
    """
    if resume is False:
        return None
    if not last.exists():
        if resume == "force":
            raise FileNotFoundError(f"nothing to resume: {last} does not exist; check --out (out_dir), "
                                    "or drop --resume (resume='force') to start a new run")
        return None
    state = torch.load(last, map_location="cpu", weights_only=True)
    old = state.get("settings")
    if old is None:
        changes = "its settings were not recorded (written by an older qcourse)"
    else:
        changes = ", ".join(f"{k} was {old.get(k)!r}, now {settings[k]!r}"
                            for k in RESUME_SETTINGS if old.get(k) != settings[k])
    if changes and resume is True:
        raise ValueError(
            f"{last.parent} holds a run with other settings: {changes}. Pass another --out (out_dir) "
            "to start a new run, or --resume (resume='force') to continue that one with the new settings")
    if old is not None and old.get("arch") != settings["arch"]:  # its weights cannot load into this model
        raise ValueError(f"{last} holds a {old.get('arch')} run, not {settings['arch']}; "
                         "pass another --out (out_dir) or the same --arch")
    if changes:
        log(f"continuing {last} with changed settings: {changes}")
    return state


def _loaders(data_root, img_size: int, batch_size: int, seed: int):
    """The augmented training set, its shuffled loader and the validation loader."""
    from qcourse.yolo.datasets import CocoDetection, create_dataloader

    train_ds = CocoDetection(data_root, "train", img_size, augment=True, seed=seed)
    # the loader drops the last incomplete batch: with fewer images than one batch, an epoch is empty
    if batch_size > len(train_ds):
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(train_ds)} images in "
                         f"{data_root}); pass a batch size of at most {len(train_ds)}, or more training images")
    val_ds = CocoDetection(data_root, "val", img_size)
    train_loader = create_dataloader(train_ds, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    return train_ds, train_loader, create_dataloader(val_ds, batch_size=32)


def _build_model(arch: str, train_ds, init, log) -> nn.Module:
    from qcourse.yolo import models

    build = {"yolov7-tiny": models.yolov7_tiny, "yolov7": models.yolov7}[arch]
    model = build(nc=train_ds.nc)
    model.names = list(train_ds.names)
    if init is not None:
        model.load_state_dict(models.load_checkpoint(init).state_dict())
        log(f"initialised from {init}")
    return model


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm parameters (as the official recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.937, 0.999))


def lr_schedule(lr: float, warmup_epochs: float, epochs: int, n_batches: int) -> Callable[[int], float]:
    """Learning rate at each step: linear warm-up, then a cosine down to 2 % of ``lr``.

    Returns ``lr_at(step)`` with ``step = epoch * n_batches + batch``, as :func:`train_epoch` uses it.
    """
    total_steps = epochs * n_batches
    warmup_steps = max(1, int(warmup_epochs * n_batches))

    def lr_at(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))

    return lr_at


def train_epoch(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, ema: Optional[ModelEMA], loader,
                lr_at: Callable[[int], float], epoch: int, epochs: int, progress: bool = False, log=print) -> Dict:
    """One pass over ``loader`` (one optimizer step per batch); returns the epoch's log row.

    The loop both :func:`train` and a QAT loop (lesson 7) run: the latter calls it with a
    model holding fake-quantizers and its own loss (e.g. YOLO loss plus distillation), since
    nothing here depends on the model or the loss beyond ``loss_fn(model(imgs), targets) ->
    (loss, items)`` with ``items`` four numbers (box, obj, cls, total) for the log.

    Args:
        lr_at: learning rate of a global step (see :func:`lr_schedule`); set on every group.
        ema: updated after every step (``None``: no EMA).
        epoch, epochs: the 0-based epoch (seeds the shuffle and augmentation) and the total (for the bar).

    A batch with a non-finite loss is logged and skipped rather than stepped: one NaN step
    would poison the weights and the EMA for the rest of the run.
    """
    model.train()
    if hasattr(loader.sampler, "set_epoch"):  # a different, reproducible shuffle each epoch
        loader.sampler.set_epoch(epoch)
    n_batches = len(loader)
    t0 = time.perf_counter()
    sums = torch.zeros(4)
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=None, leave=False)
    for bi, (imgs, targets, *_) in enumerate(it):
        for gr in optimizer.param_groups:
            gr["lr"] = lr_at(epoch * n_batches + bi)
        loss, items = loss_fn(model(imgs), targets)
        if not torch.isfinite(loss):
            log(f"epoch {epoch + 1} batch {bi}: non-finite loss {items.tolist()}, batch skipped")
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # the official recipe's guard against spikes
        optimizer.step()
        if ema is not None:
            ema.update(model)
        sums += items
    return {"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1),
            **{k: round(float(v) / n_batches, 5) for k, v in zip(("box", "obj", "cls", "loss"), sums)}}


def _restore(state: Dict, model, ema: ModelEMA, opt) -> tuple:
    """Load a ``last.pt`` state; returns ``(first epoch to run, best mAP so far)``."""
    model.load_state_dict(state["model"])
    ema.ema.load_state_dict(state["ema"])
    ema.updates = state["ema_updates"]
    opt.load_state_dict(state["optimizer"])
    return state["epoch"] + 1, state["best_map"]


def _log_row(row: Dict, path: Path, log):
    log(json.dumps(row))
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _setup(data_root, out_dir: Path, config: TrainConfig, log):
    """Data, model, loss, optimizer, EMA and schedule of a run.

    Kept in this order after seeding: the initial weights are drawn from the seeded random
    stream, so reordering these steps could change the run that a seed stands for.
    """
    torch.manual_seed(config.seed)
    train_ds, train_loader, val_loader = _loaders(data_root, config.img_size, config.batch_size, config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(config.arch, train_ds, config.init, log)
    loss_fn = YoloLoss(model, config.img_size)
    opt = _optimizer(model, config.lr, config.weight_decay)
    ema = ModelEMA(model)
    lr_at = lr_schedule(config.lr, config.warmup_epochs, config.epochs, len(train_loader))
    return model, loss_fn, opt, ema, train_loader, val_loader, lr_at


def _evaluate_and_keep_best(ema: ModelEMA, val_loader, row: Dict, best_map: float, epoch: int, out_dir: Path,
                            config: TrainConfig, data_root) -> tuple:
    """Score the EMA weights (what ships), add the mAP to ``row``; save ``best.pt`` on a new best.

    Returns ``(metrics, best mAP so far)``.
    """
    from qcourse.yolo import models
    from qcourse.yolo.evaluate import evaluate

    metrics = evaluate(ema.ema, val_loader, progress=False)
    row.update(map=round(metrics["map"], 4), map50=round(metrics["map50"], 4))
    if metrics["map"] > best_map:
        best_map = metrics["map"]
        models.save_checkpoint(ema.ema, out_dir / "best.pt", half=True, img_size=config.img_size, epoch=epoch + 1,
                               map=metrics["map"], map50=metrics["map50"], dataset=Path(data_root).name)
    return metrics, best_map


def _save_last(last: Path, model, ema: ModelEMA, opt, epoch: int, best_map: float, settings: Dict):
    """Everything needed to continue after ``epoch``, plus the settings that decide whether a rerun may."""
    _atomic_save({"model": model.state_dict(), "ema": ema.ema.state_dict(), "ema_updates": ema.updates,
                  "optimizer": opt.state_dict(), "epoch": epoch, "best_map": best_map,
                  "settings": settings}, last)


def train(data_root, out_dir, config: TrainConfig = TrainConfig(), *, resume: Union[bool, str] = True,
          progress: bool = True, log=print) -> Dict:
    """Train ``config.arch`` on the COCO-format dataset at ``data_root``; returns the final metrics.

    Writes ``out_dir/last.pt`` (full state and the run's :meth:`TrainConfig.settings`, for
    resuming) after every epoch, ``out_dir/best.pt`` (qcourse checkpoint of the EMA weights
    with the best val mAP) and ``out_dir/log.jsonl``. ``config.max_minutes`` stops cleanly
    after the epoch that crosses it.

    The keyword arguments are runtime switches that never change the weights: ``resume``
    (``True`` continues the run in ``out_dir`` when it was made with the same
    :data:`RESUME_SETTINGS` and raises ``ValueError`` naming what differs when not;
    ``"force"`` continues it with the new settings; ``False`` starts afresh), ``progress``
    (a tqdm bar per epoch) and ``log`` (where the progress lines go). A batch larger than
    the training set raises ``ValueError``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a qcourse.yolo.train.TrainConfig, got {type(config).__name__}")
    _check_resume(resume)
    out_dir, last = Path(out_dir), Path(out_dir) / "last.pt"
    settings = config.settings(data_root)
    state = _resume_state(last, settings, resume, log)  # before the slow part: a refusal comes at once
    model, loss_fn, opt, ema, train_loader, val_loader, lr_at = _setup(data_root, out_dir, config, log)
    start_epoch, best_map, history, metrics = 0, -1.0, [], {}
    if state is not None:
        start_epoch, best_map = _restore(state, model, ema, opt)
        log(f"resumed from {last} at epoch {start_epoch}")
    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        row = train_epoch(model, loss_fn, opt, ema, train_loader, lr_at, epoch, config.epochs, progress, log)
        final = epoch + 1 == config.epochs
        out_of_time = config.max_minutes is not None and (time.perf_counter() - t_start) / 60 > config.max_minutes
        if (epoch + 1) % config.eval_every == 0 or final or out_of_time:  # out of time: score what we keep
            metrics, best_map = _evaluate_and_keep_best(ema, val_loader, row, best_map, epoch, out_dir, config,
                                                        data_root)
        history.append(row)
        _log_row(row, out_dir / "log.jsonl", log)
        _save_last(last, model, ema, opt, epoch, best_map, settings)
        if out_of_time and not final:
            log(f"stopping after epoch {epoch + 1}: time limit of {config.max_minutes} min reached")
            break
    return {"best_map": best_map, "history": history, **metrics}
