"""Adversarial checkpoints: files that try to run code, hang the loader, exhaust its memory or
smuggle in unusable weights. Every payload is generated here, in a temporary directory.

The files that would hang or exhaust memory are loaded in one child process (see
:func:`bomb_outcomes`) under a per-file alarm and an address-space limit of 1.5 GB above what
importing torch takes, so a regression fails these tests instead of freezing the machine.
Each test names the cost a naive loader pays, and a control shows the payload carries it.
"""
import collections
import copy
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn

import qcourse.yolo.models as M
from qcourse.yolo.models import CheckpointError, get_config, load_checkpoint, save_checkpoint
from test_checkpoint import as_official, official_modules, write_official


@pytest.fixture(scope="module")
def tiny3():
    torch.manual_seed(0)
    return M.yolov7_tiny(nc=3, names=["circle", "square", "triangle"]).eval()


# --------------------------------------------------------------------------------- containers


class MarkerOnLoad(nn.Module):
    """A TorchScript module whose ``__setstate__`` creates a file when the archive is loaded
    (``torch.from_file(path, shared=True, size)`` creates it): code run by ``torch.jit.load``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.t = torch.zeros(1)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.t = torch.from_file(state[0], True, 16)


def test_torchscript_archive_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with warnings.catch_warnings():  # torch.jit.* are deprecated
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(MarkerOnLoad(str(marker))), str(path))
        assert not marker.exists()
        torch.jit.load(str(path))  # control: loading the archive runs its code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(err.value)
    assert "evil.pt is a TorchScript archive (torch.jit.save)" in msg
    assert "torch.save(torch.jit.load(path).state_dict()" in msg


def test_tar_archive_is_refused(tmp_path):
    # the torch<0.4 format, which torch.load unpacks to a temporary directory
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    with pytest.raises(CheckpointError, match=r"old\.pt is a tar archive \(the torch<0\.4"):
        load_checkpoint(path)


def test_content_not_name_decides_the_container(tmp_path, tiny3):
    # torch.load dispatches a *path* ending in .safetensors to another loader; qcourse hands
    # torch the open file, so a torch.save checkpoint loads whatever it is called
    path = save_checkpoint(tiny3, tmp_path / "weights.safetensors")
    assert load_checkpoint(path).nc == 3


# --------------------------------------------------------------------------------- bombs
#
# Each builder writes one file and returns (file name, what a naive loader pays).


def _laughs(depth, width):
    """Nested lists where each level holds ``width`` references to the level below."""
    x = []
    for _ in range(depth):
        x = [x] * width
    return x


def _qcourse_dict(cfg, **extra):
    return {"format": M.FORMAT, "format_version": 1, "cfg": cfg, "state_dict": {}, **extra}


def billion_laughs_cfg(d):
    cfg = {"nc": 3, "anchors": [[1, 2]], "backbone": _laughs(7, 30), "head": []}
    torch.save(_qcourse_dict(cfg), d / "laughs.pt", _use_new_zipfile_serialization=False)
    return "laughs.pt", "30**7 = 2 * 10**10 list items to walk"


def module_dag(d):
    m = nn.Conv2d(1, 1, 1)
    for _ in range(15):  # every level holds the level below 10 times
        parent = nn.Sequential()
        parent._modules = collections.OrderedDict((str(i), m) for i in range(10))
        m = parent
    torch.save({"model": m}, d / "dag.pt")
    return "dag.pt", "10**15 module paths to walk"


def module_cycle(d):
    m = nn.Sequential()
    m._modules["0"] = m
    torch.save({"model": m}, d / "cycle.pt")
    return "cycle.pt", "an endless walk (RecursionError)"


def huge_conv_cfg(d):
    cfg = get_config("yolov7-tiny", 3)
    cfg["backbone"][4][3][0] = cfg["backbone"][5][3][0] = 18000  # 3x3 convs 32 -> 18000 -> 18000
    torch.save(_qcourse_dict(cfg), d / "conv.pt")
    return "conv.pt", f"{18000 * 18000 * 9 * 4 / 1e9:.1f} GB of weights to build"


def huge_repeat_cfg(d):
    cfg = get_config("yolov7-tiny", 3)
    cfg["backbone"][0][1] = 10**7
    torch.save(_qcourse_dict(cfg), d / "repeat.pt")
    return "repeat.pt", "10**7 Conv modules to build"


_GIB = 1 << 30
_ZEROS = bytes(16 << 20)


def _zeros_deflated(prefix=b""):
    """(raw deflate stream, size, crc32) of ``prefix`` + 1 GiB of zeros, in about 1 MB.

    Blocks that end in a full flush refer to nothing before them, so one compressed 16 MiB
    block of zeros can be repeated; the zeros are never held in memory."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    count = _GIB // len(_ZEROS)
    stream = (
        head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
        + (block.compress(_ZEROS) + block.flush(zlib.Z_FULL_FLUSH)) * count
        + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the final (empty) block
    )
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(_ZEROS, crc)
    return stream, len(prefix) + _GIB, crc


