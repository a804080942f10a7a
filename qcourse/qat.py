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
* :func:`rank_device` — the device of one ``torchrun`` process: ``cuda`` becomes the GPU of
  its ``LOCAL_RANK`` (NCCL refuses two processes on one GPU), and the collectives use
  tensors on it (:func:`collective_device`).

Which parameters train: only those the loss reaches. The label-free loss compares block
outputs before the detection head, so the head gets no gradient from it; :func:`train` finds
the parameters a loss reaches from its graph on one batch (:func:`reached_parameters`) and
leaves the others out of the optimizer and out of DistributedDataParallel, which would wait
for their gradients forever. (``find_unused_parameters=True`` cannot help here: it looks for
parameters the *forward output* does not use, and the head's output does use them; it would
also walk the graph at every step.)
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import zipfile
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
from qcourse.utils import atomic_write, check_writable, is_int, remove_owned

__all__ = [
    "QATConfig", "NVIDIA_SCHEDULE", "lr_at_epoch", "select_blocks", "DistillationLoss", "enable_learn_amax",
    "learned_amax", "train", "CHECKPOINT_FORMAT", "load_state", "resume_state", "is_main_process", "rank_device",
    "launched_world_size", "bind_device", "backend_for", "collective_device", "check_batches", "reached_parameters", "RUN_FILES",
]

#: NVIDIA's yolov7_qat schedule as (fraction of the epochs where a phase starts, fraction of the
#: peak lr): ``{0: 1e-6, 3: 1e-5, 8: 1e-6}`` over 10 epochs with a 1e-5 peak.
NVIDIA_SCHEDULE = ((0.0, 0.1), (0.3, 1.0), (0.8, 0.1))
CHECKPOINT_FORMAT = "qcourse.qat"
#: what :func:`train` writes into its ``out_dir``
RUN_FILES = ("best.pt", "last.pt")


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


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the environment variable {name}={text!r} is not a whole number; launch with "
                         "torchrun, which sets it, or unset it") from None


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``); 1 for a plain run."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank_device(requested, *, world_size: Optional[int] = None, local_rank: Optional[int] = None,
                cuda_count: Optional[int] = None) -> torch.device:
    """The device this process trains on.

    Alone (``world_size`` 1), ``requested`` as it is. Under ``torchrun`` with several
    processes, ``cpu`` stays ``cpu`` (gloo), and ``cuda`` becomes ``cuda:LOCAL_RANK``: NCCL
    runs one process per GPU and refuses two on the same one. A GPU named by number is
    accepted only where it is that process's own (so a device already chosen by this function
    passes through unchanged). ``world_size``, ``local_rank`` and ``cuda_count`` default to
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``torch.cuda.device_count()``; given, the function
    reads nothing else. Raises ``ValueError`` for a choice NCCL or gloo cannot run.
    """
    device = torch.device(requested)
    world = launched_world_size() if world_size is None else world_size
    if world <= 1:
        return device
    local = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {str(device)!r} cannot train with {world} processes: torch.distributed runs "
                         "on cpu (gloo) or cuda (NCCL); pass cpu or cuda")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if local >= count:
        raise ValueError(f"process LOCAL_RANK={local} of {world} needs a GPU of its own, and {count} are visible; "
                         f"launch at most {count} processes per machine (torchrun --nproc_per_node={max(count, 1)})")
    if device.index is not None and device.index != local:
        raise ValueError(f"device {str(device)!r} puts every one of the {world} processes on one GPU, which NCCL "
                         "refuses; pass the device as plain 'cuda' (--device cuda): each process then takes the "
                         "GPU numbered by its LOCAL_RANK")
    return torch.device("cuda", local)


def backend_for(device) -> str:
    """The process group backend for a rank on ``device``: NCCL for a GPU, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def collective_device(backend: str, device) -> torch.device:
    """Where the tensors of a collective must live: on the rank's GPU for NCCL (CUDA tensors
    only), on the CPU for gloo."""
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def bind_device(device: torch.device) -> None:
    """Make ``device`` this process's current GPU (what NCCL and ``all_gather_object`` use)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _init_distributed(device: torch.device) -> bool:
    """Join the process group when ``torchrun`` started several processes; True if this call made it."""
    if dist.is_initialized() or launched_world_size() <= 1:
        return False
    if not dist.is_torchelastic_launched() and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but no rendezvous address; launch with torchrun --nproc_per_node=N")
    bind_device(device)
    dist.init_process_group(backend=backend_for(device))
    return True


