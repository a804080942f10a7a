"""Lesson 8 — engines: build ONNX Runtime / TensorRT engines from exported ONNX, run and time them.

One interface (:class:`Engine`: call it with a batch of images, get the model's outputs),
two backends:

* ``onnxruntime`` (:mod:`qcourse.engines.ort`, CPU, the embedded default): FP32, and INT8
  from qcourse's TensorRT-style Q/DQ graph rewritten so ORT uses integer kernels
  (:mod:`qcourse.engines.ort_int8` explains the rewrite and which steps are exact);
* ``tensorrt`` (:mod:`qcourse.engines.trt`, TensorRT 10 or 11 on a CUDA GPU): strongly typed
  builds, so the graph sets the precision: INT8 from explicit Q/DQ, FP16 from an FP16 copy of
  the graph (:mod:`qcourse.engines.fp16`), FP32 without TF32; dynamic batch, timing cache,
  per-layer precision report.

An engine returns its outputs by name (``engine.run(images, ["output0"])``); calling it gives
the graph's first output.

Timing lives in :mod:`qcourse.engines.bench`. Evaluating an engine's detections is the
caller's job (the YOLO layer passes the engine to ``qcourse.yolo.evaluate.evaluate``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

from qcourse.engines.base import (BACKENDS, PRECISIONS, BackendUnavailable, Engine, EngineError, PathLike,
                                  check_precision)
from qcourse.engines.ort_int8 import strip_qdq, to_ort_int8

__all__ = ["Engine", "EngineError", "BackendUnavailable", "BACKENDS", "PRECISIONS", "build_engine",
           "load_engine", "available_backends", "to_ort_int8", "strip_qdq"]

#: engine file suffix of each backend: how load_engine tells them apart
SUFFIX = {"onnxruntime": ".onnx", "tensorrt": ".engine"}


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (usable, version or why not)}`` for this machine."""
    import onnxruntime

    from qcourse.engines import trt

    return {"onnxruntime": (True, onnxruntime.__version__), "tensorrt": trt.available()}


def build_engine(onnx_path: PathLike, out: PathLike, backend: str = "onnxruntime", precision: str = "int8",
                 *, batch: Sequence[int] = (1, 8, 32), timing_cache: Optional[PathLike] = None,
                 threads: Optional[int] = None, calibration: Optional[Iterable] = None,
                 calib_method: str = "entropy", device=None, tf32: bool = False) -> Engine:
    """Build an engine from ``onnx_path``, save it to ``out`` and return it loaded.

    Args:
        onnx_path: a float ONNX (fp32 / fp16) or one exported with Q/DQ (int8; fp32 on
            onnxruntime strips the Q/DQ pairs).
        out: the engine file: ``.onnx`` for onnxruntime, ``.engine`` for tensorrt.
        backend: ``"onnxruntime"`` or ``"tensorrt"``; precision: ``"fp32"``, ``"fp16"``, ``"int8"``.
        batch: (min, opt, max) batch of TensorRT's optimization profile (ORT takes any).
        timing_cache: TensorRT's timing cache file (default: next to ``out``).
        threads: ORT intra-op threads of the returned engine (default: ORT's choice).
        calibration, calib_method: onnxruntime int8 only: input batches that calibrate the
            outputs of the Convs feeding float Convs, so that those run integer kernels too
            (:func:`qcourse.engines.ort.build`). TensorRT needs none: it runs such a Conv in
            INT8 with a float output.
        device: tensorrt only: the CUDA device to build and run on (``"cuda:1"``; default: torch's
            current one). ONNX Runtime engines run on the CPU: pass ``None`` or ``"cpu"``.
        tf32: tensorrt fp32 only: let FP32 layers use TF32 math (off: "fp32" means FP32).
    """
    check_precision(backend, precision)
    _check_ort_device(backend, device)
    out = Path(out)
    if out.suffix != SUFFIX[backend]:
        raise EngineError(f"a {backend} engine file ends in {SUFFIX[backend]}, got {out}; "
                          f"pass e.g. {out.with_suffix(SUFFIX[backend])}")
    if backend == "tensorrt":
        from qcourse.engines import trt

        return trt.load(trt.build(onnx_path, out, precision, batch=batch, timing_cache=timing_cache, device=device,
                                  tf32=tf32), device=device)
    from qcourse.engines import ort

    return ort.load(ort.build(onnx_path, out, precision, calibration=calibration, calib_method=calib_method),
                    threads=threads)


def _check_ort_device(backend: str, device) -> None:
    if backend == "onnxruntime" and device is not None and str(device) != "cpu":
        raise EngineError(f"ONNX Runtime engines here run on the CPU, got device {str(device)!r}; pass cpu, or "
                          "build a TensorRT engine (.engine) for a GPU")


def load_engine(path: PathLike, threads: Optional[int] = None, device=None) -> Engine:
    """Load an engine file: ``.onnx`` with ONNX Runtime, ``.engine`` / ``.plan`` with TensorRT.

    ``device``: TensorRT's CUDA device (``"cuda:N"``, default torch's current one); ONNX Runtime
    engines take ``None`` or ``"cpu"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"engine file not found: {path}; build one with qcourse build "
                                "(or qcourse.engines.build_engine)")
    if path.suffix == ".onnx":
        from qcourse.engines import ort

        _check_ort_device("onnxruntime", device)

        return ort.load(path, threads=threads)
    if path.suffix in (".engine", ".plan"):
        from qcourse.engines import trt

        return trt.load(path, device=device)
    raise EngineError(f"cannot tell the backend of {path}: pass an .onnx (onnxruntime) or .engine (tensorrt) file")
