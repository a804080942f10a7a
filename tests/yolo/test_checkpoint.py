"""Tests for qcourse.yolo.models checkpoints: official pickles via the restricted unpickler,
qcourse's own format, malicious pickles and broken files.

Official-style checkpoints are written here the way the official ``train.py`` and
``strip_optimizer`` write them: a dict whose ``'model'`` is a pickled FP16 model whose
classes live in ``models.yolo`` / ``models.common``. Throw-away classes with those module
names are registered in ``sys.modules`` only while saving (and for one control load that
shows a payload really runs when unpickled normally) and removed before qcourse loads.
"""
import contextlib
import copy
import os
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qcourse.yolo.models as M
from qcourse.yolo.models import (
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    load_checkpoint,
    save_checkpoint,
)

_OFFICIAL = {
    M.Model: "models.yolo", M.Detect: "models.yolo", M.IDetect: "models.yolo",
    M.Conv: "models.common", M.Concat: "models.common", M.MP: "models.common",
    M.SP: "models.common", M.SPPCSPC: "models.common", M.RepConv: "models.common",
    M.ImplicitA: "models.common", M.ImplicitM: "models.common",
}
_QCOURSE_ONLY = {"froms", "arch", "meta", "fused"}  # attributes the official classes lack


@contextlib.contextmanager
def official_modules():
    """Fake ``models``, ``models.yolo``, ``models.common`` with stand-in classes."""
    names = ("models", "models.yolo", "models.common")
    saved = {n: sys.modules.get(n) for n in names}
    pkg = types.ModuleType("models")
    pkg.__path__ = []
    mods = {n: types.ModuleType(n) for n in ("models.yolo", "models.common")}
    pkg.yolo, pkg.common = mods["models.yolo"], mods["models.common"]
    mapping = {}
    for cls, modname in _OFFICIAL.items():
        fake = type(cls.__name__, (nn.Module,), {"__module__": modname})
        setattr(mods[modname], cls.__name__, fake)
        mapping[cls] = fake
    sys.modules["models"] = pkg
    sys.modules.update(mods)
    try:
        yield mapping
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def as_official(model, mapping, **extra_attrs):
    """FP16 deep copy of ``model`` whose modules are instances of the official stand-ins."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad = False  # as strip_optimizer leaves them
    for mod in m.modules():
        if type(mod) in mapping:
            for attr in _QCOURSE_ONLY & set(mod.__dict__):
                del mod.__dict__[attr]
            mod.__class__ = mapping[type(mod)]
    # attributes the official train.py attaches to the model
    m.hyp = {"lr0": 0.01, "box": 0.05, "anchor_t": 4.0}
    m.gr = 1.0
    m.class_weights = torch.ones(model.nc).half()
    m.traced = False
    for k, v in extra_attrs.items():
        setattr(m, k, v)
    return m


def write_official(path, model, *, ema=None, payload=None, yaml=None, legacy=False):
    """torch.save a checkpoint laid out like a stripped official one."""
    with official_modules() as mapping:
        m = as_official(model, mapping)
        if yaml is not None:
            m.yaml = yaml
        if payload is not None:
            m.hyp["note"] = payload
        ckpt = {
            "epoch": -1,
            "best_fitness": np.array([0.51]),
            "training_results": None,
            "model": m,
            "ema": as_official(ema, mapping) if ema is not None else None,
            "updates": None,
            "optimizer": None,
            "wandb_id": None,
        }
        # legacy=True: the pre-1.6 non-zip container, which torch reads through pickle_module.load
        with warnings.catch_warnings():  # legacy saves want class source code; fakes have none
            warnings.simplefilter("ignore", UserWarning)
            torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert "models" not in sys.modules and "models.yolo" not in sys.modules


def fp16_reference(model):
    """``model`` with its tensors rounded through FP16 (what an FP16 checkpoint holds)."""
    ref = copy.deepcopy(model).eval()
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                         for k, v in model.state_dict().items()})
    return ref


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def tiny3():
    torch.manual_seed(0)
    return randomise(M.yolov7_tiny(nc=3, names=["circle", "square", "triangle"]), 1).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(1, 3, 64, 64)


def outputs(model, x):
    with torch.no_grad():
        return model(x)[0]


# --------------------------------------------------------------------------------- official


def test_official_tiny_checkpoint_loads_to_same_outputs(tmp_path, tiny3, x):
    path = tmp_path / "yolov7-tiny.pt"
    write_official(path, tiny3)
    loaded = load_checkpoint(path)
    assert type(loaded) is M.Model and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.arch == "yolov7-tiny" and loaded.nc == 3
    assert loaded.names == ["circle", "square", "triangle"]
    assert loaded.meta == {"source": "yolov7", "epoch": -1, "from_ema": False}
    torch.testing.assert_close(outputs(loaded, x), outputs(fp16_reference(tiny3), x), rtol=0, atol=0)
    # and the FP16 rounding is visible against the FP32 original, so the check can fail
    assert not torch.equal(outputs(loaded, x), outputs(tiny3, x))
    assert "models" not in sys.modules
    legacy = tmp_path / "legacy.pt"
    write_official(legacy, tiny3, legacy=True)
    torch.testing.assert_close(outputs(load_checkpoint(legacy), x), outputs(loaded, x), rtol=0, atol=0)


def test_official_yolov7_checkpoint_loads_strictly(tmp_path, x):
    torch.manual_seed(3)
    model = M.yolov7(nc=80)
    path = tmp_path / "yolov7.pt"
    write_official(path, model)
    loaded = load_checkpoint(path)
    assert loaded.arch == "yolov7" and loaded.nc == 80 and not loaded.training
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                           for k, v in model.state_dict().items()})
    torch.testing.assert_close(outputs(loaded, x), outputs(model.eval(), x), rtol=0, atol=0)


def test_ema_is_preferred_like_official_attempt_load(tmp_path, tiny3, x):
    other = randomise(copy.deepcopy(tiny3), 2)
    path = tmp_path / "last.pt"
    write_official(path, tiny3, ema=other)
    loaded = load_checkpoint(path)
    assert loaded.meta["from_ema"] is True
    torch.testing.assert_close(outputs(loaded, x), outputs(fp16_reference(other), x), rtol=0, atol=0)


def test_bare_state_dict_files_are_recognised(tmp_path, tiny3, x):
    p1 = tmp_path / "sd.pt"
    torch.save(tiny3.state_dict(), p1)
    p2 = tmp_path / "wrapped.pt"
    torch.save({"model": tiny3.state_dict(), "epoch": 3}, p2)
    for p in (p1, p2):
        loaded = load_checkpoint(p)
        assert loaded.arch == "yolov7-tiny" and loaded.nc == 3
        torch.testing.assert_close(outputs(loaded, x), outputs(tiny3, x), rtol=0, atol=0)
    fused = copy.deepcopy(tiny3).fuse()
    p3 = tmp_path / "fused_sd.pt"
    torch.save(fused.state_dict(), p3)
    # folded Conv+BN shows in the keys; a fused file also has its IDetect folded (qcourse and
    # the official fuse() fold all three), so the implicit layers must not be applied again
    loaded = load_checkpoint(p3)
    assert loaded.model[0].fused and loaded.model[77].fused
    torch.testing.assert_close(outputs(loaded, x), outputs(fused, x), rtol=0, atol=0)


# --------------------------------------------------------------------------------- qcourse format


def test_qcourse_checkpoint_round_trip_and_weights_only(tmp_path, tiny3, x):
    path = save_checkpoint(tiny3, tmp_path / "own.pt", img_size=160, epochs=3, note="test")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == M.FORMAT and raw["arch"] == "yolov7-tiny" and raw["nc"] == 3
    assert raw["names"] == ["circle", "square", "triangle"]
    assert raw["meta"] == {"img_size": 160, "epochs": 3, "note": "test"}
    assert type(raw["state_dict"]) is dict and raw["dtype"] == "float32"
    loaded = load_checkpoint(path)
    assert loaded.meta["img_size"] == 160 and loaded.meta["source"] == "qcourse"
    torch.testing.assert_close(outputs(loaded, x), outputs(tiny3, x), rtol=0, atol=0)
    assert not (tmp_path / "own.pt.tmp").exists()


def test_qcourse_checkpoint_half_and_fused(tmp_path, tiny3, x):
    full = save_checkpoint(tiny3, tmp_path / "full.pt")
    half = save_checkpoint(tiny3, tmp_path / "half.pt", half=True)
    assert os.path.getsize(half) < 0.55 * os.path.getsize(full)
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(outputs(loaded, x), outputs(fp16_reference(tiny3), x), rtol=0, atol=0)
    fused = copy.deepcopy(tiny3).fuse()
    path = save_checkpoint(fused, tmp_path / "fused.pt", names=["a", "b", "c"])
    loaded = load_checkpoint(path)
    assert loaded.fused and loaded.model[77].fused and loaded.names == ["a", "b", "c"]
    torch.testing.assert_close(outputs(loaded, x), outputs(fused, x), rtol=0, atol=0)


def test_save_checkpoint_rejects_bad_metadata(tmp_path, tiny3):
    with pytest.raises(ValueError, match="metadata when=.* not JSON-serialisable"):
        save_checkpoint(tiny3, tmp_path / "a.pt", when=object())
    with pytest.raises(ValueError, match="names must be a list of 3 class names"):
        save_checkpoint(tiny3, tmp_path / "a.pt", names=["a"])
    with pytest.raises(TypeError, match="needs a qcourse.yolo.models Model"):
        save_checkpoint(nn.Conv2d(1, 1, 1), tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


# --------------------------------------------------------------------------------- malicious


class _Payload:
    """Unpickling this calls ``func(arg)``: a stand-in for a hostile checkpoint."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    import builtins
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "builtins.eval": (
            _Payload(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"),
            "builtins.eval",
        ),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_official_checkpoint_is_refused(tmp_path, tiny3, kind):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)[kind]
    path = tmp_path / "yolov7.pt"
    write_official(path, tiny3, payload=payload)
    # control: an ordinary unpickling of this very file runs the payload
    with official_modules():
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(err.value)
    assert f"refusing to load global '{global_name}' from yolov7.pt" in msg
    assert isinstance(err.value, pickle.UnpicklingError)


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)["builtins.eval"]
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": payload}, protocol=2))
    expected = f"refusing to load global '{global_name}' from evil.pt"
    with pytest.raises(UnsafeCheckpointError, match=expected):
        load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # control: the payload is live
    assert marker.exists()


