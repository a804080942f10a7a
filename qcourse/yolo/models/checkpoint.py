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

Even allowed names can be abused, so the unpickler also checks *how* they are used. It is
the pure-Python ``pickle._Unpickler`` (a checkpoint's pickle is small: 0.3 MB for yolov7.pt),
whose opcodes can be overridden one by one:

* a pickle recreates a module with NEWOBJ (``cls.__new__``, no constructor). Calling a class
  (REDUCE, INST, OBJ) would run its ``__init__`` with arguments from the file
  (``Conv2d(100000, 100000, 7)`` allocates terabytes), so only the rebuild functions and
  containers may be called, and only modules may be created with NEWOBJ;
* dict keys and set members must be strings or numbers: hashing a tuple nested 30 levels
  deep, each level repeating the one below ten times, would take forever;
* a tensor view must lie inside its storage (``set_`` would otherwise *grow* the storage to
  whatever size the file names), numpy arrays start empty and hold at most
  :data:`MAX_ARRAY_ITEMS` items, ``_codecs.encode`` accepts only the latin-1 codec, items
  go only into lists, dicts and sets, and state (BUILD) is only set on modules, numpy arrays
  and OrderedDicts (a state_dict keeps its ``_metadata`` there);
* every storage and tensor is counted before torch creates it (see Bounds).

Why not torch's own ``weights_only`` unpickler with an allow-list? It identifies allowed
globals by the object's own ``__module__``/``__qualname__`` (mapping the foreign name
``models.yolo.Model`` onto a qcourse class needs its newer ``(obj, "name")`` form and
process-global allow-list state), and on a refused global its message tells the user to
allow-list that global, which is the wrong advice for a hostile file. ``find_class`` is the
mechanism the Python documentation itself gives for restricting globals, and it works the
same on every torch version.

Before the pickle: the container
--------------------------------
``torch.load`` does not only unpickle: given a TorchScript archive (a zip holding
``constants.pkl``) it calls ``torch.jit.load``, which runs the archive's TorchScript code
(``__setstate__`` methods) around any restricted unpickler; given a path ending in
``.safetensors`` it dispatches on the name. So :func:`read_checkpoint` opens the file itself,
reads the zip directory with :mod:`zipfile` (and checks that torch's zip reader sees the same
records), refuses TorchScript archives, tar archives and anything that is neither a zip nor a
pickle stream, and only then hands the *open file* to ``torch.load``. ``torch.save`` stores
every zip record uncompressed, so a compressed record (a "zip bomb": 1 MB that inflates to
1 GB) is refused before it is read.

Bounds
------
A hostile file can be tiny and still make a naive loader hang or exhaust memory: shared
sub-lists that expand exponentially ("billion laughs"), a module graph whose branches all
lead to the same child, a cycle, a configuration asking for an 11 GB convolution. Every
count is therefore checked against what a YOLOv7 checkpoint can hold, with wide margins
(yolov7.pt: 75 MB, 566 tensors, 415 modules; a training checkpoint with ``ema`` and the
optimizer: about 1400 tensors, 300 MB):

* the file: at most :data:`MAX_FILE_BYTES` (the tensor bound below, and room for the pickles and
  the container), checked before it is opened;
* pickle: at most :data:`MAX_PICKLE_BYTES` per pickle (yolov7.pt: 0.3 MB), checked before
  each read (a pickle may declare a 2**40-byte string, and ``file.read(n)`` allocates n);
* tensors: at most :data:`MAX_TENSORS` storages and tensors, :data:`MAX_TENSOR_BYTES` of
  tensor data, and never more storage bytes than the file holds;
* modules: at most :data:`MAX_MODULES`, nested at most :data:`MAX_MODULE_DEPTH` deep, each
  module visited once (a module met twice, as in a cycle or a shared branch, is refused:
  YOLOv7 models are trees; only a stateless leaf such as an activation may be shared);
* plain data (the ``yaml`` configuration, metadata): at most :data:`MAX_CONFIG_ITEMS` items
  counted on every visit, so shared sub-lists count each time they appear;
* the configuration must have the layers of a known architecture (``yolov7``,
  ``yolov7-tiny`` and their ``-deploy`` variants in :mod:`.configs`), with output channels,
  repeats and multipliers no larger than theirs, ``1 <= nc <=`` :data:`MAX_CLASSES` and
  anchors of their shape. It is checked before anything is built.

