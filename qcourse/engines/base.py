"""Lesson 8 — what every engine is: a callable from images to the model's outputs.

An engine is built once from an ONNX file (:func:`qcourse.engines.build_engine`), saved as
one file, loaded again (:func:`qcourse.engines.load_engine`) and called like a model::

    engine = load_engine("runs/engines/int8.onnx")
    pred = engine(images)          # float32 (B, 3, H, W) in [0, 1] -> first output, numpy
    aux = engine.run(images, ["output1"])["output1"]   # any output, by name

so ``qcourse.yolo.evaluate.evaluate(engine, loader)`` scores its detections like any model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Engine", "EngineError", "BackendUnavailable", "BACKENDS", "PRECISIONS", "check_precision",
           "as_batch"]

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")

PathLike = Union[str, os.PathLike]


class EngineError(ValueError):
    """An engine cannot be built, loaded or run as asked (the message says why and what to do)."""


class BackendUnavailable(EngineError):
    """The backend's library (or its hardware) is not usable on this machine."""


def check_precision(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise EngineError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def as_batch(images, dtype=np.float32) -> np.ndarray:
    """``images`` (torch tensor or array, (B, C, H, W)) as a contiguous numpy array of ``dtype``."""
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=dtype)
    if images.ndim != 4:
        raise EngineError(f"an engine takes a batch of images (B, C, H, W), got shape {images.shape}")
    return images


class Engine:
    """The interface both backends implement. Subclasses set the attributes and ``run``."""

    backend: str = ""
    precision: str = ""
    path: Path
    input_name: str = "input"
    #: the output names in the ONNX graph's order (the backends look outputs up by name)
    output_names: Tuple[str, ...] = ()
    #: (min, max) batch the engine accepts; ``None`` for no upper bound
    batch_range: Tuple[int, Optional[int]] = (1, None)
    #: (C, H, W) of one image, ``None`` where a dimension is free
    image_shape: Tuple[Optional[int], ...] = (None, None, None)

    def run(self, images, outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """The outputs named in ``outputs`` (default: all) for one batch, by name.

        Only those are computed or copied back where the backend allows it (TensorRT computes
        every output on the GPU but copies only these to the host).
        """
        raise NotImplementedError

    def __call__(self, images, output: Optional[str] = None) -> np.ndarray:
        """One output, by name: ``output``, by default the graph's first (``output_names[0]``;
        for YOLOv7, ``output0``: predictions (B, anchors, 5 + nc))."""
        name = output or self.output_names[0]
        return self.run(images, (name,))[name]

    def select_outputs(self, outputs: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
        """``outputs`` checked against the engine's output names (all of them for ``None``)."""
        if outputs is None:
            return tuple(self.output_names)
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        unknown = [n for n in outputs if n not in self.output_names]
        if unknown or not outputs:
            what = f"no output {unknown[0]!r}" if unknown else "no output asked for"
            raise EngineError(f"{self.path}: {what}; its outputs are {list(self.output_names)}: ask for one "
                              "or more of those by name")
        return outputs

    def check_batch(self, images: np.ndarray) -> None:
        """Refuse a batch size or image shape the engine was not built for, naming the fix."""
        low, high = self.batch_range
        b = images.shape[0]
        if b < low or (high is not None and b > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise EngineError(f"{self.path} was built for batch sizes {span}, got {b}; rebuild it with a "
                              f"batch range that holds {b} (qcourse build --max-batch {max(b, low)})")
        for got, want, what in zip(images.shape[1:], self.image_shape, ("channels", "height", "width")):
            if want is not None and got != want:
                raise EngineError(f"{self.path} was built for input {what} {want}, got {got} (shape "
                                  f"{tuple(images.shape)}); resize the images or rebuild the engine")

    def describe(self) -> str:
        low, high = self.batch_range
        return (f"{self.path.name}: {self.backend} {self.precision}, batch {low}..{high or 'any'}, "
                f"input {self.input_name} {tuple(self.image_shape)}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def shape_tuple(dims: Sequence) -> Tuple[Optional[int], ...]:
    """ONNX / ORT dims as ints, ``None`` for a symbolic one."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in dims)


def onnx_input_shape(model) -> Tuple[Optional[int], ...]:
    """The first input's shape of an ``onnx.ModelProto``, ``None`` for a symbolic dim (the batch)."""
    return shape_tuple([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