def test_bound_method_reference_is_refused(tmp_path, tiny3):
    # the official Model.fuse() stores ``m.forward = m.fuseforward``; pickling that needs
    # builtins.getattr, which could reach anything, so such files are refused too
    path = tmp_path / "fused_official.pt"
    with official_modules() as mapping:
        m = as_official(tiny3, mapping)
        conv = m.model[0]
        conv.forward = conv.train  # any bound method pickles through getattr
        torch.save({"model": m}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global 'builtins.getattr'"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------- broken files


def test_missing_and_corrupt_files(tmp_path, tiny3):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is empty"):
        load_checkpoint(empty)
    good = save_checkpoint(tiny3, tmp_path / "good.pt")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(noise)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="map_location must be a device string"):
        load_checkpoint(good, map_location={"cuda:0": "cpu"})


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(CheckpointError, match="tensor.pt is a PyTorch file but not a YOLOv7 checkpoint"):
        load_checkpoint(p)
    p = tmp_path / "dict.pt"
    torch.save({"weights": [1, 2]}, p)
    with pytest.raises(CheckpointError, match=r"found \['weights'\]"):
        load_checkpoint(p)


def test_unknown_architecture(tmp_path, tiny3):
    yaml = copy.deepcopy(tiny3.yaml)
    yaml["backbone"][0][2] = "ReOrg"
    path = tmp_path / "odd.pt"
    write_official(path, tiny3, yaml=yaml)
    with pytest.raises(UnsupportedArchitectureError, match="odd.pt: layer 0 uses module 'ReOrg'"):
        load_checkpoint(path)
    p = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, p)
    with pytest.raises(UnsupportedArchitectureError, match="resnet.pt: cannot recognise the arch"):
        load_checkpoint(p)