After unpickling, nothing of the unpickled objects is *executed*: the tensors are collected
by walking ``_parameters``/``_buffers``/``_modules`` directly (no ``state_dict()`` call, so
no hooks from the file run), the ``yaml`` attribute is checked as above, a fresh qcourse model
is built from it, the tensors are checked against the fresh model key by key and shape by
shape, tensors holding NaN or inf are refused (they would evaluate to mAP 0 without a word),
and the rest is loaded with ``strict=True`` in FP32.
"""
from __future__ import annotations

import _compat_pickle
import collections
import importlib
import json
import math
import os
import pickle
import reprlib
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.utils import InputFileError, atomic_write, check_file_size

from . import common, yolo
from .configs import ARCHITECTURES, get_config
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

# Bounds (see "Bounds" in the module docstring). The figures in the comments are yolov7.pt's.
MAX_PICKLE_BYTES = 4 << 20  # per pickle in the file; 0.3 MB for model + ema
MAX_TENSORS = 4096  # storages, and tensors; ~1400 in a training checkpoint (model, ema, optimizer)
MAX_TENSOR_BYTES = 1 << 30  # 75 MB; ~300 MB in a training checkpoint
MAX_MODULES = 4096  # 415 per model
MAX_MODULE_DEPTH = 16  # 4 (model.104.rbr_dense.0)
MAX_CONFIG_ITEMS = 10_000  # ~1500 values in the yolov7 configuration
MAX_CONFIG_DEPTH = 8  # 4 (cfg -> 'head' -> layer -> args)
MAX_CLASSES = 4096  # COCO 80, Objects365 365, LVIS 1203
MAX_INPUT_CHANNELS = 16  # 3
MAX_ARRAY_ITEMS = 1 << 20  # numpy arrays: best_fitness holds 1 number
MAX_FILE_BYTES = MAX_TENSOR_BYTES + (256 << 20)  # the tensors, and room for the pickles and the zip


class CheckpointError(ValueError):
    """A file is not a usable YOLOv7 checkpoint (corrupt, truncated, wrong content)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list; nothing from it was loaded."""


class StateDictMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the architecture it declares."""


_REPR = reprlib.Repr()  # error messages quote values from the file: keep them short
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3
_short = _REPR.repr


# ---------------------------------------------------------------------------------------------
# What a pickle may name, and how it may use it
# ---------------------------------------------------------------------------------------------


def _module_classes() -> dict:
    """Module classes: created with NEWOBJ only (``cls.__new__``), never called."""
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
    return allowed


class _Refused(Exception):
    """Raised by the checked builders below; the unpickler turns it into UnsafeCheckpointError."""


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol 2 uses it (bytes stored as a latin-1 str), no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"calls _codecs.encode with the codec {_short(encoding)}")
    return text.encode("latin1")


_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _np_reconstruct(subtype, shape, dtype):
    """numpy's array reconstructor as numpy pickles use it: an empty array, filled by BUILD."""
    if subtype is not np.ndarray or shape != (0,):  # a shape here would be allocated
        raise _Refused(f"calls numpy _reconstruct({_short(subtype)}, {_short(shape)})")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


def _builders() -> dict:
    """Callables a pickle may call (REDUCE): each builds one object at a cost bounded by its
    arguments. The tensor rebuild functions are added per load (:class:`_Budget`)."""
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_encode,  # bytes under protocol 2
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    scalar = np.float64(0).__reduce__()[0]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _np_reconstruct
        allowed[(mod, "scalar")] = scalar
    return allowed


def _values() -> dict:
    """Globals a pickle may only pass around: dtypes, and ndarray (``_reconstruct``'s argument)."""
    allowed = {("numpy", "ndarray"): np.ndarray}
    for dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.bool,
    ):
        allowed[("torch", str(dtype).split(".")[-1])] = dtype  # a dtype pickles as torch.<name>
    return allowed


_REBUILD_TENSOR = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")
_ALLOWED = None  # (module, name) -> object, built on first use
_BUILDERS = None  # ids of the callables REDUCE may call


def _allowed() -> dict:
    global _ALLOWED, _BUILDERS
    if _ALLOWED is None:
        builders = _builders()
        _BUILDERS = {id(f) for f in builders.values()}
        _ALLOWED = {**_module_classes(), **builders, **_values()}
    return _ALLOWED