def _close_group() -> None:
    """Tear the process group down now, on every process at the same point (just after a barrier).

    Whatever still holds the group (a DistributedDataParallel wrapper left in a reference cycle)
    is collected first: while it lives, ``destroy_process_group`` only forgets the group, and its
    C++ side (gloo's threads and connections) would go when the holder is collected, possibly
    while the interpreter shuts down, which can abort the process.
    """
    import gc

    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _comm_device(device: torch.device) -> torch.device:
    return collective_device(dist.get_backend(), device)


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batches(loader: DataLoader, world_size: Optional[int] = None) -> None:
    """Refuse, before any work, a training loader whose batches cannot be cut into ``world_size``
    shards (default: ``WORLD_SIZE``) or whose dataset is smaller than one batch."""
    world = launched_world_size() if world_size is None else world_size
    batch = loader.batch_size
    if batch is None or batch % max(world, 1):
        raise ValueError(f"the batch size {batch} does not split over {world} processes; pass a batch size "
                         f"that is a multiple of {world}")
    n = len(loader.dataset)
    if n // world < batch // world:  # what a DistributedSampler with drop_last gives each rank
        raise ValueError(f"the batch size {batch} is larger than the training data ({n} items); pass a batch "
                         f"size of at most {n - n % world}")


def _sharded_loader(loader: DataLoader, config: QATConfig, rank: int, world: int) -> DataLoader:
    """The loader rebuilt over a DistributedSampler: the data order is a function of (seed, pass).

    Used with one process too (a single shard), so the order never depends on torch's global
    RNG and the N shards of a batch are exactly the single-process batch. ``batch_size`` stays
    the global batch: each of the ``world`` ranks takes ``batch_size / world`` images.
    """
    check_batches(loader, world)
    batch = loader.batch_size
    shuffle = config.shuffle
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler) or bool(getattr(loader.sampler, "shuffle", False))
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=config.seed, drop_last=True)
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
def _rng_state(device: torch.device) -> Dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if device.type == "cuda":  # this rank's GPU only: reading every GPU's state would open a context on each
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda_device" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def _atomic_save(obj, path: Path) -> None:
    # written aside then renamed: a run killed mid-write keeps the previous file whole
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


_STATE_KEYS = {"settings": dict, "model": dict, "optimizer": dict, "rng": dict, "epoch": int, "step": int,
               "loss_sum": float, "history": list, "step_losses": list}


def load_state(path) -> Dict:
    """A ``last.pt`` written by :func:`train` (plain tensors, read with ``weights_only=True``).

    A file that does not load as one (truncated, overwritten, or something else saved under the
    name) raises ``ValueError`` naming it; ``weights_only`` stays on: a checkpoint of
    :func:`train` never needs more.
    """
    fix = "delete it to start afresh, or run without resuming, or into another output folder"
    with open(path, "rb") as f:  # a missing or unreadable file is an OSError of its own, said as such
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError, TypeError,
                AttributeError, ImportError, IndexError, KeyError) as e:  # torch's own hint is to load unsafely
            state = e
    if isinstance(state, Exception):
        raise ValueError(f"{path} is damaged or is not a QAT checkpoint of qcourse (it does not load as one: "
                         f"{type(state).__name__}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a QAT checkpoint written by qcourse.qat.train; {fix}")
    bad = [k for k, kind in _STATE_KEYS.items() if not isinstance(state.get(k), kind)]
    if bad:
        raise ValueError(f"{path} is a damaged QAT checkpoint of qcourse ({', '.join(bad)} missing or of the wrong "
                         f"kind); {fix}")
    return state


