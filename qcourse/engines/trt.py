"""Lesson 8 — the TensorRT backend (TensorRT 10 or 11, a CUDA GPU): what a GPU user runs.

Imported lazily: nothing here needs ``tensorrt`` until an engine is built or loaded, and a
machine without it gets :class:`~qcourse.engines.base.BackendUnavailable` saying so.

* Build a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): every
  layer runs in the type the ONNX graph gives it, so the precision is chosen by the graph, not
  by builder flags (TensorRT 10.12 deprecated ``BuilderFlag.FP16`` / ``INT8`` and 11 removed
  them; qcourse sets neither, on either version):

  - ``int8``: the Q/DQ graph as exported. The Q/DQ pairs say which tensors are INT8 (the
    scales are qcourse's calibrated ones); everything else runs in FP32, e.g. YOLOv7's float
    detection head.
  - ``fp16``: an FP16 copy of the float graph (:func:`qcourse.engines.fp16.to_fp16`: weights
    and constants in float16, float32 input and output kept, with a Cast after the input and
    before each output, so the engine takes and returns float32 like the others).
  - ``fp32``: the float graph, with ``BuilderFlag.TF32`` cleared unless ``tf32=True``:
    TensorRT enables TF32 by default, which rounds the inputs of matrix products to 10 bits of
    mantissa on Ampere and later, so "fp32" would not be FP32.

* One optimization profile for the dynamic batch (min / opt / max), a timing cache reused
  between builds (a cache TensorRT rejects is reported and replaced), detailed profiling so
  the inspector can report every layer, all on the CUDA device asked for (``device``).
* Save: the serialized plan (``.engine``) and a JSON record next to it (``.engine.json``):
  precision, batch range, input shape, output names in ONNX order, TensorRT version (a plan only
  loads in the version that built it) and the plan's SHA-256. Both are written atomically,
  the plan first, so an interrupted build leaves either the old pair or a plan that its
  record does not match, which loading refuses.
* Run: ``execute_async_v3`` on a CUDA stream of the engine's own, with tensor addresses of
  torch CUDA buffers; outputs are found by name (TensorRT does not keep ONNX's order), and
  only the ones asked for are copied to the host.
* Report: :meth:`TrtEngine.layer_report` reads the engine inspector's JSON: the precision of each
  layer and the reformat layers — lesson 5's Q/DQ placement question, answered by the engine.

``trtexec`` equivalent of an INT8 build (the README lists the others; an fp16 build passes the
FP16 ONNX that :func:`qcourse.engines.fp16.to_fp16` writes)::

    trtexec --onnx=qdq.onnx --stronglyTyped --minShapes=input:1x3x640x640 \\
        --optShapes=input:8x3x640x640 --maxShapes=input:32x3x640x640 \\
        --timingCacheFile=trt.cache --profilingVerbosity=detailed --saveEngine=ptq.engine
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from qcourse.engines.base import BackendUnavailable, Engine, EngineError, PathLike, as_batch, check_precision
from qcourse.utils import atomic_write, check_writable, file_sha256

__all__ = ["TrtEngine", "build", "load", "profile_shapes", "parse_layer_report", "available",
           "SUPPORTED_MAJORS"]

#: TensorRT major versions whose Python API this backend is written and tested against
#: (tests/data/tensorrt_api_*.json record it; pyproject's ``tensorrt`` extra pins the same)
SUPPORTED_MAJORS = (10, 11)


def _import_trt():
    """The ``tensorrt`` module of a supported version, or BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or PyPI's placeholder package failing on import
        raise BackendUnavailable(f"TensorRT is not usable here ({type(e).__name__}: {str(e)[:120]}); install "
                                 "it on a machine with an NVIDIA GPU (pip install -e \".[tensorrt]\") or use "
                                 "--backend onnxruntime") from None
    version = str(getattr(trt, "__version__", "unknown"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) not in SUPPORTED_MAJORS:
        raise BackendUnavailable(
            f"TensorRT {version} found; this backend supports TensorRT "
            f"{' and '.join(f'{m}.x' for m in SUPPORTED_MAJORS)} (strongly typed networks, execute_async_v3): "
            f"install one (pip install -e \".[tensorrt]\" pins it) or use --backend onnxruntime")
    return trt


class _CudaDevice:
    """One CUDA device and a stream of the engine's own: where an engine is built, loaded and run.

    ``device``: ``None`` (torch's current CUDA device), an index, ``"cuda"`` or ``"cuda:N"``.
    Running on a stream of its own, instead of the legacy default stream, keeps TensorRT
    from synchronizing the whole device around each call (its documentation asks for it).
    """

    def __init__(self, device=None):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA GPU and this torch sees none; run on a GPU machine or "
                                     "use --backend onnxruntime")
        try:
            dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        except (RuntimeError, TypeError):
            raise EngineError(f"{device!r} is not a device; pass cuda or cuda:N") from None
        if dev.type != "cuda":
            raise EngineError(f"TensorRT engines run on a CUDA device, got {device!r}; pass cuda or cuda:N")
        count = torch.cuda.device_count()
        self.index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= self.index < count:
            raise EngineError(f"{device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        self.torch, self.device = torch, torch.device("cuda", self.index)
        self.name = torch.cuda.get_device_name(self.index)
        self._stream = None

    def __str__(self) -> str:
        return f"cuda:{self.index} ({self.name})"

    @property
    def stream(self):
        if self._stream is None:
            self._stream = self.torch.cuda.Stream(device=self.device)
        return self._stream

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    @contextlib.contextmanager
    def active(self, stream: bool = False):
        """This device as CUDA's current one (TensorRT builds and loads there), and its stream if asked."""
        with self.torch.cuda.device(self.index):
            if stream:
                with self.torch.cuda.stream(self.stream):
                    yield
            else:
                yield

    def upload(self, x: np.ndarray):
        return self.torch.from_numpy(x).to(self.device, non_blocking=True)

    def empty(self, shape: Tuple[int, ...], dtype: np.dtype):
        dt = self.torch.from_numpy(np.empty(0, dtype)).dtype
        return self.torch.empty(shape, dtype=dt, device=self.device)

    @staticmethod
    def address(buffer) -> int:
        return int(buffer.data_ptr())

    def synchronize(self) -> None:
        self.stream.synchronize()

    @staticmethod
    def download(buffer) -> np.ndarray:
        return buffer.cpu().numpy()


def available() -> Tuple[bool, str]:
    """``(True, version)`` where TensorRT and CUDA are usable, else ``(False, why)``."""
    try:
        trt = _import_trt()
        _CudaDevice()
        return True, trt.__version__
    except EngineError as e:
        return False, str(e)


def profile_shapes(image_shape: Sequence[int], batch: Sequence[int]) -> Tuple[tuple, tuple, tuple]:
    """The (min, opt, max) input shapes of a dynamic-batch profile.

    ``image_shape`` is (C, H, W); ``batch`` is (min, opt, max) with 1 <= min <= opt <= max.
    TensorRT picks kernels for ``opt`` and accepts any batch in [min, max].
    """
    batch = tuple(int(b) for b in batch)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise EngineError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}; "
                          "e.g. (1, 8, 32)")
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise EngineError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    return tuple((b, *image_shape) for b in batch)  # type: ignore[return-value]