class _Budget:
    """What one file may create while it is unpickled (shared by all the pickles of a file)."""

    def __init__(self, source: str, file_bytes: int):
        self.source = source
        self.max_storage_bytes = min(MAX_TENSOR_BYTES, file_bytes)
        self.storages = set()  # keys of the storages counted so far
        self.storage_bytes = 0
        self.tensors = 0
        self.tensor_bytes = 0
        self.modules = 0
        # torch's rebuild functions, wrapped to check each view before torch creates it
        self.rebuilders = {
            name: self._checked(name, getattr(torch._utils, name))
            for name in _REBUILD_TENSOR if hasattr(torch._utils, name)
        }

    def _refuse(self, what: str):
        raise CheckpointError(f"{self.source}: {what}; not a YOLOv7 checkpoint")

    def storage(self, key, nbytes) -> None:
        """Count a storage before torch allocates it (each is named once, then referenced)."""
        if key in self.storages:
            return
        self.storages.add(key)
        self.storage_bytes += nbytes
        if len(self.storages) > MAX_TENSORS:
            self._refuse(f"more than {MAX_TENSORS} tensor storages (a training checkpoint: ~1400)")
        if self.storage_bytes > self.max_storage_bytes:
            limit = f"{MAX_TENSOR_BYTES >> 20} MB (yolov7.pt holds 75 MB)"
            if self.max_storage_bytes < MAX_TENSOR_BYTES:
                limit = f"the {self.max_storage_bytes} bytes of the file itself"
            self._refuse(f"its tensors declare {self.storage_bytes} bytes, more than {limit}")

    def module(self) -> None:
        self.modules += 1
        if self.modules > MAX_MODULES:
            self._refuse(f"more than {MAX_MODULES} modules (yolov7.pt has 415 per model)")

    def _checked(self, name, rebuild):
        def checked(storage, offset, size, stride, *rest):
            dtype = rest[2] if name == "_rebuild_tensor_v3" and len(rest) > 2 else None
            self.view(storage, offset, size, stride, dtype)
            return rebuild(storage, offset, size, stride, *rest)

        return checked

    def view(self, storage, offset, size, stride, dtype=None) -> None:
        """A tensor must lie inside its storage: ``set_`` would grow the storage to fit it."""
        if not (isinstance(storage, torch.storage.TypedStorage) and _dims_ok(offset, size, stride)):
            self._refuse(f"a tensor has the layout size={_short(size)}, stride={_short(stride)}")
        itemsize = (dtype if isinstance(dtype, torch.dtype) else storage.dtype).itemsize
        nbytes = storage._untyped_storage.nbytes()  # (TypedStorage.nbytes() warns: deprecated)
        numel = math.prod(size)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if numel and end * itemsize > nbytes:
            self._refuse(
                f"a tensor of shape {tuple(size)} reaches past the end of its storage "
                f"({nbytes} bytes)"
            )
        self.tensors += 1
        self.tensor_bytes += numel * itemsize
        if self.tensors > MAX_TENSORS or self.tensor_bytes > MAX_TENSOR_BYTES:
            self._refuse(
                f"more than {MAX_TENSORS} tensors or {MAX_TENSOR_BYTES >> 20} MB of them "
                "(a YOLOv7 training checkpoint holds ~1400 tensors, ~300 MB)"
            )


def _dims_ok(offset, size, stride) -> bool:
    if not (isinstance(size, tuple) and isinstance(stride, tuple)):
        return False
    if len(size) != len(stride) or len(size) > 8:
        return False
    return all(type(v) is int and v >= 0 for v in (offset, *size, *stride))


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------

