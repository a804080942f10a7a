"""Lesson 8 — the ONNX Runtime backend: the CPU engine the course runs everywhere.

``build`` writes a plain ``.onnx`` any ``onnxruntime.InferenceSession`` loads without
qcourse: ``fp32`` is the float graph (Q/DQ pairs removed from a quantized export, exactly
the model it came from), ``int8`` the graph rewritten by :func:`qcourse.engines.ort_int8.to_ort_int8`
so that ORT forms integer kernels. ORT's CPU provider has no FP16 convolutions, so ``fp16``
is refused with the backend that has them. A small JSON record in the model's
``metadata_props`` (key ``qcourse.engine``) says how it was built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from qcourse.engines.base import Engine, EngineError, PathLike, as_batch, shape_tuple
from qcourse.export import load_onnx
from qcourse.utils import atomic_write

__all__ = ["OrtEngine", "build", "load", "session_options"]

META_KEY = "qcourse.engine"


def session_options(threads: Optional[int] = None, spin: bool = False):
    """ORT options: all graph optimizations, ``threads`` intra-op threads, warnings off.

    ORT logs warnings a learner cannot act on (e.g. about initializers it folded); level 3
    keeps errors only. ``spin=False`` (default) lets the worker threads sleep when a call
    ends instead of busy-waiting for the next: otherwise, with several engines (or PyTorch)
    in one process, a session's idle threads keep the cores busy while another one runs.
    On 2 cores that doubled FP32's batch-1 latency in a side-by-side benchmark (14 ms
    instead of 6.6) and made INT8 look twice as fast as it is.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def build(onnx_path: PathLike, out: PathLike, precision: str = "int8", weight_dtype: str = "auto",
          calibration: Optional[Iterable] = None, calib_method: str = "entropy") -> Path:
    """Write the ORT engine for ``precision`` built from ``onnx_path`` to ``out``; returns ``out``.

    ``calibration``: batches of input images (float32 arrays or tensors). For int8 they
    calibrate, with ``calib_method``, the outputs of the quantized Convs that feed float
    Convs (:func:`~qcourse.engines.ort_int8.calibration_targets`), which then run integer
    kernels too; without it those Convs stay float (exactly the fake-quant model, slower).
    """
    from qcourse.engines.ort_int8 import calibrate_outputs, calibration_targets, strip_qdq, to_ort_int8

    if precision == "fp16":
        raise EngineError("ONNX Runtime's CPU provider has no FP16 convolutions, so an fp16 engine would only be "
                          "slower; build fp32 or int8 here, or fp16 with --backend tensorrt on a GPU")
    model = load_onnx(onnx_path)
    info: Dict[str, object] = {"backend": "onnxruntime", "precision": precision, "source": str(onnx_path)}
    if precision == "int8":
        amax = {}
        if calibration is not None:
            amax = calibrate_outputs(model, calibration_targets(model), calibration, calib_method)
            info.update(calib_method=calib_method, output_amax=amax)
        model, counts = to_ort_int8(model, weight_dtype=weight_dtype, output_amax=amax)
        info.update(counts)
    elif _has_qdq(model):  # fp32 from a quantized export: the float model it came from
        model = strip_qdq(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    OrtEngine(onnx_path, model=model)  # ONNX Runtime must load it: refused before `out` is replaced
    return _save_atomic(model, Path(out))


def _save_atomic(model, out: Path) -> Path:
    import onnx

    if out.suffix != ".onnx":
        raise EngineError(f"an onnxruntime engine is an .onnx file; name it e.g. {out.with_suffix('.onnx')}")
    with atomic_write(out, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    return out


class OrtEngine(Engine):
    """An ONNX Runtime session behind the :class:`~qcourse.engines.base.Engine` interface."""

    backend = "onnxruntime"

    def __init__(self, path: PathLike, threads: Optional[int] = None, model=None):
        """``model``: the ONNX model itself, not read from ``path`` (which the errors name)."""
        import onnxruntime as ort

        self.path = Path(path)
        model = load_onnx(self.path) if model is None else model  # clear errors for a missing or corrupt file
        meta = {p.key: p.value for p in model.metadata_props}
        info = json.loads(meta.get(META_KEY, "{}"))
        self.precision = info.get("precision") or ("int8" if _has_qdq(model) else "fp32")
        self.info = info
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own errors (unsupported op, bad type) become one line
            raise EngineError(f"ONNX Runtime cannot load {self.path}: {' '.join(str(e).split())[:300]}") from None
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise EngineError(f"{self.path} has {len(inp)} inputs; an engine here takes one image batch")
        self.input_name = inp[0].name
        dims = shape_tuple(inp[0].shape)
        self.batch_range = (dims[0], dims[0]) if dims[0] is not None else (1, None)
        self.image_shape = dims[1:]
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, images, outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        names = self.select_outputs(outputs)
        x = as_batch(images)
        self.check_batch(x)
        return dict(zip(names, self.session.run(list(names), {self.input_name: x})))


def load(path: PathLike, threads: Optional[int] = None) -> OrtEngine:
    return OrtEngine(path, threads=threads)