def _factory(make, what: str, trt, device):
    """``make()`` (a ``trt.Builder`` / ``trt.Runtime``), or BackendUnavailable saying what is wrong.

    TensorRT returns no object when it cannot start on the GPU (no driver or one too old for
    this TensorRT, a GPU it does not support, a libnvinfer of another version than the Python
    bindings); pybind then raises ``TypeError: factory function returned nullptr``.
    """
    try:
        obj = make()
    except TypeError as e:
        obj, why = None, str(e)
    else:
        why = "it returned no object"
    if obj is None:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} could not create its {what} on {device} ({why}): the NVIDIA driver "
            "is missing or older than this TensorRT needs, the GPU is not one TensorRT supports, or the "
            "TensorRT libraries do not match the Python bindings; check nvidia-smi, TensorRT's support "
            "matrix and its log above, or use --backend onnxruntime")
    return obj


def _parse(trt, network, logger, onnx_bytes: bytes, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors[:400]}; re-export it with "
                          "qcourse.export.export_onnx (opset >= 13)")
    return parser


def _graph(onnx_path: Path, precision: str) -> Tuple[bytes, List[str]]:
    """The ONNX bytes TensorRT parses for ``precision``, and the graph's output names in order.

    Also refuses a corrupt file and a graph that does not fit the precision, before the GPU is touched.
    """
    from qcourse.export import load_onnx

    model = load_onnx(onnx_path)
    qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if precision == "int8" and not qdq:
        raise EngineError(f"{onnx_path} has no Q/DQ nodes; TensorRT 10 builds INT8 from explicit Q/DQ only (and a "
                          "strongly typed network takes INT8 from them alone): calibrate and export the model "
                          "with Q/DQ first (or build fp16)")
    if precision != "int8" and qdq:
        raise EngineError(f"{onnx_path} has Q/DQ nodes, which TensorRT always runs in INT8; build it with "
                          "--precision int8, or pass the float ONNX for fp32/fp16")
    outputs = [o.name for o in model.graph.output]
    if precision == "fp16":
        from qcourse.engines.fp16 import to_fp16

        return to_fp16(model, keep_io_types=True).SerializeToString(), outputs
    return onnx_path.read_bytes(), outputs