def resume_state(out_dir, config: QATConfig) -> Optional[Dict]:
    """The checkpoint ``out_dir/last.pt`` to resume from (None where there is none).

    Raises ``ValueError`` for a damaged file and for a run made with other settings: call it
    before any work to refuse a resume up front (:func:`train` calls it too).
    """
    path = Path(out_dir) / "last.pt"
    if not (path.exists() or path.is_symlink()):
        return None
    state = load_state(path)
    old, new = state["settings"], config.settings()
    changes = [f"{k} was {old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
    if changes:
        raise ValueError(f"{out_dir} holds a QAT run with other settings ({'; '.join(changes)}); pass another "
                         "output folder, or the same settings to resume it")
    return state


def _resume_from(out_dir: Optional[Path], config: QATConfig, resume: bool) -> Optional[Dict]:
    if not resume or out_dir is None:
        return None
    return resume_state(out_dir, config)


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


def _checkpoint(path: Path, model, opt, config: QATConfig, run: _Progress, device: torch.device) -> None:
    if not is_main_process():
        return
    _atomic_save({"format": CHECKPOINT_FORMAT, "settings": config.settings(), "model": model.state_dict(),
                  "optimizer": opt.state_dict(), "rng": _rng_state(device), **vars(run)}, path)


def _restore(state: Dict, model, opt, device: torch.device) -> _Progress:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], device)  # the RNG as it was after the last saved step (dropout, augmentation)
    return _Progress(**{k: state.get(k) for k in ("epoch", "step", "loss_sum", "history", "best_score", "best_epoch",
                                                  "step_losses")})


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the processes (itself outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return float(t.cpu()) / dist.get_world_size()


def _from_main(value, device: torch.device):
    """Rank 0's ``value`` on every process (as it is outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device(device))
    return box[0]


def _weights_sha256(model: nn.Module) -> str:
    """The SHA-256 of the model's state (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digests_by_rank(model: nn.Module) -> List[str]:
    """Every process's :func:`_weights_sha256`, by rank: DistributedDataParallel keeps them equal."""
    mine = _weights_sha256(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _metrics(result) -> Dict[str, float]:
    """What ``evaluate`` returned as a history entry: a float, or a dict with a ``"score"``."""
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"evaluate returned a dict without 'score' (keys {sorted(result)}); add the number "
                             "that decides the best epoch as 'score'")
        return {k: float(v) for k, v in result.items()}
    return {"score": float(result)}


def _end_epoch(model, opt, config, run: _Progress, lr: float, seconds: float, evaluate, out_dir, save_model, log,
               device: torch.device):
    """Log the epoch, evaluate it (rank 0; the others wait), keep the best, write last.pt."""
    row = {"epoch": run.epoch + 1, "lr": lr, "loss": _mean_over_ranks(run.loss_sum / config.iters_per_epoch, device),
           "seconds": round(seconds, 2)}
    if evaluate is not None:
        row.update(_from_main(_metrics(evaluate(model)) if is_main_process() else None, device))
        if run.best_score is None or row["score"] > run.best_score:
            run.best_score, run.best_epoch = row["score"], run.epoch + 1
            if out_dir is not None and is_main_process():
                save_model(model, out_dir / "best.pt")
    run.history.append(row)
    if is_main_process():
        log(" ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    run.epoch, run.step, run.loss_sum = run.epoch + 1, 0, 0.0
    if out_dir is not None:
        _checkpoint(out_dir / "last.pt", model, opt, config, run, device)


def _run_epoch(net, model, loss_fn, opt, loader, config: QATConfig, run: _Progress, amax_params, out_dir, device):
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
            _checkpoint(out_dir / "last.pt", model, opt, config, run, device)


# ----------------------------------------------------------------------------- what the loss trains
def reached_parameters(loss: torch.Tensor) -> set:
    """The ids of the leaf tensors (parameters) whose ``.grad`` ``loss.backward()`` would fill.

    Read from the autograd graph behind ``loss`` without running it: every path from ``loss``
    ends at the accumulator of a leaf, and a parameter no path reaches gets no gradient.
    """
    seen, leaves, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if leaf is not None:
            leaves.add(id(leaf))
        todo.extend(nxt for nxt, _ in node.next_functions)
    return leaves


def _untrained_by_loss(model: nn.Module, loss_fn: Callable, batch, device: torch.device) -> List[str]:
    """Names of the trainable parameters ``loss_fn`` leaves without a gradient, from one batch.

    The model runs in training mode, as in the loop; its buffers (BatchNorm statistics, a
    quantizer's state) and every RNG are given back as they were, so the run is the one it
    would be without this look (and a resumed run still ends with the uninterrupted weights).
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    mode = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               device_type="cuda" if device.type == "cuda" else "cpu"):
        model.train()
        loss = loss_fn(model, batch)
        reached = reached_parameters(loss) if isinstance(loss, torch.Tensor) and loss.requires_grad else set()
        del loss  # frees the graph: nothing runs backward
    model.train(mode)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def _first_batch(loader: DataLoader, config: QATConfig, world: int):
    """Rank 0's first batch: every process looks at the same one, so all choose the same parameters."""
    probe = _sharded_loader(loader, config, 0, world)
    probe.sampler.set_epoch(0)
    return next(iter(probe))


def _prepare(model: nn.Module, loss_fn: Callable, loader: DataLoader, config: QATConfig, device: torch.device, log):
    """Learnable amax, the shard of the data, what the loss trains, Adam over it, and the DDP wrapper.

    Returns ``(net, optimizer, loader, amax parameters, parameters left frozen)``.
    """
    rank, world = _world()
    torch.manual_seed(config.seed)
    model.to(device)
    if config.learn_amax:
        enable_learn_amax(model)  # before Adam is built: it must hold the new parameters
    loader = _sharded_loader(loader, config, rank, world)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter; call model.requires_grad_(True)")
    untrained = _untrained_by_loss(model, loss_fn, _first_batch(loader, config, world), device)
    named = dict(model.named_parameters())
    frozen = [named[n] for n in untrained]
    for p in frozen:  # no gradient would come: DDP would wait for one, Adam would skip them anyway
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the loss reaches no trainable parameter of the model (its value does not depend on "
                         "them); pass a loss computed from the model's outputs")
    if untrained and is_main_process():
        log(f"{len(untrained)} parameter tensors get no gradient from the loss and stay as they are "
            f"({', '.join(untrained[:3])}{', ...' if len(untrained) > 3 else ''})")
    reached = {id(p) for p in params}
    amax_params = [p for p in {id(p): p for p in learned_amax(model).values()}.values() if id(p) in reached]
    opt = torch.optim.Adam(params, lr=lr_at_epoch(config, 0))
    net = model
    if world > 1:
        # every parameter DDP holds gets a gradient at every step (the others are frozen above), so
        # find_unused_parameters stays off: it would walk the autograd graph after every forward
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return net, opt, loader, amax_params, frozen


def _start_fresh(out_dir: Path) -> None:
    """A run that does not resume: the earlier run's files go first (only qcourse's, unchanged)."""
    for name in RUN_FILES:
        remove_owned(out_dir / name)


def train(model: nn.Module, loss_fn: Callable, loader: DataLoader, config: QATConfig = QATConfig(), *,
          evaluate: Optional[Callable[[nn.Module], float]] = None, out_dir=None, resume: bool = False,
          save_model: Callable[[nn.Module, Path], None] = _save_state_dict, device="cpu", log=print) -> Dict:
    """Fine-tune the calibrated ``model`` in place with fake quantization in the loop.

    ``loss_fn(model, batch) -> scalar tensor`` (e.g. a :class:`DistillationLoss`, or a
    detection loss on labels); ``loader`` gives the training batches (its dataset, batch
    size, collate function and shuffling are kept; the order comes from ``config.seed``).
    Only the parameters the loss reaches train (found on the first batch, which costs one
    extra forward pass; the loss must reach the same ones at every step); the others stay as
    they are. ``evaluate(model)`` runs after every epoch and returns the score (higher is
    better) or a dict of numbers with the score under ``"score"`` (all go to the history); the
    best model is written with ``save_model(model, out_dir / "best.pt")``. ``out_dir/last.pt``
    is written atomically after every epoch (and every ``config.checkpoint_every`` steps);
    with ``resume=True`` a run continues from it and ends with the weights an uninterrupted
    run would have. A run that does not resume first deletes the earlier run's ``best.pt`` and
    ``last.pt``; a file there that qcourse did not write is refused before any work. Under
    ``torchrun --nproc_per_node=N`` each process trains on its shard with
    DistributedDataParallel on its own device (:func:`rank_device`), and only rank 0
    evaluates and writes.

    Returns ``{"history": [{"epoch", "lr", "loss", "seconds"[, "score"]}], "best_score",
    "best_epoch", "steps", "step_losses" (every step's loss, this process's), "world_size",
    "weights_sha256" (the final weights' SHA-256 on each process, by rank: all equal)}``.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a qcourse.qat.QATConfig, got {type(config).__name__}")
    device = rank_device(device)
    out_dir = None if out_dir is None else Path(out_dir)
    state = _resume_from(out_dir, config, resume)  # a refusal comes before any work
    if out_dir is not None and is_main_process():
        check_writable(*(out_dir / name for name in RUN_FILES))
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            _start_fresh(out_dir)
    started = _init_distributed(device)
    frozen, finished, net = [], False, None
    try:
        net, opt, loader, amax_params, frozen = _prepare(model, loss_fn, loader, config, device, log)
        run = _restore(state, model, opt, device) if state is not None else _Progress()
        if state is not None and is_main_process():
            log(f"resumed at epoch {run.epoch + 1}, step {run.step}")
        for epoch in range(run.epoch, config.epochs):
            lr = lr_at_epoch(config, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            _run_epoch(net, model, loss_fn, opt, loader, config, run, amax_params, out_dir, device)
            _end_epoch(model, opt, config, run, lr, time.perf_counter() - t0, evaluate, out_dir, save_model, log,
                       device)
        result = {"history": run.history, "best_score": run.best_score, "best_epoch": run.best_epoch,
                  "steps": config.epochs * config.iters_per_epoch, "step_losses": run.step_losses,
                  "world_size": _world()[1], "weights_sha256": _digests_by_rank(model)}
        finished = True
        return result
    finally:
        for p in frozen:  # the model goes back as it came
            p.requires_grad_(True)
        if started and finished:
            # all processes done with their last collective before any closes its connections; after an
            # error the group is left to the exit: tearing it down while others wait in a collective hangs
            dist.barrier()
            net = None  # noqa: F841 -- the DistributedDataParallel wrapper holds the group: let it go first
            _close_group()
