"""Lesson 8 — the TensorRT backend (TensorRT 10 API, a CUDA GPU): what a GPU user runs.

Imported lazily: nothing here needs ``tensorrt`` until an engine is built or loaded, and a
machine without it gets :class:`~qcourse.engines.base.BackendUnavailable` saying so.

* Build: parse the ONNX file, one optimization profile for the dynamic batch (min / opt /
  max), FP16 with ``BuilderFlag.FP16``, INT8 from the explicit Q/DQ pairs (TensorRT 10 has
  no implicit calibrator: the scales are qcourse's calibrated ones, in the graph), a timing
  cache reused between builds, detailed profiling so the inspector can report every layer.
* Save: the serialized plan (``.engine``) and a JSON record next to it (``.engine.json``):
  precision, batch range, input shape, TensorRT version (a plan only loads in the version
  that built it).
* Run: ``execute_async_v3`` with tensor addresses of torch CUDA buffers.
* Report: :meth:`TrtEngine.layer_report` reads the engine inspector's JSON: the precision of each
  layer and the reformat layers — lesson 5's Q/DQ placement question, answered by the engine.

``trtexec`` equivalent of an INT8 build (the README lists the others)::

    trtexec --onnx=ptq.onnx --int8 --fp16 --minShapes=input:1x3x640x640 \
        --optShapes=input:8x3x640x640 --maxShapes=input:32x3x640x640 \
        --timingCacheFile=trt.cache --profilingVerbosity=detailed --saveEngine=ptq.engine
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from qcourse.engines.base import BackendUnavailable, Engine, EngineError, PathLike, as_batch

__all__ = ["TrtEngine", "build", "load", "profile_shapes", "parse_layer_report", "available"]


def _import_trt():
    """``tensorrt`` and a usable CUDA device, or BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or PyPI's placeholder package failing on import
        raise BackendUnavailable(f"TensorRT is not usable here ({type(e).__name__}: {str(e)[:120]}); install "
                                 "it on a machine with an NVIDIA GPU (pip install -e \".[tensorrt]\") or use "
                                 "--backend onnxruntime") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and this torch sees none; run on a GPU machine or "
                                 "use --backend onnxruntime")
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} found; this backend uses the TensorRT 10 API "
                                 "(execute_async_v3, no implicit calibrator): upgrade to 10.x")
    return trt


def available() -> Tuple[bool, str]:
    """``(True, version)`` where TensorRT and CUDA are usable, else ``(False, why)``."""
    try:
        return True, _import_trt().__version__
    except BackendUnavailable as e:
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


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors[:400]}; re-export it with "
                          "qcourse.export.export_onnx (opset >= 13)")
    return parser


def _has_qdq(onnx_path: Path) -> bool:
    from qcourse.export import load_onnx

    return any(n.op_type == "QuantizeLinear" for n in load_onnx(onnx_path).graph.node)