_ATOMS = (str, bytes, int, float, bool, type(None))  # what dict keys and set members may be
# what BUILD (set state) may act on; a state_dict is an OrderedDict with a _metadata attribute
_BUILD_TARGETS = (nn.Module, np.ndarray, np.dtype, collections.OrderedDict)


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler: ``find_class`` resolves only the allow-listed globals, and the
    opcodes that call, create, hash or set state check what they are given (module docstring)."""

    source = "<checkpoint>"  # file name used in error messages (set per load)
    budget = None  # the file's _Budget (set per load)
    _torch_persistent_load = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        # protocol 0-2 pickles written by Python 3 name builtins the Python 2 way
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch._utils" and name in self.budget.rebuilders:
            return self.budget.rebuilders[name]
        try:
            return _allowed()[(module, name)]
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

    def _unsafe(self, what: str):
        raise UnsafeCheckpointError(
            f"refusing {self.source}: its pickle {what}, which no official YOLOv7 checkpoint "
            "does; the file was not loaded"
        )

    # -- calling and creating: REDUCE, NEWOBJ, INST/OBJ ------------------------------------
    def _call(self, func, args):
        if id(func) not in _BUILDERS and func not in self.budget.rebuilders.values():
            self._unsafe(f"calls {_short(func)} (calling a class runs its constructor)")
        if (func is set or func is frozenset) and args:
            self._keys(args[0])
        if func is collections.OrderedDict and args:
            self._unsafe("fills an OrderedDict through its constructor")
        try:
            return func(*args)
        except _Refused as e:
            self._unsafe(str(e))

    def _new(self, cls, args=()):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or args:
            self._unsafe(f"creates {_short(cls)} with NEWOBJ{' and arguments' if args else ''}")
        self.budget.module()
        return cls.__new__(cls)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        self.append(self._new(self.stack.pop(), args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):  # protocol 4: NEWOBJ with keyword arguments (none are allowed)
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.append(self._new(self.stack.pop(), args or kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1) end here
        self.append(self._call(klass, tuple(args)) if args else self._new(klass))

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if not isinstance(inst, _BUILD_TARGETS):
            self._unsafe(f"sets the state of a {type(inst).__name__}")
        if isinstance(inst, np.ndarray) and not _small_array_state(state):
            self._unsafe(f"fills a numpy array of more than {MAX_ARRAY_ITEMS} items")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    # -- containers: keys must hash in bounded time, items go into the right kind ----------
    def _keys(self, keys):
        for k in keys:
            if type(k) not in _ATOMS:
                self._unsafe(f"uses a {type(k).__name__} as a dict key or set member")

    def _into(self, target, kind):
        if not isinstance(target, kind):
            self._unsafe(f"adds items to a {type(target).__name__}")
        return target

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._keys([key])
        self._into(self.stack[-1], dict)[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._keys(items[0::2])
        self._into(self.stack[-1], dict).update(zip(items[0::2], items[1::2]))

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        self._keys(items[0::2])
        self.append(dict(zip(items[0::2], items[1::2])))

    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        self._keys(items)
        self._into(self.stack[-1], set).update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        self._keys(items)
        self.append(frozenset(items))

    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_append(self):
        value = self.stack.pop()
        self._into(self.stack[-1], list).append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._into(self.stack[-1], list).extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    # -- tensors: torch installs its storage loader here; each storage is counted first ----
    @property
    def persistent_load(self):
        return self._persistent

    @persistent_load.setter
    def persistent_load(self, torch_persistent_load):
        self._torch_persistent_load = torch_persistent_load

    def _persistent(self, pid):
        if self._torch_persistent_load is None:
            raise pickle.UnpicklingError("unsupported persistent id encountered")
        kind = pid[0] if isinstance(pid, tuple) and len(pid) > 1 else None
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
        if kind == "module":  # legacy files add each module class's source, only to compare it
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):  # (6: legacy, with view metadata)
            self._unsafe(f"has the persistent id {_short(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dtype = getattr(storage_type, "dtype", None)  # FloatStorage... (torch maps the names)
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        if type(key) not in _ATOMS or type(numel) is not int or numel < 0:
            self._unsafe(f"has the storage id {_short(pid)}")
        if not isinstance(dtype, torch.dtype):
            self._unsafe(f"has the storage id {_short(pid)}")
        self.budget.storage(key, numel * dtype.itemsize)
        return self._torch_persistent_load(pid)


def _small_array_state(state) -> bool:
    """numpy's array state is (version, shape, dtype, is_fortran, data), or without version."""
    shape = state[-4] if isinstance(state, tuple) and len(state) in (4, 5) else None
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        return False
    return math.prod(shape) <= MAX_ARRAY_ITEMS


class _LimitedReader:
    """The file as an unpickler reads it: at most MAX_PICKLE_BYTES, checked *before* each read
    (a pickle may declare a 2**60-byte string, and ``file.read(n)`` allocates n bytes)."""

    def __init__(self, file, source: str):
        self.file, self.source, self.left = file, source, MAX_PICKLE_BYTES

    def _take(self, n: int) -> None:
        if n > self.left:
            raise CheckpointError(
                f"{self.source}: a pickle in it is larger than {MAX_PICKLE_BYTES >> 20} MB "
                "(yolov7.pt's is 0.3 MB); not a YOLOv7 checkpoint"
            )
        self.left -= n

    def read(self, n: int) -> bytes:
        self._take(n)
        return self.file.read(n)

    def readline(self) -> bytes:
        line = self.file.readline(self.left + 1)
        self._take(len(line))
        return line


def _restricted_pickle_module(source: str, budget: _Budget) -> types.ModuleType:
    """A stand-in for the ``pickle`` module, to pass as ``torch.load(pickle_module=...)``."""
    mod = types.ModuleType("qcourse_restricted_pickle")
    _allowed()

    class Unpickler(_RestrictedUnpickler):
        def __init__(self, file, **kwargs):
            super().__init__(_LimitedReader(file, source), **kwargs)

    Unpickler.source, Unpickler.budget = source, budget

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    mod.Unpickler = Unpickler
    mod.load = load
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


# ---------------------------------------------------------------------------------------------
# Before the pickle: the container
# ---------------------------------------------------------------------------------------------


def _check_container(f, path: Path) -> None:
    """Refuse every container except the two ``torch.save`` writes, before torch reads it."""
    head = f.read(4)
    f.seek(0)
    if head == b"PK\x03\x04":
        _check_zip(f, path)
    elif _is_tar(f):
        raise CheckpointError(
            f"{path.name} is a tar archive (the torch<0.4 checkpoint format, which unpacks "
            "files to disk); qcourse reads torch.save's zip format (torch>=1.6) and the older "
            "pickle stream: re-save the weights with a current torch"
        )
    elif not head.startswith(b"\x80"):  # pickle protocol 2+, how torch.save wrote before 1.6
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: it starts with neither a zip header "
            "(torch.save) nor a pickle; the file may be truncated or corrupt: download or save "
            "it again"
        )
    f.seek(0)


