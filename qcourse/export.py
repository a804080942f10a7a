"""Lesson 3 — export a fake-quantized model to ONNX with explicit Q/DQ pairs.

The ONNX form lives with the function it exports (``FakeTensorQuantFunction.symbolic`` in
:mod:`qcourse.tensor_quant`, as in the reference); this module drives the exporter and
reads the graphs back. Each enabled :class:`~qcourse.nn.TensorQuantizer` becomes::

    QuantizeLinear(x, y_scale, y_zero_point[, axis]) -> DequantizeLinear(...)

with ``y_scale = amax / max_bound`` as a float32 constant, ``y_zero_point = 0`` (int8, or
uint8 for unsigned quantizers) and, for per-channel weights, ``axis`` = the channel axis.
This is the explicit-quantization graph TensorRT 10 consumes and ONNX Runtime runs with
integer kernels. A narrow-range quantizer (no -128 code) gets a ``Max(x, -127*y_scale)``
in front of its ``QuantizeLinear``, so the exported graph never produces a code that
training never saw.

The PyTorch forward divides by the same float32 ``y_scale`` and rounds half to even,
like ``QuantizeLinear``: a single quantizer exported here matches ONNX Runtime exactly.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from qcourse.nn import TensorQuantizer
from qcourse.utils import atomic_write

__all__ = ["export_onnx", "list_qdq_nodes", "load_onnx", "check_exportable"]


def check_exportable(model: nn.Module, opset: int = 13) -> List[str]:
    """Names of enabled quantizers that cannot be exported at ``opset``, with reasons.

    ONNX QuantizeLinear holds 8-bit integer codes from opset 13, and FP8 E4M3
    (``num_bits=(4, 3)``) from opset 19.
    """
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and m.is_enabled and m.is_quant_enabled:
            if not m.has_amax:
                problems.append(f"{name}: no amax (calibrate it, or disable it)")
            elif m.num_bits == (4, 3) and opset < 19:
                problems.append(f"{name}: FP8 E4M3 needs opset >= 19, got {opset} (pass opset=19)")
            elif m.num_bits not in (8, (4, 3)):
                problems.append(f"{name}: num_bits={m.num_bits} (ONNX Q/DQ is 8-bit integer or FP8 E4M3)")
            elif not m.fake_quant:
                problems.append(f"{name}: fake_quant=False (export needs fake quantization)")
    return problems


def export_onnx(model: nn.Module, example: Union[torch.Tensor, Sequence[torch.Tensor]],
                path: Union[str, os.PathLike], opset: int = 13, dynamic_batch: bool = True,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                check: bool = True) -> Path:
    """Export ``model`` (float or fake-quantized) to ONNX with Q/DQ nodes (lesson 3).

    Args:
        model: the model; its enabled quantizers must all have an amax.
        example: an example input (or tuple of inputs) with the real shape.
        path: output file; written atomically (a partial file never appears).
        opset: ONNX opset, >= 13 (per-channel QuantizeLinear needs 13).
        dynamic_batch: make dim 0 of every input and output symbolic (``batch``).
        input_names / output_names: graph names (default ``input``/``output``, numbered).
        check: run ``onnx.checker`` on the result.

    Uses the TorchScript exporter (``dynamo=False``), which honours the opset and the
    custom Q/DQ symbolic; the dynamo exporter would silently raise the opset to 18.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13 (per-channel QuantizeLinear), got {opset!r}")
    problems = check_exportable(model, opset)
    if problems:
        raise RuntimeError("cannot export these quantizers:\n  " + "\n  ".join(problems))
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    n_in = len(args)
    input_names = list(input_names) if input_names else (
        ["input"] if n_in == 1 else [f"input{i}" for i in range(n_in)])
    if len(input_names) != n_in:
        raise ValueError(f"got {len(input_names)} input_names for {n_in} inputs")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*args)
    outs = [out] if isinstance(out, torch.Tensor) else [t for t in _flatten(out)]
    output_names = list(output_names) if output_names else (
        ["output"] if len(outs) == 1 else [f"output{i}" for i in range(len(outs))])
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    path = Path(path)
    try:
        with atomic_write(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(tmp), opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True, dynamo=False)
            if check:
                onnx.checker.check_model(str(tmp))
    finally:
        model.train(was_training)
    return path


def _flatten(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _flatten(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _flatten(o)


def load_onnx(path: Union[str, os.PathLike]):
    """``onnx.load`` with clear errors for a missing or corrupt file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}; export one with qcourse.export.export_onnx")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, ...
        raise ValueError(f"{path} is not a valid ONNX model ({type(e).__name__}: {e}); "
                         "re-export it with qcourse.export.export_onnx") from None
    return model


def list_qdq_nodes(model_or_path) -> List[Dict]:
    """Every QuantizeLinear node of an ONNX graph: name, input, scale(s), zero point, axis."""
    import onnx
    from onnx import numpy_helper

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_onnx(model_or_path)
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:   # graph order: an Identity comes after what it copies
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            # the exporter shares one folded scale between quantizers that share an amax
            consts[node.output[0]] = consts[node.input[0]]
    rows = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        scale = consts.get(node.input[1])
        zp = consts.get(node.input[2]) if len(node.input) > 2 else None
        rows.append({
            "name": node.name, "input": node.input[0],
            "scale": None if scale is None else np.asarray(scale),
            "zero_point": None if zp is None else np.asarray(zp),
            "axis": axis if scale is not None and np.ndim(scale) > 0 else None,
        })
    return rows
