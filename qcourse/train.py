"""Lessons 5-7 — training YOLOv7 with the YOLO loss: the embedded default checkpoint.

:class:`YoloLoss` is the loss of the official YOLOv7 ``ComputeLoss`` (the YOLOv5-style
assignment): every target is matched to the anchors whose width/height ratio to it is
below ``anchor_t`` (4.0) at every level, and to its own grid cell plus the two nearest
neighbouring cells; box loss ``1 - CIoU`` (torchvision's ``complete_box_iou_loss``),
objectness BCE towards the detached IoU, class BCE; level weights (4.0, 1.0, 0.4) and gains
``box 0.05, obj 0.7 * (img/640)^2, cls 0.3 * nc/80`` as in the official hyper-parameters.

:func:`train` trains a model on a COCO-format dataset with AdamW, warm-up and a cosine
schedule, keeps an exponential moving average (EMA) of the weights, evaluates the EMA on the
validation split, and saves a checkpoint atomically after every epoch so an interrupted run
resumes where it stopped (``resume=True``).

The shipped default ``data/yolov7_tiny_shapes.pt`` was made with ``qcourse train`` — the
exact command is in ``data/README.md``.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss

__all__ = ["YoloLoss", "ModelEMA", "train"]


class YoloLoss:
    """The official YOLOv7 training loss for a ``Detect``/``IDetect`` head (training outputs).

    Args:
        model: the :class:`qcourse.models.Model` (its head gives anchors, strides, nc).
        img_size: training input size (scales the objectness gain like the official code).
        box, obj, cls: loss gains (official hyp.scratch defaults). anchor_t: anchor ratio limit.

    ``loss(preds, targets)`` with ``preds`` the head's training output (list of
    ``(B, na, ny, nx, 5 + nc)``) and ``targets`` rows ``(image_index, class, cx, cy, w, h)``
    normalised to [0, 1]. Returns ``(loss * batch_size, tensor([box, obj, cls, total]))``.
    """

    def __init__(self, model: nn.Module, img_size: int, box: float = 0.05, obj: float = 0.7,
                 cls: float = 0.3, anchor_t: float = 4.0):
        det = model.model[-1]
        self.na, self.nl, self.nc = det.na, det.nl, det.nc
        self.anchors = det.anchors.detach().clone()  # (nl, na, 2) in grid units
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        self.box = box * 3 / self.nl
        self.obj = obj * (img_size / 640) ** 2 * 3 / self.nl
        self.cls = cls * self.nc / 80 * 3 / self.nl
        self.anchor_t = anchor_t
        self.bce = nn.BCEWithLogitsLoss()

    def build_targets(self, preds, targets):
        na, nt = self.na, targets.shape[0]
        device = targets.device
        out = []
        gain = torch.ones(7, device=device)
        ai = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[:, :, None]), 2)  # (na, nt, 7)
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * g
        for i in range(self.nl):
            anchors = self.anchors[i].to(device)
            ny, nx = preds[i].shape[2:4]
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=device, dtype=torch.float32)
            t = t_all * gain
            if nt:
                r = t[:, :, 4:6] / anchors[:, None]
                keep = torch.max(r, 1.0 / r).max(2)[0] < self.anchor_t
                t = t[keep]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1.0 < g) & (gxy > 1.0)).T
                l, m = ((gxi % 1.0 < g) & (gxi > 1.0)).T
                sel = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[sel]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[sel]
            else:
                t = t_all[0]
                offsets = torch.zeros((0, 2), device=device)
            b, c = t[:, :2].long().T
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp(0, nx - 1)
            gj = gij[:, 1].clamp(0, ny - 1)
            a = t[:, 6].long()
            tbox = torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1)
            out.append((b, a, gj, gi, tbox, anchors[a], c))
        return out

    def __call__(self, preds, targets):
        device = preds[0].device
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for i, (pi, (b, a, gj, gi, tbox, anch, tcls)) in enumerate(zip(preds, self.build_targets(preds, targets))):
            tobj = torch.zeros_like(pi[..., 0])
            n = b.shape[0]
            if n:
                ps = pi[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch
                pbox = box_convert(torch.cat((pxy, pwh), 1), "cxcywh", "xyxy")
                tb = box_convert(tbox, "cxcywh", "xyxy")
                ciou_loss = complete_box_iou_loss(pbox, tb, reduction="none")
                lbox = lbox + ciou_loss.mean()
                iou = (1.0 - ciou_loss).detach().clamp(0)
                tobj[b, a, gj, gi] = iou.to(tobj.dtype)
                if self.nc > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(n, device=device), tcls] = 1.0
                    lcls = lcls + self.bce(ps[:, 5:], tc)
            lobj = lobj + self.bce(pi[..., 4], tobj) * self.balance[i]
        lbox, lobj, lcls = lbox * self.box, lobj * self.obj, lcls * self.cls
        bs = preds[0].shape[0]
        total = lbox + lobj + lcls
        return total * bs, torch.stack((lbox, lobj, lcls, total)).detach()


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


_ARCHS = ("yolov7-tiny", "yolov7")

#: The settings that shape the weights. ``last.pt`` records them, and a rerun into the same
#: ``out_dir`` resumes only with the same ones: a run that silently switched to a new batch
#: size or schedule half-way would match neither command. ``eval_every`` and ``max_minutes``
#: are left out on purpose: they decide when to look and when to stop, not what is learned.
RESUME_SETTINGS = ("data_root", "arch", "img_size", "epochs", "batch_size", "lr", "weight_decay",
                   "warmup_epochs", "seed", "init")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_args(*, arch, img_size, epochs, batch_size, lr, weight_decay, warmup_epochs, seed, eval_every,
                max_minutes, resume):
    """Refuse bad settings before any work, naming the argument (the notebook calls train() directly)."""
    checks = [  # (name, value, is it valid, what it must be)
        ("arch", arch, arch in _ARCHS, "'yolov7-tiny' or 'yolov7'"),
        ("img_size", img_size, _is_int(img_size) and img_size > 0 and img_size % 32 == 0,
         "a positive multiple of 32 (the model's largest stride), e.g. 160 or 640"),
        ("epochs", epochs, _is_int(epochs) and epochs >= 1, "an int >= 1"),
        ("batch_size", batch_size, _is_int(batch_size) and batch_size >= 1, "an int >= 1"),
        ("eval_every", eval_every, _is_int(eval_every) and eval_every >= 1, "an int >= 1 (evaluate every N epochs)"),
        ("seed", seed, _is_int(seed) and seed >= 0, "an int >= 0"),
        ("lr", lr, _is_number(lr) and lr > 0, "a finite number > 0, e.g. 2e-3"),
        ("weight_decay", weight_decay, _is_number(weight_decay) and weight_decay >= 0, "a finite number >= 0"),
        ("warmup_epochs", warmup_epochs, _is_number(warmup_epochs) and warmup_epochs >= 0, "a finite number >= 0"),
        ("max_minutes", max_minutes, max_minutes is None or (_is_number(max_minutes) and max_minutes > 0),
         "None or a number > 0"),
        ("resume", resume, resume is True or resume is False or resume == "force", "True, False or 'force'"),
    ]
    for name, value, ok, what in checks:
        if not ok:
            raise ValueError(f"{name} must be {what}, got {value!r}")


def _settings(data_root, arch, img_size, epochs, batch_size, lr, weight_decay, warmup_epochs, seed, init) -> Dict:
    """The run's :data:`RESUME_SETTINGS` as plain data (``last.pt`` loads with ``weights_only=True``)."""
    return {"data_root": str(Path(data_root).resolve()), "arch": arch, "img_size": int(img_size),
            "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
            "warmup_epochs": float(warmup_epochs), "seed": int(seed),
            "init": None if init is None else str(Path(init).resolve())}


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
    from qcourse.datasets import CocoDetection, create_dataloader

    train_ds = CocoDetection(data_root, "train", img_size, augment=True, seed=seed)
    # the loader drops the last incomplete batch: with fewer images than one batch, an epoch is empty
    if batch_size > len(train_ds):
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(train_ds)} images in "
                         f"{data_root}); pass a batch size of at most {len(train_ds)}, or more training images")
    val_ds = CocoDetection(data_root, "val", img_size)
    train_loader = create_dataloader(train_ds, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    return train_ds, train_loader, create_dataloader(val_ds, batch_size=32)


def _build_model(arch: str, train_ds, init, log) -> nn.Module:
    from qcourse import models

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


def _lr_schedule(lr: float, warmup_epochs: float, epochs: int, n_batches: int):
    """Learning rate at each step: linear warm-up, then a cosine down to 2 % of ``lr``."""
    total_steps = epochs * n_batches
    warmup_steps = max(1, int(warmup_epochs * n_batches))

    def lr_at(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))

    return lr_at