def _stored(name, data):
    return name, data, len(data), zlib.crc32(data), 0


def _write_zip(path, records):
    """A zip written field by field, so a record can carry a deflate stream made elsewhere.
    ``records``: (name, payload, uncompressed size, crc32, method 0=stored/8=deflated)."""
    out, central = bytearray(), bytearray()
    for name, payload, size, crc, method in records:
        n, offset = name.encode(), len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc,
                           len(payload), size, len(n), 0) + n + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21,
                               crc, len(payload), size, len(n), 0, 0, 0, 0, 0, offset) + n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central),
                      len(out), 0)
    Path(path).write_bytes(bytes(out + central + end))


def _torch_zip(path, data_pkl, *records):
    _write_zip(path, [_stored("archive/data.pkl", data_pkl), *records,
                      _stored("archive/version", b"3\n"), _stored("archive/byteorder", b"little")])


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _View:
    """Pickles as torch's own tensor rebuild call, with any size and stride."""

    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


def _torch_pickle(obj, legacy=False):
    """A pickle as torch.save writes it: storages as persistent ids (zip: data.pkl; legacy:
    the object's pickle in the stream, whose storage ids carry one more field)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, x):
            if isinstance(x, _Storage):
                return ("storage", torch.FloatStorage, x.key, "cpu", x.numel) + (None,) * legacy
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _torch_legacy(path, obj, storages):
    """torch.save's pre-1.6 stream: magic, version, sys info, the object, storage keys, data."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    head = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info]
    data = b"".join(pickle.dumps(x, protocol=2) for x in head) + _torch_pickle(obj, legacy=True)
    data += pickle.dumps(list(storages), protocol=2)
    for raw in storages.values():
        data += struct.pack("<q", len(raw) // 4) + raw
    Path(path).write_bytes(data)


def zip_bomb_pickle(d):
    # data.pkl: a valid pickle followed by 1 GiB of zeros (unpickling stops at the pickle's end)
    stream, size, crc = _zeros_deflated(pickle.dumps({"note": "hello"}, protocol=2))
    _write_zip(d / "bomb_pkl.pt", [("archive/data.pkl", stream, size, crc, 8),
                                   _stored("archive/version", b"3\n")])
    return "bomb_pkl.pt", "1 GiB unpacked from a 1 MB record"


def zip_bomb_storage(d):
    stream, size, crc = _zeros_deflated()
    pkl = _torch_pickle({"w": _View(_Storage("0", _GIB // 4), (_GIB // 4,), (1,))})
    _torch_zip(d / "bomb_storage.pt", pkl, ("archive/data/0", stream, size, crc, 8))
    return "bomb_storage.pt", "1 GiB unpacked from a 1 MB record"


def view_outside_storage(d):
    # a 2-element view with a 2**31 stride on a 1-element storage: Tensor.set_ grows the
    # storage to 8 GB to make the view fit (legacy storages are resizable, zip records not)
    view = _View(_Storage("0", 1), (2,), (1 << 31,))
    _torch_legacy(d / "view.pt", {"w": view}, {"0": bytes(4)})
    return "view.pt", "8 GB storage resize"


class _Call:
    """Unpickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def reduce_calls_class(d):
    # an allowed class, *called* (REDUCE) instead of created empty (NEWOBJ): runs Conv2d.__init__
    payload = {"model": _Call(nn.Conv2d, 9000, 9000, 3)}
    (d / "conv2d.pt").write_bytes(pickle.dumps(payload, protocol=2))
    return "conv2d.pt", f"{9000 * 9000 * 9 * 4 / 1e9:.1f} GB of weights to initialise"


def huge_bytes_declared(d):
    # BINBYTES8 declaring 2**40 bytes: file.read(n) allocates n bytes before reading
    (d / "bytes.pt").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x.")
    return "bytes.pt", "a 1 TiB read"


def hash_bomb_key(d):
    # a dict key nested 30 levels, each repeating the one below 10 times: hashing it visits
    # 10**30 tuples (in C: no alarm interrupts it, so it runs last). Building the dict here
    # would hash the key too, so the pickle is assembled by hand: EMPTY_DICT MARK key 1 SETITEMS.
    key = ()
    for _ in range(30):
        key = (key,) * 10
    body = pickle.dumps(key, protocol=2)[2:-1]
    (d / "hash.pt").write_bytes(b"\x80\x02}(" + body + b"K\x01u.")
    return "hash.pt", "10**30 tuple hashes"


BOMBS = {  # builder, the error qcourse gives
    "billion_laughs_cfg": (billion_laughs_cfg,
                           r"laughs\.pt: the model configuration nests more than 10000 items"),
    "module_dag": (module_dag, r"dag\.pt: the module at '(0\.){14}1' is the same object as the "
                               r"one at '(0\.){14}0' \(a cycle or a shared branch\)"),
    "module_cycle": (module_cycle, r"cycle\.pt: the module at '0' is the same object as the one "
                                   r"at '<root>' \(a cycle or a shared branch\)"),
    "huge_conv_cfg": (huge_conv_cfg, r"conv\.pt: layer 4 \(Conv\) asks for 18000 output channels "
                                     r"where yolov7-tiny has 32"),
    "huge_repeat_cfg": (huge_repeat_cfg, r"repeat\.pt: layer 0 \(Conv\) repeats 10000000 times "
                                         r"where yolov7-tiny has 1"),
    "zip_bomb_pickle": (zip_bomb_pickle, r"bomb_pkl\.pt: its zip record 'archive/data\.pkl' is "
                                         r"compressed \(\d+ bytes that unpack to 1073741\d\d\d\)"),
    "zip_bomb_storage": (zip_bomb_storage, r"bomb_storage\.pt: its zip record 'archive/data/0' "
                                           r"is compressed"),
    "view_outside_storage": (view_outside_storage, r"view\.pt: a tensor of shape \(2,\) reaches "
                                                   r"past the end of its storage \(4 bytes\)"),
    "reduce_calls_class": (reduce_calls_class, r"refusing conv2d\.pt: its pickle calls <class "
                                               r"'torch\.nn\.modules\.conv\.Conv2d'>"),
    "huge_bytes_declared": (huge_bytes_declared, r"bytes\.pt: a pickle in it is larger than 4 MB"),
    "hash_bomb_key": (hash_bomb_key, r"refusing hash\.pt: its pickle uses a tuple as a dict key"),
}

_CHILD = r"""
import json, signal, sys, time, warnings
warnings.simplefilter("ignore")
import qcourse.yolo.models as M

def status(key):  # kB, from /proc/self/status (Linux); None elsewhere
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None

try:  # cap the address space 1.5 GB above what the imports take
    import resource
    limit = status("VmSize") * 1024 + (1536 << 20)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 or hard > limit else hard, hard))
except (ImportError, TypeError):
    pass

def alarm(*_):
    raise TimeoutError("still loading after %d s" % PER_FILE)

ALARM = hasattr(signal, "SIGALRM")  # elsewhere the parent's timeout still bounds the run
if ALARM:
    signal.signal(signal.SIGALRM, alarm)
for name, path in json.loads(sys.argv[1]):
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM)
            f.write("5")
        rss = status("VmRSS")
    except OSError:
        rss = None
    start = time.monotonic()
    if ALARM:
        signal.alarm(PER_FILE)
    try:
        M.load_checkpoint(path)
        out = {"error": None}
    except BaseException as e:
        out = {"error": type(e).__name__, "is_checkpoint_error": isinstance(e, M.CheckpointError),
               "message": str(e)[:1500]}
    finally:
        if ALARM:
            signal.alarm(0)
    out["seconds"] = round(time.monotonic() - start, 2)
    peak = status("VmHWM")
    out["peak_mb"] = None if rss is None or peak is None else (peak - rss) // 1024
    print(json.dumps([name, out]), flush=True)
"""
_PER_FILE_S = 10


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """name -> (path of the bomb file, what a naive loader pays to load it)."""
    d = tmp_path_factory.mktemp("bombs")
    out = {}
    for name, (build, _) in BOMBS.items():
        file_name, cost = build(d)
        out[name] = (d / file_name, cost)
    return out


@pytest.fixture(scope="module")
def bomb_outcomes(bombs):
    """name -> what loading that bomb did in the child process (error, message, time, memory)."""
    files = [(name, str(path)) for name, (path, _) in bombs.items()]
    root = str(Path(M.__file__).resolve().parents[2])  # the qcourse under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    code = _CHILD.replace("PER_FILE", str(_PER_FILE_S))
    cmd = [sys.executable, "-c", code, json.dumps(files)]
    try:
        proc = subprocess.run(cmd, capture_output=True, env=env,
                              timeout=len(files) * _PER_FILE_S + 60)
        note = f"the child exited with {proc.returncode}: {proc.stderr[-2000:]!r}"
        stdout = proc.stdout
    except subprocess.TimeoutExpired as e:  # a load stuck in C code, where no alarm reaches it
        stdout, note = e.stdout or b"", "the child was killed: a load ran past its alarm (in C?)"
    lines = [line for line in stdout.decode().splitlines() if line.startswith("[")]
    outcomes = dict(json.loads(line) for line in lines)
    missing = {"error": "no result", "message": note}
    return {name: {**outcomes.get(name, missing), "cost": bombs[name][1]} for name in BOMBS}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_fails_fast_with_a_checkpoint_error(bomb_outcomes, name):
    out = bomb_outcomes[name]
    assert out.get("is_checkpoint_error"), f"{name} (naive cost: {out['cost']}): {out}"
    assert re.search(BOMBS[name][1], out["message"]), out["message"]
    assert out["seconds"] < 5, out
    assert out["peak_mb"] is None or out["peak_mb"] < 200, out


def test_bombs_carry_their_cost(bombs):
    """Controls: each payload is small and really asks for what its test says."""
    for name, (path, _) in bombs.items():
        assert path.stat().st_size < 2 << 20, name
    for name in ("zip_bomb_pickle", "zip_bomb_storage"):  # what torch's zip reader would allocate
        assert max(i.file_size for i in zipfile.ZipFile(bombs[name][0]).infolist()) >= 1 << 30
    # shared structures expand exponentially: count the leaves a walk without memo reaches
    cfg = torch.load(bombs["billion_laughs_cfg"][0], weights_only=True)["cfg"]
    assert _paths(cfg["backbone"], list) >= 2 * 10**10
    dag = torch.load(bombs["module_dag"][0], weights_only=False)["model"]
    assert _paths(dag, nn.Module) >= 10**15
    cycle = torch.load(bombs["module_cycle"][0], weights_only=False)["model"]
    assert cycle._modules["0"] is cycle
    conv = torch.load(bombs["huge_conv_cfg"][0], weights_only=True)["cfg"]["backbone"]
    assert conv[4][3][0] * conv[5][3][0] * 9 * 4 > 11e9  # bytes of layer 5's 3x3 weights
    repeat = torch.load(bombs["huge_repeat_cfg"][0], weights_only=True)["cfg"]["backbone"]
    assert repeat[0][1] == 10**7


def _paths(x, kind, memo=None):
    """How many leaves a walk that does not remember visited nodes would reach."""
    memo = {} if memo is None else memo
    children = list(x._modules.values()) if kind is nn.Module else x
    if not children:
        return 1
    if id(x) not in memo:
        memo[id(x)] = sum(_paths(c, kind, memo) for c in children)
    return memo[id(x)]


# --------------------------------------------------------------------------------- NaN / inf


def _poisoned(model):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model[0].conv.weight[0, 0, 0, 0] = float("nan")
        bad.model[77].m[1].bias[2] = float("inf")
    return bad


@pytest.mark.parametrize("layout", ["official", "qcourse", "qcourse_half", "state_dict"])
def test_nan_or_inf_weights_are_refused(tmp_path, tiny3, layout):
    bad = _poisoned(tiny3)
    path = tmp_path / "nan.pt"
    if layout == "official":
        write_official(path, bad)
    elif layout.startswith("qcourse"):
        save_checkpoint(bad, path, half=layout == "qcourse_half")
    else:
        torch.save(bad.state_dict(), path)
    expected = (r"nan\.pt: 2 tensors hold NaN or inf values \(first: 'model\.0\.conv\.weight', "
                r"'model\.77\.m\.1\.bias'\); the weights are unusable")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    torch.save(tiny3.state_dict(), path)  # control: the same file with finite weights loads
    assert load_checkpoint(path).nc == 3


# --------------------------------------------------------------------------------- still loading


def test_narrower_configurations_and_shared_activations_still_load(tmp_path):
    cfg = get_config("yolov7-tiny", 2)
    cfg["width_multiple"] = 0.5  # every layer narrower than yolov7-tiny's: within the bounds
    narrow = M.build_model(cfg).eval()
    loaded = load_checkpoint(save_checkpoint(narrow, tmp_path / "narrow.pt"))
    assert loaded.arch == "custom" and loaded.model[0].conv.out_channels == 16
    # an official model whose convs share one activation module: a stateless leaf, not a loop
    tiny = M.yolov7_tiny(nc=2).eval()
    path = tmp_path / "shared_act.pt"
    with official_modules() as mapping:
        m = as_official(tiny, mapping)
        m.model[1].act = m.model[0].act
        torch.save({"model": m}, path)
    assert load_checkpoint(path).nc == 2


def test_config_wider_than_the_architecture_is_refused(tmp_path, tiny3):
    cfg = copy.deepcopy(tiny3.yaml)
    for key, value, expected in (
        ("nc", 10000, r"wide\.pt: nc=10000 classes; a checkpoint has 1 to 4096"),
        ("width_multiple", 2.0, r"width_multiple=2\.0; yolov7-tiny has 1\.0"),
        ("anchors", [[1, 2] * 500] * 3, r"anchors .* are not 3 lists of 6 positive pixel sizes"),
    ):
        bad = {**cfg, key: value}
        path = tmp_path / "wide.pt"
        torch.save(_qcourse_dict(bad, state_dict=tiny3.state_dict()), path)
        with pytest.raises(CheckpointError, match=expected):
            load_checkpoint(path)


# --------------------------------------------------------------------------------- untrusted input (issue 20)


@pytest.mark.parametrize("size", [512, 10 << 20])
def test_a_file_of_zeros_is_not_a_checkpoint_not_a_tar_archive(tmp_path, size):
    # Python's tarfile reads a block of zeros as the end of an empty archive
    path = tmp_path / "zeros.pt"
    path.write_bytes(bytes(size))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "tar archive" not in msg
    assert f"{path} is not a readable PyTorch checkpoint" in msg and "neither a zip header" in msg


def test_a_file_larger_than_any_checkpoint_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "zeros.pt"
    with open(path, "wb") as f:
        f.truncate(10 << 30)  # sparse: 10 GiB of zeros that take no disk
    real_open, opened = builtins.open, []

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "10.0 GiB" in msg and "yolov7.pt" in msg
    assert f"{M.checkpoint.MAX_FILE_BYTES / (1 << 30):.1f} GiB" in msg
    assert os.path.realpath(path) not in opened