def _is_tar(f) -> bool:
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # what torch's legacy loader tries first
            # zeros read as the end of an empty archive: a file of zeros is no archive (torch's has files)
            return tar.firstmember is not None
    except tarfile.TarError:
        return False
    finally:
        f.seek(0)


def _check_zip(f, path: Path) -> None:
    """torch.save's zip: a data.pkl, uncompressed records, no TorchScript code."""
    name = path.name
    try:
        infos = zipfile.ZipFile(f).infolist()
        f.seek(0)
        torch_view = set(torch._C.PyTorchFileReader(f).get_all_records())  # torch's reader
    except (zipfile.BadZipFile, RuntimeError, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); the file "
            "may be truncated or corrupt: download or save it again"
        ) from None
    records = {i.filename.split("/", 1)[-1]: i for i in infos}  # without the top folder
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        raise CheckpointError(
            f"{name} is a TorchScript archive (torch.jit.save): loading one runs the "
            "TorchScript code inside it, so qcourse does not open it. qcourse loads only "
            "torch.save checkpoints (official YOLOv7 .pt files, qcourse checkpoints, "
            "state_dicts); if you trust the file, export its weights with "
            "torch.save(torch.jit.load(path).state_dict(), 'weights.pt') and load those"
        )
    if set(records) != torch_view or len(records) != len(infos):  # two readers, one answer
        raise CheckpointError(
            f"{name}: its zip directory reads differently to zipfile and to torch (duplicate or "
            "hidden records); not a file torch.save wrote"
        )
    if len(infos) > MAX_TENSORS + 16:
        raise CheckpointError(
            f"{name}: its zip holds {len(infos)} records (yolov7.pt: ~570); not a YOLOv7 checkpoint"
        )
    size = f.seek(0, os.SEEK_END)
    for info in infos:  # torch.save stores every record as is, so reading one costs its size
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{name}: its zip record {info.filename!r} is compressed ({info.compress_size} "
                f"bytes that unpack to {info.file_size}); torch.save stores records "
                "uncompressed, so this file was not written by it (a zip bomb?)"
            )
        if info.header_offset + info.file_size > size:  # the reader would allocate it first
            raise CheckpointError(
                f"{name}: its zip record {info.filename!r} claims {info.file_size} bytes, past "
                f"the end of the {size}-byte file; the file may be truncated or corrupt"
            )
    pkl = records.get("data.pkl")
    if pkl is None or pkl.file_size > MAX_PICKLE_BYTES:
        what = "has no data.pkl" if pkl is None else f"has a {pkl.file_size}-byte data.pkl"
        raise CheckpointError(
            f"{name}: its zip {what} (yolov7.pt's: 0.3 MB); not a YOLOv7 checkpoint"
        )


def read_checkpoint(path) -> object:
    """Unpickle ``path`` with the restricted unpickler (CPU tensors) and return the raw object.

    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a
    refused global or opcode and :class:`CheckpointError` for anything unreadable, for a
    TorchScript or tar archive, and for a file over the bounds in the module docstring.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (give the path to a .pt file, e.g. yolov7.pt)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give the path to a .pt checkpoint")
    try:  # before the file is opened: a 10 GB file is refused without reading it
        size = check_file_size(path, MAX_FILE_BYTES, "a YOLOv7 checkpoint (yolov7.pt: 72 MiB; a training one "
                               "with ema and the optimizer: about 300 MiB)", "pass a .pt checkpoint such as yolov7.pt")
    except InputFileError as e:
        raise CheckpointError(str(e)) from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or save did not finish")
    with open(path, "rb") as f:  # torch gets this open file: what was checked is what it reads
        _check_container(f, path)
        pickle_module = _restricted_pickle_module(path.name, _Budget(path.name, size))
        try:
            return torch.load(
                f, map_location="cpu", pickle_module=pickle_module, weights_only=False
            )
        except (CheckpointError, PermissionError):
            raise
        except Exception as e:  # anything else torch or pickle raise means an unreadable file
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                f"{str(e)[:300]}); the file may be truncated or corrupt: download or save it "
                "again"
            ) from e


# ---------------------------------------------------------------------------------------------
# From unpickled objects to a qcourse model: bounded walks
# ---------------------------------------------------------------------------------------------


def _not_yolov7(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; not a YOLOv7 checkpoint")


def _tensors_of(root: nn.Module, source: str) -> dict:
    """state_dict of an unpickled module, read from its attribute dicts (no hooks run).

    Each module is walked once. YOLOv7 models are trees, so a module met a second time (a
    cycle, or a branch shared by many parents, which makes a naive walk exponential) is
    refused, unless it is a stateless leaf such as an activation.
    """
    out, seen = {}, {}  # seen: id(module) -> where it was first met

    def walk(m, prefix, depth):
        where = prefix[:-1] or "<root>"
        if depth > MAX_MODULE_DEPTH:
            raise _not_yolov7(source, f"modules nest over {MAX_MODULE_DEPTH} deep at {where!r}")
        params, buffers, children, non_persistent = _module_dicts(m, where, source)
        if id(m) in seen and (params or buffers or children):
            raise CheckpointError(
                f"{source}: the module at {where!r} is the same object as the one at "
                f"{seen[id(m)]!r} (a cycle or a shared branch); YOLOv7 models share no modules"
            )
        seen.setdefault(id(m), where)
        persistent = [(n, b) for n, b in buffers.items() if n not in non_persistent]
        for name, t in [*params.items(), *persistent]:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise _not_yolov7(source, f"{prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach()
            if len(out) > MAX_TENSORS:
                raise _not_yolov7(source, f"the model has over {MAX_TENSORS} tensors (yolov7: 566)")
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, nn.Module):
                kind = type(child).__name__
                raise _not_yolov7(source, f"{prefix}{name} is a {kind}, not a module")
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


def _module_dicts(m: nn.Module, where: str, source: str) -> list:
    """The four containers a module's state lives in, checked to be what nn.Module keeps there."""
    d = m.__dict__
    found = [d.get(k) or {} for k in ("_parameters", "_buffers", "_modules")]
    found.append(d.get("_non_persistent_buffers_set") or set())
    kinds_ok = all(isinstance(x, kind) for x, kind in zip(found, (dict, dict, dict, set)))
    if not kinds_ok or not all(type(k) is str for x in found[:3] for k in x):
        raise _not_yolov7(source, f"the module at {where!r} has malformed state dicts")
    return found