def _train_epoch(model, loss_fn, opt, ema, loader, lr_at, epoch: int, epochs: int, progress: bool, log) -> Dict:
    """One pass over ``loader``; returns the epoch's log row (time and mean losses)."""
    model.train()
    loader.sampler.set_epoch(epoch)
    n_batches = len(loader)
    t0 = time.perf_counter()
    sums = torch.zeros(4)
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=None, leave=False)
    for bi, (imgs, targets, *_ ) in enumerate(it):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(epoch * n_batches + bi)
        preds = model(imgs)
        loss, items = loss_fn(preds, targets)
        if not torch.isfinite(loss):
            log(f"epoch {epoch + 1} batch {bi}: non-finite loss {items.tolist()}, batch skipped")
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
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


def train(data_root, out_dir, *, arch: str = "yolov7-tiny", img_size: int = 160, epochs: int = 30,
          batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 5e-4, warmup_epochs: float = 1.0,
          seed: int = 0, resume: Union[bool, str] = True, eval_every: int = 5, max_minutes: Optional[float] = None,
          init: Optional[str] = None, progress: bool = True, log=print) -> Dict:
    """Train ``arch`` on the COCO-format dataset at ``data_root``; returns the final metrics.

    Writes ``out_dir/last.pt`` (full state and the run's settings, for resuming) after every
    epoch, ``out_dir/best.pt`` (qcourse checkpoint of the EMA weights with the best val mAP)
    and ``out_dir/log.jsonl``. ``max_minutes`` stops cleanly after the epoch that crosses it.
    ``init``: a checkpoint whose weights start the run (to continue training a shipped model
    with a new schedule).

    ``resume``: ``True`` continues the run in ``out_dir`` when it was made with the same
    :data:`RESUME_SETTINGS` and raises ``ValueError`` (naming what differs) when not;
    ``"force"`` continues it with the new settings; ``False`` starts afresh. Bad values
    (``epochs=0``, a batch larger than the training set, ...) raise ``ValueError``.
    """
    from qcourse import models
    from qcourse.evaluate import evaluate

    _check_args(arch=arch, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, eval_every=eval_every,
                max_minutes=max_minutes, resume=resume)
    out_dir, last = Path(out_dir), Path(out_dir) / "last.pt"
    settings = _settings(data_root, arch, img_size, epochs, batch_size, lr, weight_decay, warmup_epochs, seed, init)
    state = _resume_state(last, settings, resume, log)  # before the slow part: a refusal comes at once
    torch.manual_seed(seed)
    train_ds, train_loader, val_loader = _loaders(data_root, img_size, batch_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(arch, train_ds, init, log)
    loss_fn = YoloLoss(model, img_size)
    opt = _optimizer(model, lr, weight_decay)
    ema = ModelEMA(model)
    lr_at = _lr_schedule(lr, warmup_epochs, epochs, len(train_loader))

    start_epoch, best_map, history, metrics = 0, -1.0, [], {}
    if state is not None:
        start_epoch, best_map = _restore(state, model, ema, opt)
        log(f"resumed from {last} at epoch {start_epoch}")
    t_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        row = _train_epoch(model, loss_fn, opt, ema, train_loader, lr_at, epoch, epochs, progress, log)
        final = epoch + 1 == epochs
        out_of_time = max_minutes is not None and (time.perf_counter() - t_start) / 60 > max_minutes
        if (epoch + 1) % eval_every == 0 or final or out_of_time:
            metrics = evaluate(ema.ema, val_loader, progress=False)
            row.update(map=round(metrics["map"], 4), map50=round(metrics["map50"], 4))
            if metrics["map"] > best_map:
                best_map = metrics["map"]
                models.save_checkpoint(ema.ema, out_dir / "best.pt", half=True, img_size=img_size, epoch=epoch + 1,
                                       map=metrics["map"], map50=metrics["map50"], dataset=Path(data_root).name)
        history.append(row)
        _log_row(row, out_dir / "log.jsonl", log)
        _atomic_save({"model": model.state_dict(), "ema": ema.ema.state_dict(), "ema_updates": ema.updates,
                      "optimizer": opt.state_dict(), "epoch": epoch, "best_map": best_map,
                      "settings": settings}, last)
        if out_of_time and not final:
            log(f"stopping after epoch {epoch + 1}: time limit of {max_minutes} min reached")
            break
    return {"best_map": best_map, "history": history, **metrics}