def _timing_cache(trt, config, cache_path: Path):
    """Attach the timing cache in ``cache_path`` (or a new one) to ``config``.

    A cache TensorRT rejects (corrupt, or from another GPU / TensorRT version) is reported with
    a warning and replaced by a new one, which this build then writes over the old file.
    """
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache, why = None, ""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception as e:  # pybind's errors for a blob TensorRT cannot read
            why = f": {' '.join(str(e).split())[:200]}"
        if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
            cache, why = None, " (made on another GPU or TensorRT version)"
        if cache is None:
            warnings.warn(f"TensorRT rejected the timing cache {cache_path}{why or ' (corrupt)'}; building "
                          f"without it, and {cache_path} will hold this build's cache instead", stacklevel=3)
        else:
            return cache
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError(f"TensorRT refused a new, empty timing cache; build with timing_cache in another "
                          f"folder than {cache_path.parent}")
    return cache


def _config(trt, builder, precision: str, workspace_gib: float, cache_path: Path, tf32: bool):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it
    if not tf32:  # on by default; a strongly typed FP32 network still uses TF32 math with it
        config.clear_flag(trt.BuilderFlag.TF32)
    return config, _timing_cache(trt, config, cache_path)


def build(onnx_path: PathLike, out: PathLike, precision: str = "int8", batch: Sequence[int] = (1, 8, 32),
          workspace_gib: float = 4.0, timing_cache: Optional[PathLike] = None, device=None,
          tf32: bool = False) -> Path:
    """Build, serialize and save a TensorRT engine; returns ``out`` (``.engine``, record in ``.engine.json``).

    ``device``: the CUDA device to build for (default: torch's current one); ``tf32``: let FP32
    layers use TF32 math (fp32 builds only make a difference; off by default).
    """
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}; export one with qcourse.export.export_onnx")
    check_precision("tensorrt", precision)
    onnx_bytes, outputs = _graph(onnx_path, precision)
    record_path = Path(str(out) + ".json")
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".cache")
    check_writable(out, record_path)  # before the build: a refusal costs nothing
    trt = _import_trt()
    dev = _CudaDevice(device)
    with dev.active():
        logger = trt.Logger(trt.Logger.WARNING)
        builder = _factory(lambda: trt.Builder(logger), "builder", trt, dev)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        _parser = _parse(trt, network, logger, onnx_bytes, onnx_path)  # noqa: F841 (alive during the build)
        if network.num_inputs != 1:
            raise EngineError(f"{onnx_path} has {network.num_inputs} inputs; an engine here takes one image batch")
        inp = network.get_input(0)
        shapes = profile_shapes(tuple(inp.shape)[1:], batch)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *shapes)
        config, _cache = _config(trt, builder, precision, workspace_gib, cache_path, tf32)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT could not build {onnx_path} in {precision} on {dev} (see its log above)")
        plan = bytes(plan)
        cache_blob = bytes(config.get_timing_cache().serialize())
    record = {"backend": "tensorrt", "precision": precision, "batch": [s[0] for s in shapes],
              "image_shape": list(shapes[0][1:]), "input": inp.name, "outputs": outputs,
              "tensorrt": trt.__version__, "strongly_typed": True, "tf32": bool(tf32),
              "built_on": dev.name, "source": str(onnx_path)}
    with atomic_write(record_path, suffix=".json") as tmp_record:  # renamed last: after the plan
        with atomic_write(out, suffix=".engine") as tmp_plan:
            tmp_plan.write_bytes(plan)
            record["sha256"] = file_sha256(tmp_plan)
            tmp_record.write_text(json.dumps(record, indent=1))
    try:
        with atomic_write(cache_path, suffix=".cache") as tmp:
            tmp.write_bytes(cache_blob)
    except ValueError as e:  # a cache file qcourse did not write is left alone
        warnings.warn(f"the timing cache was not saved: {e}", stacklevel=2)
    return out