def _check_plain(x, source: str, what: str) -> None:
    """``x`` must be plain data (None, str, int, float, bool, lists, tuples, str-keyed dicts),
    at most MAX_CONFIG_ITEMS items counted on *every* visit (so shared sub-lists, the "billion
    laughs", hit the limit instead of expanding) and at most MAX_CONFIG_DEPTH deep."""
    stack, count = [(x, 0)], 0
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_ITEMS or depth > MAX_CONFIG_DEPTH:
            limit = f"more than {MAX_CONFIG_ITEMS} items"
            if count <= MAX_CONFIG_ITEMS:
                limit = f"deeper than {MAX_CONFIG_DEPTH} levels"
            raise _not_yolov7(
                source, f"{what} nests {limit} (YOLOv7's configuration: ~1500 items, 4 levels)"
            )
        if type(v) in (list, tuple):
            stack.extend((e, depth + 1) for e in v[: MAX_CONFIG_ITEMS + 1])
        elif type(v) is dict:
            if not all(type(k) is str for k in v):
                raise CheckpointError(f"{source}: {what} has a dict with non-string keys")
            stack.extend((e, depth + 1) for e in v.values())
        elif type(v) not in (str, int, float, bool, type(None)):
            raise CheckpointError(
                f"{source}: {what} holds a {type(v).__name__}; expected plain lists, numbers "
                "and strings"
            )


# ---------------------------------------------------------------------------------------------
# The layer configuration: bounded by a known architecture, checked before building
# ---------------------------------------------------------------------------------------------

_KNOWN = "qcourse implements yolov7 and yolov7-tiny (and their -deploy variants)"
_WIDTH_MODULES = ("Conv", "RepConv", "SPPCSPC")  # their first argument is the output channels


def _check_config(cfg, source: str) -> None:
    """Refuse a configuration that is not a known architecture or a narrower copy of one."""
    _check_plain(cfg, source, "the model configuration")
    if not isinstance(cfg, dict) or not all(
        isinstance(cfg.get(k), (list, tuple)) for k in ("backbone", "head")
    ):
        raise CheckpointError(
            f"{source}: the model configuration is not a dict with 'backbone' and 'head' lists"
        )
    layers = [*cfg["backbone"], *cfg["head"]]
    arch = _reference_architecture(layers, source)
    known = ARCHITECTURES[arch]
    for key, unit, top, default in (
        ("nc", "classes", MAX_CLASSES, None), ("ch", "input channels", MAX_INPUT_CHANNELS, 3)
    ):
        value = cfg.get(key, default)
        if type(value) is not int or not 1 <= value <= top:
            raise _not_yolov7(source, f"{key}={_short(value)} {unit}; a checkpoint has 1 to {top}")
    for key in ("depth_multiple", "width_multiple"):
        v = cfg.get(key, 1.0)
        if type(v) not in (int, float) or not 0 < v <= known[key]:
            raise CheckpointError(
                f"{source}: {key}={_short(v)}; {arch} has {known[key]} and a checkpoint may "
                "only be narrower or shallower"
            )
    _check_anchors(cfg.get("anchors"), known["anchors"], arch, source)
    for i, (layer, ref) in enumerate(zip(layers, known["backbone"] + known["head"])):
        _check_layer(i, layer, ref, arch, source)


