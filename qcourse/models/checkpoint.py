"""Loading official YOLOv7 checkpoints safely, and qcourse's own checkpoint format (lessons 5-8).

Two kinds of files load through :func:`load_checkpoint`:

* **Official checkpoints** (``yolov7.pt``, ``yolov7-tiny.pt`` and ``train.py`` outputs): a
  ``torch.save``-d dict whose ``'model'`` (and possibly ``'ema'``) value is a *pickled full*
  ``models.yolo.Model`` in FP16, next to ``'optimizer'``, ``'training_results'``, ``'epoch'``,
  ``'best_fitness'`` (a numpy array)... Unpickling such a file normally needs the YOLOv7 source
  tree on ``sys.path`` and runs whatever the pickle asks for.
* **qcourse checkpoints** written by :func:`save_checkpoint`: a dict of plain data (format
  tag, architecture, ``nc``, class names, the layer configuration, JSON-able metadata) plus a
  plain ``state_dict``. They load with ``torch.load(path, weights_only=True)`` too.

How official pickles are read without their source and without running anything
-------------------------------------------------------------------------------
A pickle can only obtain a callable through ``Unpickler.find_class`` (the GLOBAL /
STACK_GLOBAL / INST / OBJ / EXT opcodes all go through it); REDUCE and NEWOBJ can then only
call what ``find_class`` returned. :class:`_RestrictedUnpickler` overrides ``find_class``
with a fixed table: ``models.yolo.Model/Detect/IDetect`` and ``models.common.Conv/Concat/MP/
SP/SPPCSPC/RepConv/ImplicitA/ImplicitM`` map to the qcourse classes of the same names; the
``torch.nn`` layers they contain, torch's tensor/parameter rebuild functions, torch dtypes,
``collections.OrderedDict``, ``set``/``frozenset``, ``_codecs.encode`` (how protocol 2 stores
bytes) and numpy's array/dtype/scalar reconstructors map to themselves. Every other global
raises :class:`UnsafeCheckpointError` naming it, before anything it refers to is imported
or called. The unpickler is handed to ``torch.load(..., pickle_module=..., weights_only=False)``,
so torch still handles the zip and legacy containers, storages and ``map_location``.

Why not torch's own ``weights_only`` unpickler with an allow-list? It identifies allowed
globals by the object's own ``__module__``/``__qualname__`` (mapping the foreign name
``models.yolo.Model`` onto a qcourse class needs its newer ``(obj, "name")`` form and
process-global allow-list state), and on a refused global its message tells the user to
allow-list that global, which is the wrong advice for a hostile file. ``find_class`` is the
mechanism the Python documentation itself gives for restricting globals, and it works the
same on every torch version.

After unpickling, nothing of the unpickled objects is *executed*: the tensors are collected
by walking ``_parameters``/``_buffers``/``_modules`` directly (no ``state_dict()`` call, so
no hooks from the file run), the ``yaml`` attribute is checked to be plain data, a fresh
qcourse model is built from it, the tensors are checked against the fresh model key by key
and shape by shape, and loaded with ``strict=True`` in FP32.
"""
from __future__ import annotations

import _compat_pickle
import collections
import importlib
import json
import os
import pickle
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common, yolo
from .configs import get_config
from .yolo import Model, UnsupportedArchitectureError, build_model

