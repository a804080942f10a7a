"""Lesson 7 — quantization-aware training (QAT), model-agnostic.

QAT fine-tunes a calibrated model with fake quantization in the forward pass. Rounding has
no useful derivative, so the backward pass uses the straight-through estimator (STE) of
:mod:`qcourse.tensor_quant`: the gradient passes where ``|x| <= amax`` and is zero where x was
clipped. The weights therefore keep their float copies and move by small steps; a weight
that sits near a rounding boundary flips to the neighbouring code when the loss asks for
it, which is what PTQ cannot do.

What this module holds (lesson 7 applies it to YOLOv7 in :mod:`qcourse.yolo.qat`):

* :class:`QATConfig` — the recipe of NVIDIA's yolov7_qat: Adam, a fixed number of
  iterations per epoch, a learning rate that is low, then high, then low again *by epoch*
  (1e-6 for epochs 0-2, 1e-5 for 3-7, 1e-6 for 8-9 of 10), rescaled to any number of epochs
  and any peak (:func:`lr_at_epoch`).
* :class:`DistillationLoss` — NVIDIA's label-free loss: the sum over supervised blocks of
  the MSE between the quantized block's output and the FP32 model's, both collected with
  forward hooks; :func:`select_blocks` picks the blocks (a regex, a filter to leave out e.g.
  a detection head, a supervision stride).
* :func:`enable_learn_amax` — per-tensor ranges become parameters trained with the PACT
  gradient (:func:`~qcourse.tensor_quant.learnable_fake_tensor_quant`); the plain
  functions give amax no gradient (lesson 2), so without it amax stays as calibrated.
* :func:`train` — the loop: any ``loss_fn(model, batch) -> loss``, an ``evaluate(model) ->
  float`` after every epoch with the best kept, atomic checkpoints (model, optimizer, RNG,
  data position) from which ``resume=True`` ends with the same weights as an uninterrupted
  run, and DistributedDataParallel when launched by ``torchrun`` (gloo on CPU, NCCL on GPU,
  a DistributedSampler shard per rank, only rank 0 writing files).
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from qcourse import workflow
from qcourse.utils import atomic_write, is_int

__all__ = [
    "QATConfig", "NVIDIA_SCHEDULE", "lr_at_epoch", "select_blocks", "DistillationLoss", "enable_learn_amax",
    "learned_amax", "train", "CHECKPOINT_FORMAT", "load_state", "is_main_process",
]

#: NVIDIA's yolov7_qat schedule as (fraction of the epochs where a phase starts, fraction of the
#: peak lr): ``{0: 1e-6, 3: 1e-5, 8: 1e-6}`` over 10 epochs with a 1e-5 peak.
NVIDIA_SCHEDULE = ((0.0, 0.1), (0.3, 1.0), (0.8, 0.1))
CHECKPOINT_FORMAT = "qcourse.qat"


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class QATConfig:
    """The knobs of a QAT run (defaults: NVIDIA's YOLOv7 recipe); a bad value raises ``ValueError``."""

    epochs: int = 10  # epochs; each runs exactly iters_per_epoch optimizer steps
    iters_per_epoch: int = 200  # steps per epoch (the loader is cycled if it is shorter)
    lr: float = 1e-5  # peak learning rate of the schedule
    schedule: tuple = NVIDIA_SCHEDULE  # ((start fraction, lr fraction), ...), see lr_at_epoch
    learn_amax: bool = False  # train the per-tensor ranges too (PACT gradient)
    seed: int = 0  # seeds the data order and torch's RNG
    checkpoint_every: Optional[int] = None  # also write last.pt every N steps inside an epoch
    shuffle: Optional[bool] = None  # None: shuffle when the given loader does
    fingerprint: str = ""  # what else shapes the weights (model, data, loss): a resume must match it too

    def __post_init__(self):
        checks = [
            ("epochs", is_int(self.epochs) and self.epochs >= 1, "a whole number >= 1"),
            ("iters_per_epoch", is_int(self.iters_per_epoch) and self.iters_per_epoch >= 1, "a whole number >= 1"),
            ("lr", _finite_positive(self.lr), "a finite number > 0, e.g. 1e-5"),
            ("seed", is_int(self.seed) and self.seed >= 0, "a whole number >= 0"),
            ("checkpoint_every", self.checkpoint_every is None
             or (is_int(self.checkpoint_every) and self.checkpoint_every >= 1), "None or a whole number >= 1"),
            ("schedule", len(self.schedule) >= 1 and all(len(p) == 2 and 0 <= p[0] < 1 and _finite_positive(p[1])
                                                         for p in self.schedule)
             and self.schedule[0][0] == 0, "pairs (start fraction in [0, 1), lr fraction > 0) starting at 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    def settings(self) -> Dict:
        """What shapes the weights, as plain data (a resumed run must match it)."""
        d = asdict(self)
        d.pop("checkpoint_every")
        d["schedule"] = [list(p) for p in self.schedule]
        return d


def lr_at_epoch(config: QATConfig, epoch: int) -> float:
    """The learning rate of a 0-based ``epoch``: the phase that started last, by epoch.

    A phase starting at fraction f begins at epoch ``round(f * epochs)``: over 10 epochs
    NVIDIA's schedule gives epochs 0-2 at lr/10, 3-7 at lr, 8-9 at lr/10; over 3 epochs
    low, high, low; a single epoch runs at the peak.
    """
    frac = config.schedule[0][1]
    for start, f in config.schedule:
        if round(start * config.epochs) <= epoch:
            frac = f
    return config.lr * frac


# ----------------------------------------------------------------------------- the losses
def select_blocks(model: nn.Module, pattern: Optional[str] = None,
                  block_filter: Optional[Callable[[str, nn.Module], bool]] = None, stride: int = 1) -> List[str]:
    """Names of the blocks whose outputs the distillation loss compares, in model order.

    ``pattern``: regex a block's full name must match (default: the model's direct children,
    ``r"[^.]+"``; YOLOv7 uses ``r"model\\.\\d+"``). ``block_filter(name, module)``: keep a
    block when it returns True (e.g. leave out the detection head, whose outputs are logits).
    ``stride``: supervise every stride-th block; the last one is always kept, so no block
    trains without a signal behind it.
    """
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be a whole number >= 1, got {stride!r}")
    rx = re.compile(pattern or r"[^.]+")
    names = [n for n, m in model.named_modules() if n and rx.fullmatch(n)
             and (block_filter is None or block_filter(n, m))]
    if not names:
        raise ValueError(f"no block of the model matches {rx.pattern!r} (and the filter); block names look "
                         f"like {[n for n, _ in model.named_children()][:3]}")
    kept = names[::stride]
    if kept[-1] != names[-1]:
        kept.append(names[-1])
    return kept


def _leaves(out) -> List[torch.Tensor]:
    """The tensors inside a block's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    return []


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Recorder:
    """Forward hooks that keep the outputs of the named blocks while registered."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"blocks {missing[:3]} are not in the model; pick them with select_blocks(model)")
        self.outputs: Dict[str, object] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:  # removed every time: no hook may stay for evaluation or export
            h.remove()


class DistillationLoss:
    """NVIDIA's label-free QAT loss: sum over ``blocks`` of MSE(quantized output, FP32 output).

    ``teacher`` is the FP32 model (kept frozen, in eval mode); ``blocks`` the names from
    :func:`select_blocks`, which the quantized copy shares (replacing a layer keeps its
    name). ``loss(model, batch)`` runs both models on ``input_fn(batch)`` (default: the
    first element of a tuple batch) and returns the scalar loss; no labels are read.
    """

    def __init__(self, teacher: nn.Module, blocks: Sequence[str], input_fn: Callable = workflow.default_batch_input):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.blocks, self.input_fn = list(blocks), input_fn

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x = self.input_fn(batch)
        with _Recorder(self.teacher, self.blocks) as ref, torch.no_grad():
            self.teacher(x.to(next(self.teacher.parameters()).device))
        with _Recorder(_unwrap(model), self.blocks) as got:
            model(x)  # through the DDP wrapper, if any, so that gradients are synchronised
        loss = 0.0
        for name in self.blocks:
            pairs = list(zip(_leaves(got.outputs[name]), _leaves(ref.outputs[name])))
            if not pairs:
                raise TypeError(f"block {name} returned no tensor; supervise another block")
            loss = loss + sum(nn.functional.mse_loss(s.float(), t.float().to(s.device)) for s, t in pairs)
        return loss


# ----------------------------------------------------------------------------- learnable amax
def enable_learn_amax(model: nn.Module, pattern: Optional[str] = None) -> List[str]:
    """Make the amax of every enabled, calibrated per-tensor quantizer a trainable parameter.

    ``pattern``: only quantizers whose name matches (``re.search``). Per-channel (weight)
    quantizers keep their calibrated amax. Tied quantizers are one object, trained once.
    Call it before the optimizer is built. Returns the names made learnable.
    """
    done, names = set(), []
    for name, q in workflow.quantizers(model).items():
        if id(q) in done or not q.is_enabled or not q.has_amax or q.axis is not None:
            continue
        if pattern is not None and not re.search(pattern, name):
            continue
        if not q.learn_amax:
            q.init_learn_amax()
        done.add(id(q))
        names.append(name)
    if not names:
        raise ValueError("no enabled, calibrated per-tensor quantizer to make learnable; calibrate first")
    return names


def learned_amax(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: amax}`` of the quantizers whose amax is a parameter."""
    return {n: q.amax for n, q in workflow.quantizers(model).items() if isinstance(q._amax, nn.Parameter)}


@torch.no_grad()
def _keep_amax_positive(params: Sequence[torch.Tensor]) -> None:
    # a step may push an amax below zero, which no quantizer accepts; stop at the smallest positive
    for p in params:
        p.clamp_(min=torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------- distributed
def is_main_process() -> bool:
    """True outside distributed training and on rank 0: the process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _init_distributed(device: torch.device) -> bool:
    """Join the process group when ``torchrun`` started several processes; True if this call made it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_torchelastic_launched() and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but no rendezvous address; launch with torchrun --nproc_per_node=N")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sharded_loader(loader: DataLoader, config: QATConfig, rank: int, world: int) -> DataLoader:
    """The loader rebuilt over a DistributedSampler: the data order is a function of (seed, pass).

    Used with one process too (a single shard), so the order never depends on torch's global
    RNG and the N shards of a batch are exactly the single-process batch. ``batch_size`` stays
    the global batch: each of the ``world`` ranks takes ``batch_size / world`` images.
    """
    batch = loader.batch_size
    if batch is None or batch % world:
        raise ValueError(f"the batch size {batch} does not split over {world} processes; pass a batch size "
                         f"that is a multiple of {world}")
    shuffle = config.shuffle
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler) or bool(getattr(loader.sampler, "shuffle", False))
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=config.seed, drop_last=True)
    if len(sampler) < batch // world:
        raise ValueError(f"the dataset ({len(loader.dataset)} items) is smaller than one batch of {batch}; "
                         "pass a smaller batch size")
    return DataLoader(loader.dataset, batch_size=batch // world, sampler=sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, drop_last=True)


def _batches(loader: DataLoader, epoch: int, n: int, skip: int = 0):
    """The ``n`` batches of ``epoch`` after the first ``skip``: passes over the loader, each
    with its own ``set_epoch`` (so a short loader is cycled with a fresh order)."""
    per_pass = len(loader)
    if per_pass < 1:
        raise ValueError("the training loader yields no batch; pass a smaller batch size")
    passes = math.ceil(n / per_pass)
    done = 0
    for k in range(passes):
        loader.sampler.set_epoch(epoch * passes + k)
        first = skip - k * per_pass
        if first >= per_pass:  # this whole pass came before the resume point: do not even load it
            done += per_pass
            continue
        for i, batch in enumerate(loader):
            if done >= n:
                return
            done += 1
            if i >= first:
                yield batch


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> Dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    # written aside then renamed: a run killed mid-write keeps the previous file whole
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def load_state(path) -> Dict:
    """A ``last.pt`` written by :func:`train` (plain tensors, read with ``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a QAT checkpoint written by qcourse.qat.train; pass its run folder's last.pt")
    return state


def _resume_from(out_dir: Optional[Path], config: QATConfig, resume: bool) -> Optional[Dict]:
    if not resume or out_dir is None or not (out_dir / "last.pt").exists():
        return None
    state = load_state(out_dir / "last.pt")
    old, new = state["settings"], config.settings()
    changes = [f"{k} was {old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
    if changes:
        raise ValueError(f"{out_dir} holds a QAT run with other settings ({'; '.join(changes)}); pass another "
                         "output folder, or the same settings to resume it")
    return state


def _save_state_dict(model: nn.Module, path: Path) -> None:
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Progress:
    """Where a run stands: what a checkpoint saves besides the weights and the optimizer."""

    epoch: int = 0  # the epoch in progress (or the next one to run)
    step: int = 0  # optimizer steps done inside it
    loss_sum: float = 0.0  # sum of its step losses so far (the epoch's mean goes to the history)
    history: list = None
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    step_losses: list = None  # every optimizer step's loss (this rank's), for the loss curve

    def __post_init__(self):
        self.history = [] if self.history is None else self.history
        self.step_losses = [] if self.step_losses is None else self.step_losses


def _checkpoint(path: Path, model, opt, config: QATConfig, run: _Progress) -> None:
    if not is_main_process():
        return
    _atomic_save({"format": CHECKPOINT_FORMAT, "settings": config.settings(), "model": model.state_dict(),
                  "optimizer": opt.state_dict(), "rng": _rng_state(), **vars(run)}, path)


def _restore(state: Dict, model, opt) -> _Progress:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])  # the RNG as it was after the last saved step (dropout, augmentation)
    return _Progress(**{k: state[k] for k in ("epoch", "step", "loss_sum", "history", "best_score", "best_epoch",
                                              "step_losses")})


def _mean_over_ranks(value: float) -> float:
    if _world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / _world()[1]


def _metrics(result) -> Dict[str, float]:
    """What ``evaluate`` returned as a history entry: a float, or a dict with a ``"score"``."""
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"evaluate returned a dict without 'score' (keys {sorted(result)}); add the number "
                             "that decides the best epoch as 'score'")
        return {k: float(v) for k, v in result.items()}
    return {"score": float(result)}


def _end_epoch(model, opt, config, run: _Progress, lr: float, seconds: float, evaluate, out_dir, save_model, log):
    """Log the epoch, evaluate it (rank 0; the others wait), keep the best, write last.pt."""
    row = {"epoch": run.epoch + 1, "lr": lr, "loss": _mean_over_ranks(run.loss_sum / config.iters_per_epoch),
           "seconds": round(seconds, 2)}
    if evaluate is not None:
        result = [_metrics(evaluate(model))] if is_main_process() else [None]
        if _world()[1] > 1:
            dist.broadcast_object_list(result, src=0)
        row.update(result[0])
        if run.best_score is None or row["score"] > run.best_score:
            run.best_score, run.best_epoch = row["score"], run.epoch + 1
            if out_dir is not None and is_main_process():
                save_model(model, out_dir / "best.pt")
    run.history.append(row)
    log(" ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    run.epoch, run.step, run.loss_sum = run.epoch + 1, 0, 0.0
    if out_dir is not None:
        _checkpoint(out_dir / "last.pt", model, opt, config, run)


def _run_epoch(net, model, loss_fn, opt, loader, config: QATConfig, run: _Progress, amax_params, out_dir):
    """The optimizer steps left in ``run.epoch``: loss, STE backward, Adam step."""
    net.train()
    for batch in _batches(loader, run.epoch, config.iters_per_epoch, skip=run.step):
        loss = loss_fn(net, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite QAT loss {float(loss)} at epoch {run.epoch + 1} step "
                                     f"{run.step + 1}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _keep_amax_positive(amax_params)
        run.step, run.loss_sum = run.step + 1, run.loss_sum + float(loss.detach())
        run.step_losses.append(float(loss.detach()))
        if (config.checkpoint_every and out_dir is not None and run.step % config.checkpoint_every == 0
                and run.step < config.iters_per_epoch):
            _checkpoint(out_dir / "last.pt", model, opt, config, run)


def _prepare(model: nn.Module, loader: DataLoader, config: QATConfig, device: torch.device):
    """Learnable amax, the shard of the data, Adam over what trains, and the DDP wrapper."""
    rank, world = _world()
    torch.manual_seed(config.seed)
    model.to(device)
    if config.learn_amax:
        enable_learn_amax(model)  # before Adam is built: it must hold the new parameters
    amax_params = list({id(p): p for p in learned_amax(model).values()}.values())
    loader = _sharded_loader(loader, config, rank, world)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter; call model.requires_grad_(True)")
    opt = torch.optim.Adam(params, lr=lr_at_epoch(config, 0))
    net = model
    if world > 1:
        # find_unused_parameters: the distillation loss leaves the unsupervised head without a gradient
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    return net, opt, loader, amax_params


def train(model: nn.Module, loss_fn: Callable, loader: DataLoader, config: QATConfig = QATConfig(), *,
          evaluate: Optional[Callable[[nn.Module], float]] = None, out_dir=None, resume: bool = False,
          save_model: Callable[[nn.Module, Path], None] = _save_state_dict, device="cpu", log=print) -> Dict:
    """Fine-tune the calibrated ``model`` in place with fake quantization in the loop.

    ``loss_fn(model, batch) -> scalar tensor`` (e.g. a :class:`DistillationLoss`, or a
    detection loss on labels); ``loader`` gives the training batches (its dataset, batch
    size, collate function and shuffling are kept; the order comes from ``config.seed``).
    ``evaluate(model)`` runs after every epoch and returns the score (higher is better) or a
    dict of numbers with the score under ``"score"`` (all go to the history); the best model is
    written with ``save_model(model, out_dir / "best.pt")``. ``out_dir/last.pt`` is written
    atomically after every epoch (and every ``config.checkpoint_every`` steps); with
    ``resume=True`` a run continues from it and ends with the weights an uninterrupted run
    would have. Under ``torchrun --nproc_per_node=N`` each process trains on its shard with
    DistributedDataParallel and only rank 0 evaluates and writes.

    Returns ``{"history": [{"epoch", "lr", "loss", "seconds"[, "score"]}], "best_score",
    "best_epoch", "steps", "step_losses" (every step's loss, this process's), "world_size"}``.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a qcourse.qat.QATConfig, got {type(config).__name__}")
    device = torch.device(device)
    out_dir = None if out_dir is None else Path(out_dir)
    if out_dir is not None and is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    state = _resume_from(out_dir, config, resume)  # a refusal comes before any work
    started = _init_distributed(device)
    try:
        net, opt, loader, amax_params = _prepare(model, loader, config, device)
        run = _restore(state, model, opt) if state is not None else _Progress()
        if state is not None:
            log(f"resumed at epoch {run.epoch + 1}, step {run.step}")
        for epoch in range(run.epoch, config.epochs):
            lr = lr_at_epoch(config, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            _run_epoch(net, model, loss_fn, opt, loader, config, run, amax_params, out_dir)
            _end_epoch(model, opt, config, run, lr, time.perf_counter() - t0, evaluate, out_dir, save_model, log)
        return {"history": run.history, "best_score": run.best_score, "best_epoch": run.best_epoch,
                "steps": config.epochs * config.iters_per_epoch, "step_losses": run.step_losses,
                "world_size": _world()[1]}
    finally:
        if started:
            dist.destroy_process_group()