def _n_layers(cfg: dict) -> int:
    return len(cfg["backbone"]) + len(cfg["head"])


def _reference_architecture(layers: list, source: str) -> str:
    """The known architecture with as many layers and the same head module (else the first)."""
    same_length = [a for a, c in ARCHITECTURES.items() if _n_layers(c) == len(layers)]
    if not same_length:
        sizes = ", ".join(f"{a} {_n_layers(c)}" for a, c in ARCHITECTURES.items())
        raise UnsupportedArchitectureError(
            f"{source}: the configuration has {len(layers)} layers ({sizes}); {_KNOWN}"
        )
    last = layers[-1]
    head = last[2] if isinstance(last, (list, tuple)) and len(last) == 4 else None
    return next((a for a in same_length if ARCHITECTURES[a]["head"][-1][2] == head), same_length[0])


def _as_lists(x):
    return [_as_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _check_layer(i: int, layer, ref: list, arch: str, source: str) -> None:
    """Layer ``i`` must be ``ref`` (layer ``i`` of ``arch``), with at most as many output
    channels and repeats: then it costs no more memory than ``arch``'s own layer."""
    if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[3], list)):
        raise UnsupportedArchitectureError(
            f"{source}: layer {i} is {_short(layer)}; expected [from, number, module, args]"
        )
    f, n, m, args = _as_lists(layer)
    rf, rn, rm, rargs = ref
    at = f"{source}: layer {i} ({m})"
    if m != rm:
        raise UnsupportedArchitectureError(
            f"{source}: layer {i} uses module {_short(m)} where {arch} has {rm!r}; {_KNOWN}"
        )
    if f != _as_lists(rf) or len(args) != len(rargs):
        what, known = ("reads from", rf) if f != _as_lists(rf) else ("has arguments", rargs)
        raise UnsupportedArchitectureError(
            f"{at} {what} {_short(f if what == 'reads from' else args)} where {arch} {what} "
            f"{known}; {_KNOWN}"
        )
    if type(n) is not int or not 1 <= n <= rn:
        raise CheckpointError(
            f"{at} repeats {_short(n)} times where {arch} has {rn}; not a YOLOv7 checkpoint"
        )
    for j, (a, ra) in enumerate(zip(args, rargs)):
        if j == 0 and m in _WIDTH_MODULES:  # a narrower layer is fine, a wider one is no YOLOv7
            if type(a) is not int or not 1 <= a <= ra:
                raise CheckpointError(
                    f"{at} asks for {_short(a)} output channels where {arch} has {ra}; not a "
                    "YOLOv7 checkpoint"
                )
        elif a != _as_lists(ra):
            raise UnsupportedArchitectureError(
                f"{at} has argument {_short(a)} where {arch} has {ra!r}; {_KNOWN}"
            )


def _check_anchors(anchors, known: list, arch: str, source: str) -> None:
    """As many levels and anchors as ``arch`` (they set the head's size), positive and finite."""
    shape = [len(level) for level in known]
    ok = isinstance(anchors, (list, tuple)) and shape == [
        len(a) if isinstance(a, (list, tuple)) else -1 for a in anchors
    ]
    if ok:
        values = [v for level in anchors for v in level]
        ok = all(type(v) in (int, float) and math.isfinite(v) and 0 < v <= 1e5 for v in values)
    if not ok:
        raise _not_yolov7(
            source,
            f"anchors {_short(anchors)} are not {len(shape)} lists of {shape[0]} positive pixel "
            f"sizes as in {arch}",
        )