def _read_record(path: Path) -> Dict:
    side = Path(str(path) + ".json")
    if not side.is_file():
        raise EngineError(f"{side} is missing: qcourse writes it next to every TensorRT engine it builds; "
                          "rebuild the engine with qcourse build")
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{side} is not valid JSON ({e}); rebuild the engine with qcourse build") from None
    missing = [k for k in ("precision", "batch", "image_shape", "outputs", "tensorrt", "sha256")
               if k not in record] if isinstance(record, dict) else ["all"]
    if missing:
        raise EngineError(f"{side} lacks {', '.join(missing)} (written by an older qcourse, or edited); rebuild "
                          "the engine with qcourse build")
    return record


class TrtEngine(Engine):
    """A deserialized TensorRT engine run with ``execute_async_v3`` on torch CUDA buffers.

    ``device``: the CUDA device to run on (default: torch's current one), e.g. ``"cuda:1"``.
    """

    backend = "tensorrt"

    def __init__(self, path: PathLike, device=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine file not found: {self.path}; build one with qcourse build")
        trt = _import_trt()  # first: whether this machine runs TensorRT at all
        self.device = _CudaDevice(device)
        record = _read_record(self.path)
        if record["tensorrt"] != trt.__version__:
            raise EngineError(f"{self.path} was built by TensorRT {record['tensorrt']} and this is "
                              f"{trt.__version__}; a plan only loads in the version that built it: rebuild it")
        plan = self.path.read_bytes()
        if file_sha256(self.path) != record["sha256"]:
            raise EngineError(f"{self.path} does not match its record {self.path}.json (an interrupted build or "
                              "a file replaced by hand); rebuild the engine with qcourse build")
        self.trt = trt
        with self.device.active():
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = _factory(lambda: trt.Runtime(self.logger), "runtime", trt, self.device)
            self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EngineError(f"{self.path} is not a TensorRT engine this runtime can load on {self.device} "
                                  "(corrupt, or built for another GPU); rebuild it with qcourse build")
            self.context = self.engine.create_execution_context()
        self.precision = record["precision"]
        self.info = record
        self.batch_range = (record["batch"][0], record["batch"][2])
        self.image_shape = tuple(record["image_shape"])
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or sorted(outputs) != sorted(record["outputs"]):
            raise EngineError(f"{self.path} has inputs {inputs} and outputs {outputs}, its record "
                              f"{record.get('input')!r} and {record['outputs']}; rebuild it with qcourse build")
        self.input_name = inputs[0]
        self.output_names = tuple(record["outputs"])  # ONNX's order, which TensorRT does not keep
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in outputs}

    def run(self, images, outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        wanted = self.select_outputs(outputs)
        x = as_batch(images)
        self.check_batch(x)
        dev, ctx = self.device, self.context
        with dev.active(stream=True):
            x_dev = dev.upload(x)
            if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                raise EngineError(f"TensorRT refused input shape {tuple(x.shape)} for {self.path}")
            ctx.set_tensor_address(self.input_name, dev.address(x_dev))
            buffers = {}
            for name in self._dtypes:  # every output needs an address; shapes are known once the input's is
                buffers[name] = dev.empty(tuple(ctx.get_tensor_shape(name)), self._dtypes[name])
                ctx.set_tensor_address(name, dev.address(buffers[name]))
            if not ctx.execute_async_v3(dev.stream_handle):
                raise EngineError(f"TensorRT failed to run {self.path} on a batch of shape {tuple(x.shape)}")
            dev.synchronize()
            return {name: dev.download(buffers[name]) for name in wanted}  # only these cross to the host

    def layer_report(self) -> List[Dict]:
        """The engine inspector's per-layer information, parsed (see :func:`parse_layer_report`)."""
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return parse_layer_report(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))

    def describe(self) -> str:
        return super().describe() + f", {self.device}"