__all__ = [
    "load_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "detect_architecture",
    "CheckpointError",
    "UnsafeCheckpointError",
    "StateDictMismatchError",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "qcourse.yolo"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a usable YOLOv7 checkpoint (corrupt, truncated, wrong content)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list; nothing from it was loaded."""


class StateDictMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the architecture it declares."""


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------


def _allowed_globals() -> dict:
    allowed = {}
    for name in ("Conv", "Concat", "MP", "SP", "SPPCSPC", "RepConv", "ImplicitA", "ImplicitM"):
        allowed[("models.common", name)] = getattr(common, name)
    for name in ("Model", "Detect", "IDetect"):
        allowed[("models.yolo", name)] = getattr(yolo, name)
    # keys are the names official pickles use; values are read from the defining modules (not
    # from ``torch.nn``, which automatic quantization may have patched with Quant* classes)
    for module, names in (
        ("torch.nn.modules.conv", ("Conv2d",)),
        ("torch.nn.modules.batchnorm", ("BatchNorm2d", "SyncBatchNorm")),
        ("torch.nn.modules.activation", ("SiLU", "LeakyReLU", "ReLU", "Hardswish")),
        ("torch.nn.modules.linear", ("Identity",)),
        ("torch.nn.modules.pooling", ("MaxPool2d",)),
        ("torch.nn.modules.upsampling", ("Upsample",)),
        ("torch.nn.modules.container", ("Sequential", "ModuleList")),
    ):
        mod = importlib.import_module(module)
        for name in names:
            allowed[(module, name)] = getattr(mod, name)
    for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
        "_rebuild_parameter", "_rebuild_parameter_with_state",
    ):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.bool,
    ):
        allowed[("torch", str(dtype).split(".")[-1])] = dtype  # a dtype pickles as torch.<name>
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    allowed[("_codecs", "encode")] = __import__("_codecs").encode  # bytes under protocol 2
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = reconstruct
        allowed[(mod, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_ALLOWED = None


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only resolves the allow-listed globals."""

    source = "<checkpoint>"  # file name used in error messages (set per load)

    def find_class(self, module, name):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        # protocol 0-2 pickles written by Python 3 name builtins the Python 2 way
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        raise UnsafeCheckpointError(
            f"refusing to load global '{module}.{name}' from {self.source}: only the classes "
            "an official YOLOv7 checkpoint is made of (models.yolo.*, models.common.*, "
            "torch.nn layers, tensors, OrderedDict, numpy arrays) may be unpickled, so the "
            "file was not loaded and nothing it names was imported or called. If you trust "
            "it and it holds another model, open it with the code that wrote it and save "
            "its state_dict."
        )


def _restricted_pickle_module(source: str) -> types.ModuleType:
    """A stand-in for the ``pickle`` module, to pass as ``torch.load(pickle_module=...)``."""
    mod = types.ModuleType("qcourse_restricted_pickle")

    class Unpickler(_RestrictedUnpickler):
        pass

    Unpickler.source = source

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    mod.Unpickler = Unpickler
    mod.load = load
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


def read_checkpoint(path) -> object:
    """Unpickle ``path`` with the restricted unpickler (CPU tensors) and return the raw object.

    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a
    refused global and :class:`CheckpointError` for anything unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (give the path to a .pt file, e.g. yolov7.pt)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give the path to a .pt checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or save did not finish")
    try:
        return torch.load(
            path,
            map_location="cpu",
            pickle_module=_restricted_pickle_module(path.name),
            weights_only=False,
        )
    except (UnsafeCheckpointError, PermissionError):
        raise
    except (
        RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
        KeyError, IndexError, TypeError, AttributeError, OSError, UnicodeDecodeError,
    ) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); the file "
            "may be truncated or corrupt: download or save it again"
        ) from e


# ---------------------------------------------------------------------------------------------
# From unpickled objects to a qcourse model
# ---------------------------------------------------------------------------------------------


def _tensors_of(module: nn.Module, source: str) -> dict:
    """state_dict of an unpickled module, read from its attribute dicts (no hooks run)."""
    out = {}

    def walk(m, prefix):
        d = m.__dict__
        params = d.get("_parameters") or {}
        buffers = d.get("_buffers") or {}
        non_persistent = d.get("_non_persistent_buffers_set") or set()
        children = d.get("_modules") or {}
        for name, t in list(params.items()) + [
            (n, b) for n, b in buffers.items() if n not in non_persistent
        ]:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"{source}: {prefix}{name} is a {type(t).__name__}, not a tensor"
                )
            out[prefix + name] = t.detach()
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, nn.Module):
                raise CheckpointError(
                    f"{source}: {prefix}{name} is a {type(child).__name__}, not a module"
                )
            walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out


def _is_plain(x, depth=0) -> bool:
    if depth > 20:
        return False
    if x is None or isinstance(x, (str, int, float, bool)):
        return True
    if isinstance(x, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in x.items())
    return False