# ---------------------------------------------------------------------------------------------
# From unpickled objects to a qcourse model
# ---------------------------------------------------------------------------------------------


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
        if w.dim() != 4 or tuple(grid.shape) != (3, 1, 3, 1, 1, 2):  # 3 levels x 3 anchors
            raise StateDictMismatchError(
                f"model.{head}.m.0.weight has shape {tuple(w.shape)} and model.{head}.anchor_grid "
                f"{tuple(grid.shape)}; a YOLOv7 head has (3 * (5 + nc), C, 1, 1) and "
                "(3, 1, 3, 1, 1, 2)"
            )
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
    return any(
        k.endswith(".conv.bias") and k[: -len("conv.bias")] + "bn.weight" not in sd for k in sd
    )


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
            parts.append(f"{len(unexpected)} unexpected keys (first: {_short(unexpected[0])})")
        raise StateDictMismatchError(
            f"{source}: state_dict does not fit {desc}: " + "; ".join(parts)
        )
    for k, v in expected.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise StateDictMismatchError(f"{source}: {k!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(v.shape):
            raise StateDictMismatchError(
                f"{source}: key {k!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(v.shape)} in {desc}"
            )
    _check_finite(sd, list(expected), source)  # after the shapes: every tensor is model-sized
    model.load_state_dict(
        {k: (t.float() if t.is_floating_point() else t) for k, t in sd.items()}, strict=True
    )


def _check_finite(sd: dict, keys: list, source: str) -> None:
    """NaN or inf weights load without complaint and evaluate to mAP 0: refuse them."""
    bad = [k for k in keys if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()]
    if bad:
        first = ", ".join(repr(k) for k in bad[:3])
        raise CheckpointError(
            f"{source}: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN or inf "
            f"values (first: {first}); the weights are unusable (a diverged training run or a "
            "broken conversion): load another checkpoint"
        )


def _names(names, nc):
    """Class names as a list of nc strings, or None (from a file: only strings and small ints)."""
    if isinstance(names, dict) and all(type(k) is int for k in names):
        names = [names[i] for i in range(nc)] if sorted(names) == list(range(nc)) else None
    if not isinstance(names, (list, tuple)) or len(names) != nc:
        return None
    if not all(type(n) is str or (type(n) is int and abs(n) < 1 << 63) for n in names):
        return None
    return [str(n) for n in names]


def _build(cfg, names, source) -> Model:
    _check_config(cfg, source)  # before anything is built: the size is bounded by a known model
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


def _from_qcourse(obj: dict, source: str) -> Model:
    version = obj.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format version {_short(version)} is newer than this qcourse understands "
            f"({FORMAT_VERSION}); upgrade qcourse"
        )
    sd = obj.get("state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: the qcourse checkpoint has no state_dict")
    model = _build(obj.get("cfg"), obj.get("names"), source)
    if obj.get("fused") is True:
        model.fuse()
    _load_into(model, sd, source)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    _check_plain(meta, source, "the metadata")
    model.meta = {"source": "qcourse", "format_version": version, **meta}
    return model


def _from_official(obj, source: str) -> Model:
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
    elif _is_state_dict(src):
        sd, names = src, None
        _, cfg = _detect(sd, source)
    else:
        found = type(obj).__name__
        if isinstance(obj, dict):
            found = sorted(k for k in obj if type(k) is str)[:20]
        raise CheckpointError(
            f"{source} is a PyTorch file but not a YOLOv7 checkpoint: expected a dict with a "
            f"'model' entry (official) or a qcourse checkpoint, found {_short(found)}"
        )
    model = _build(cfg, names, source)
    if _looks_fused(sd):
        model.fuse()
    _load_into(model, sd, source)
    meta = {"source": "yolov7"}
    for key in ("epoch", "updates"):
        if type(ckpt.get(key)) is int:
            meta[key] = ckpt[key]
    if ckpt:
        meta["from_ema"] = ckpt.get("ema") is not None
    model.meta = meta
    return model


def _is_state_dict(x) -> bool:
    return isinstance(x, dict) and bool(x) and all(
        type(k) is str and isinstance(v, torch.Tensor) for k, v in x.items()
    )


def _model_from_object(obj, source: str) -> Model:
    if isinstance(obj, dict) and type(obj.get("format")) is str and obj["format"] == FORMAT:
        return _from_qcourse(obj, source)
    if isinstance(obj, dict) and obj.get("format") == QUANTIZED_FORMAT:
        # its weights alone would evaluate as FP32 under an INT8 name: refuse, say what loads it
        raise CheckpointError(
            f"{source} is a calibrated INT8 checkpoint written by `qcourse ptq`; load it with "
            "qcourse.yolo.ptq.load_quantized (it restores the quantizers and their amax)"
        )
    return _from_official(obj, source)


#: the format tag of calibrated quantized checkpoints (:mod:`qcourse.yolo.ptq`): a qcourse
#: checkpoint dict (float weights) plus a ``quantization`` entry of plain data and tensors
QUANTIZED_FORMAT = "qcourse.yolo.ptq"


def float_model_from_checkpoint(obj: dict, source: str) -> Model:
    """The float model inside a qcourse or quantized checkpoint dict from :func:`read_checkpoint`.

    Used by :func:`qcourse.yolo.ptq.load_quantized`, which then restores the quantizers; the
    configuration and every tensor are checked as for :func:`load_checkpoint`.
    """
    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT, QUANTIZED_FORMAT):
        raise CheckpointError(f"{source} is not a qcourse checkpoint (no format tag {FORMAT!r})")
    model = _from_qcourse(obj, source)
    return model.float().eval()


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

    Returns a :class:`~qcourse.yolo.models.yolo.Model` in eval mode with ``nc``, ``names``,
    ``arch`` and ``meta`` (metadata stored with the checkpoint) set. Raises
    ``FileNotFoundError``, :class:`UnsafeCheckpointError`, :class:`CheckpointError`,
    :class:`StateDictMismatchError` or
    :class:`~qcourse.yolo.models.yolo.UnsupportedArchitectureError` with the file name and the cause.
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
            f"save_checkpoint needs a qcourse.yolo.models Model, got {type(model).__name__}"
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
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)
    return path