def test_state_dict_shape_mismatch_names_key_and_shapes(tmp_path, tiny3):
    yaml = copy.deepcopy(tiny3.yaml)
    yaml["nc"] = 80  # declares 80 classes, holds a 3-class head
    path = tmp_path / "mixed.pt"
    write_official(path, tiny3, yaml=yaml)
    with pytest.raises(StateDictMismatchError) as err:
        load_checkpoint(path)
    assert ("mixed.pt: key 'model.77.m.0.weight' has shape (24, 128, 1, 1) in the checkpoint "
            "but (255, 128, 1, 1) in the yolov7-tiny architecture (nc=80)") in str(err.value)
    own = save_checkpoint(tiny3, tmp_path / "own.pt")
    ckpt = torch.load(own, weights_only=True)
    ckpt["state_dict"]["model.37.conv.weight"] = torch.zeros(128, 512, 1, 1)
    torch.save(ckpt, own)
    expected = (r"'model.37.conv.weight' has shape \(128, 512, 1, 1\) in the checkpoint "
                r"but \(256, 512, 1, 1\)")
    with pytest.raises(StateDictMismatchError, match=expected):
        load_checkpoint(own)
    del ckpt["state_dict"]["model.37.conv.weight"]
    torch.save(ckpt, own)
    with pytest.raises(StateDictMismatchError, match="1 keys missing .first: 'model.37.conv.weight'"):
        load_checkpoint(own)