def detect_architecture(state_dict: dict) -> tuple[str, dict]:
    """(architecture name, configuration) that a bare YOLOv7 ``state_dict`` was made from.

    Recognises YOLOv7 (head ``model.105``) and YOLOv7-tiny (head ``model.77``), with an
    IDetect (``ia``/``im`` keys) or a plain Detect head; ``nc`` is read from the head's
    output-conv shape and the anchors (pixels) from ``anchor_grid``.
    """
    for arch, head in (("yolov7", 105), ("yolov7-tiny", 77)):
        w = state_dict.get(f"model.{head}.m.0.weight")
        grid = state_dict.get(f"model.{head}.anchor_grid")
        if w is None or grid is None:
            continue
        nl, na = int(grid.shape[0]), int(grid.shape[2])
        if int(w.shape[0]) % na or int(w.shape[0]) // na - 5 < 1:
            raise StateDictMismatchError(
                f"model.{head}.m.0.weight has {int(w.shape[0])} output channels, which is not "
                f"{na} anchors x (5 + nc) for any nc >= 1"
            )
        nc = int(w.shape[0]) // na - 5
        name = arch if f"model.{head}.ia.0.implicit" in state_dict else f"{arch}-deploy"
        cfg = get_config(name, nc)
        cfg["anchors"] = [[float(v) for v in row] for row in grid.float().reshape(nl, -1).tolist()]
        return name, cfg
    raise UnsupportedArchitectureError(
        "cannot recognise the architecture: the state_dict has neither a YOLOv7 head "
        "(model.105.m.0.weight) nor a YOLOv7-tiny head (model.77.m.0.weight)"
    )


def _looks_fused(sd: dict) -> bool:
    if any(k.endswith(".rbr_reparam.weight") for k in sd):
        return True
    return any(k.endswith(".conv.bias") and k[: -len("conv.bias")] + "bn.weight" not in sd for k in sd)


def _load_into(model: Model, sd: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    desc = f"the {model.arch} architecture (nc={model.nc})"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise StateDictMismatchError(f"{source}: state_dict does not fit {desc}: " + "; ".join(parts))
    for k, v in expected.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise StateDictMismatchError(f"{source}: {k!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(v.shape):
            raise StateDictMismatchError(
                f"{source}: key {k!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(v.shape)} in {desc}"
            )
    model.load_state_dict(
        {k: (t.float() if t.is_floating_point() else t) for k, t in sd.items()}, strict=True
    )


def _names(names, nc):
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    if isinstance(names, dict) and sorted(names) == list(range(nc)):
        return [str(names[i]) for i in range(nc)]
    return None


def _build(cfg, names, source) -> Model:
    if not isinstance(cfg, dict) or not _is_plain(cfg):
        raise CheckpointError(f"{source}: the model configuration is not a plain dict of layers")
    try:
        return build_model(cfg, names=_names(names, cfg.get("nc")))
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{source}: {e}") from None
    except ValueError as e:  # e.g. a bad nc
        raise CheckpointError(f"{source}: {e}") from None
    except (KeyError, IndexError, TypeError) as e:
        raise UnsupportedArchitectureError(
            f"{source}: cannot build a model from its configuration ({type(e).__name__}: {e})"
        ) from None


def _model_from_object(obj, source: str) -> Model:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format version {version!r} is newer than this qcourse understands "
                f"({FORMAT_VERSION}); upgrade qcourse"
            )
        sd = obj.get("state_dict")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{source}: the qcourse checkpoint has no state_dict")
        model = _build(obj.get("cfg"), obj.get("names"), source)
        if obj.get("fused"):
            model.fuse()
        _load_into(model, sd, source)
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        model.meta = {"source": "qcourse", "format_version": version, **meta}
        return model

    src, ckpt = obj, {}
    if isinstance(obj, dict) and ("model" in obj or "ema" in obj):
        ckpt = obj
        src = obj["ema"] if obj.get("ema") is not None else obj.get("model")
    if isinstance(src, nn.Module):
        sd = _tensors_of(src, source)
        cfg = src.__dict__.get("yaml")
        names = src.__dict__.get("names")
        if cfg is None:
            _, cfg = _detect(sd, source)
    elif isinstance(src, dict) and src and all(isinstance(v, torch.Tensor) for v in src.values()):
        sd, names = src, None
        _, cfg = _detect(sd, source)
    else:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{source} is a PyTorch file but not a YOLOv7 checkpoint: expected a dict with a "
            f"'model' entry (official) or a qcourse checkpoint, found {found}"
        )
    model = _build(cfg, names, source)
    if _looks_fused(sd):
        model.fuse()
    _load_into(model, sd, source)
    meta = {"source": "yolov7"}
    for key in ("epoch", "updates"):
        if isinstance(ckpt.get(key), int):
            meta[key] = ckpt[key]
    if ckpt:
        meta["from_ema"] = ckpt.get("ema") is not None
    model.meta = meta
    return model