def _config(trt, builder, precision: str, workspace_gib: float, cache_path: Optional[Path]):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it
    if precision in ("fp16", "int8"):  # INT8 with FP16 allowed: layers without Q/DQ run in FP16
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)  # tactics timed once, reused by the next build
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build(onnx_path: PathLike, out: PathLike, precision: str = "int8", batch: Sequence[int] = (1, 8, 32),
          workspace_gib: float = 4.0, timing_cache: Optional[PathLike] = None) -> Path:
    """Build, serialize and save a TensorRT engine; returns ``out`` (``.engine``, record in ``.engine.json``)."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}; export one with qcourse.export.export_onnx")
    qdq = _has_qdq(onnx_path)  # also refuses a corrupt file, before the GPU is touched
    if precision == "int8" and not qdq:
        raise EngineError(f"{onnx_path} has no Q/DQ nodes; TensorRT 10 builds INT8 from explicit Q/DQ only: "
                          "calibrate and export the model with Q/DQ first (or build fp16)")
    if precision != "int8" and qdq:
        raise EngineError(f"{onnx_path} has Q/DQ nodes, which TensorRT always runs in INT8; build it with "
                          "--precision int8, or pass the float ONNX for fp32/fp16")
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    _parser = _parse(trt, network, logger, onnx_path)  # noqa: F841 (keeps the parser alive during the build)
    inp = network.get_input(0)
    shapes = profile_shapes(tuple(inp.shape)[1:], batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, *shapes)
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".cache")
    config = _config(trt, builder, precision, workspace_gib, cache_path)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build {onnx_path} in {precision} (see its log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    record = {"backend": "tensorrt", "precision": precision, "batch": list(shapes[0][:1] + shapes[1][:1] + shapes[2][:1]),
              "image_shape": list(shapes[0][1:]), "input": inp.name, "tensorrt": trt.__version__,
              "source": str(onnx_path)}
    Path(str(out) + ".json").write_text(json.dumps(record, indent=1))
    return out


def _read_record(path: Path) -> Dict:
    side = Path(str(path) + ".json")
    if not side.is_file():
        raise EngineError(f"{side} is missing: qcourse writes it next to every TensorRT engine it builds; "
                          "rebuild the engine with qcourse build")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{side} is not valid JSON ({e}); rebuild the engine with qcourse build") from None


class TrtEngine(Engine):
    """A deserialized TensorRT engine run with ``execute_async_v3`` on torch CUDA buffers."""

    backend = "tensorrt"

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine file not found: {self.path}; build one with qcourse build")
        record = _read_record(self.path)
        trt = _import_trt()
        if record.get("tensorrt") != trt.__version__:
            raise EngineError(f"{self.path} was built by TensorRT {record.get('tensorrt')} and this is "
                              f"{trt.__version__}; a plan only loads in the version that built it: rebuild it")
        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path} is not a TensorRT engine this runtime can load (corrupt or built "
                              "for another GPU); rebuild it with qcourse build")
        self.context = self.engine.create_execution_context()
        self.precision = record["precision"]
        self.batch_range = (record["batch"][0], record["batch"][2])
        self.image_shape = tuple(record["image_shape"])
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_name = next(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])

    def run(self, images) -> Dict[str, np.ndarray]:
        import torch

        x = as_batch(images)
        self.check_batch(x)
        trt = self.trt
        x_gpu = torch.from_numpy(x).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x_gpu.data_ptr())
        outs = {}
        for name in self.output_names:  # output shapes are known once the input shape is set
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT failed to run {self.path} on a batch of shape {tuple(x.shape)}")
        stream.synchronize()
        return {name: t.cpu().numpy() for name, t in outs.items()}

    def layer_report(self) -> List[Dict]:
        """The engine inspector's per-layer information, parsed (see :func:`parse_layer_report`)."""
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return parse_layer_report(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))


def load(path: PathLike) -> TrtEngine:
    return TrtEngine(path)


def _precision_of(fmt: str) -> str:
    """'Int8 NC32HW32' / 'Half ...' / 'Float ...' -> int8 / fp16 / fp32 (else the raw text)."""
    head = fmt.split()[0].lower() if fmt else ""
    return {"int8": "int8", "half": "fp16", "float": "fp32", "int32": "int32", "bool": "bool"}.get(head, head)


def parse_layer_report(text: str) -> List[Dict]:
    """One row per engine layer from the inspector's JSON: name, type, precision, reformat.

    ``precision`` is the data type of the layer's first output (what its kernel writes);
    ``reformat`` marks the layers TensorRT inserted to change a tensor's type or layout —
    the cost of a Q/DQ placement that does not line up (lesson 5's rules avoid them).
    With ``ProfilingVerbosity.DETAILED`` each layer is a dict; without it only names,
    which this refuses with the fix.
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
        fmt = outs[0].get("Format/Datatype", "")
        name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
        rows.append({"name": name, "type": kind, "precision": _precision_of(fmt), "format": fmt,
                     "reformat": kind == "Reformat" or "reformat" in name.lower(),
                     "tactic": layer.get("TacticName", "")})
    return rows