def load(path: PathLike, device=None) -> TrtEngine:
    return TrtEngine(path, device=device)


#: the data type words of the inspector's format strings, e.g. "Row major linear FP32",
#: "Thirty-two wide channel vectorized row major Int8 format", "Channel major FP16 format
#: where channel % 8 == 0" (the layout comes first, so the first word is no type)
_DTYPE_WORDS = {"int8": "int8", "fp16": "fp16", "half": "fp16", "fp32": "fp32", "float": "fp32",
                "bf16": "bf16", "fp8": "fp8", "int4": "int4", "fp4": "fp4", "int32": "int32", "int64": "int64",
                "uint8": "uint8", "bool": "bool"}
_DTYPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_WORDS) + r")\b", re.IGNORECASE)


def _precision_of(fmt: str) -> str:
    """The data type named in an inspector format string (int8 / fp16 / fp32 ...), '' if none."""
    m = _DTYPE_RE.search(fmt or "")
    return _DTYPE_WORDS[m.group(1).lower()] if m else ""


def parse_layer_report(text: str) -> List[Dict]:
    """One row per engine layer from the inspector's JSON: name, type, precision, reformat, origin.

    ``precision`` is the data type of the layer's first output (what its kernel writes), read
    from its format string wherever the type word stands in it. ``reformat`` marks the layers
    TensorRT inserted to change a tensor's type or layout (``Origin`` "REFORMAT") — the cost of
    a Q/DQ placement that does not line up (lesson 5's rules avoid them). A stand-alone
    QuantizeLinear also has ``LayerType`` "Reformat", but ``Origin`` "QDQ": it is the graph's
    own quantization, not an inserted reformat (``origin`` gives it). Reports without ``Origin``
    fall back to the layer type. With ``ProfilingVerbosity.DETAILED`` each layer is a dict;
    without it only names, which this refuses with the fix.
    """
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise EngineError(f"the engine inspector's report is not JSON ({e})") from None
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise EngineError("the engine inspector's report has no 'Layers' list")
    rows = []
    for layer in layers:
        if not isinstance(layer, dict):
            raise EngineError("the report lists layer names only: build the engine with "
                              "ProfilingVerbosity.DETAILED (qcourse build does) to see precisions")
        outs = layer.get("Outputs") or [{}]
        fmt = str(outs[0].get("Format/Datatype", ""))
        name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
        origin = str(layer.get("Origin", ""))
        reformat = origin == "REFORMAT" if origin else kind == "Reformat"
        rows.append({"name": name, "type": kind, "precision": _precision_of(fmt), "format": fmt,
                     "reformat": reformat, "origin": origin, "tactic": layer.get("TacticName", "")})
    return rows