def _detect(sd, source):
    try:
        return detect_architecture(sd)
    except CheckpointError as e:
        raise StateDictMismatchError(f"{source}: {e}") from None
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{source}: {e}") from None


def load_checkpoint(path, map_location="cpu", *, fuse: bool = False) -> Model:
    """Load an official YOLOv7/YOLOv7-tiny checkpoint or a qcourse one as an FP32 eval model.

    ``path``: ``.pt`` file. Official files: the ``'ema'`` model is used when present, else
    ``'model'`` (as the official ``attempt_load``); bare state_dicts are recognised too.
    ``map_location``: device for the returned model (``"cpu"``, ``"cuda:0"``, ``torch.device``).
    ``fuse``: also apply :meth:`Model.fuse` (Conv+BN, RepConv, IDetect folding).

    Returns a :class:`~qcourse.models.yolo.Model` in eval mode with ``nc``, ``names``,
    ``arch`` and ``meta`` (metadata stored with the checkpoint) set. Raises
    ``FileNotFoundError``, :class:`UnsafeCheckpointError`, :class:`CheckpointError`,
    :class:`StateDictMismatchError` or
    :class:`~qcourse.models.yolo.UnsupportedArchitectureError` with the file name and the cause.
    """
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            f"map_location must be a device string such as 'cpu' or 'cuda:0' or a torch.device, "
            f"got {type(map_location).__name__}"
        )
    path = Path(path)
    obj = read_checkpoint(path)
    model = _model_from_object(obj, path.name)
    model.float().eval()
    if fuse:
        model.fuse()
    if map_location is not None:
        model.to(map_location)
    return model


def save_checkpoint(model: Model, path, *, half: bool = False, **meta) -> Path:
    """Write ``model`` in qcourse's checkpoint format and return the path.

    The file is a dict of plain data that ``torch.load(path, weights_only=True)`` accepts:
    ``format``/``format_version``, ``arch``, ``nc``, ``names``, ``cfg`` (the layer
    configuration), ``fused``, ``dtype``, ``state_dict`` (name -> CPU tensor) and ``meta``.
    ``half=True`` stores floating tensors as FP16 (half the size; loading converts back to
    FP32). ``meta``: JSON-able keyword arguments kept in ``meta`` (e.g. ``img_size=160``,
    ``epochs=..., map50_95=...``); ``names=[...]`` overrides ``model.names``. The file is
    written to a temporary name first and renamed, so a crash never leaves half a checkpoint.
    """
    if not isinstance(model, Model):
        raise TypeError(
            f"save_checkpoint needs a qcourse.models Model, got {type(model).__name__}"
        )
    names = meta.pop("names", model.names)
    if _names(names, model.nc) is None:
        raise ValueError(
            f"names must be a list of {model.nc} class names (nc={model.nc}), got {names!r}"
        )
    for key, value in meta.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"metadata {key}={value!r} is not JSON-serialisable; pass numbers, strings, "
                "lists or dicts (e.g. convert tensors with .tolist())"
            ) from None
    state = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu", copy=True)
        if half and t.is_floating_point():
            t = t.half()
        state[k] = t
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "nc": model.nc,
        "names": _names(names, model.nc),
        "cfg": json.loads(json.dumps(model.yaml)),
        "fused": bool(model.fused),
        "dtype": "float16" if half else "float32",
        "state_dict": state,
        "meta": json.loads(json.dumps(meta)),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path

