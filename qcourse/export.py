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

After the export, :func:`tidy_qdq_graph` gives every QuantizeLinear and DequantizeLinear its
own scale and zero-point initializer (as pytorch_quantization's graphs have, and as
TensorRT's ONNX parser documents) and removes the Casts that do not change a type. It
changes no value: the outputs are bit-identical.

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
from qcourse.utils import atomic_write, check_file_size

__all__ = ["export_onnx", "list_qdq_nodes", "load_onnx", "check_exportable", "tidy_qdq_graph",
           "remove_noop_casts"]


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
    custom Q/DQ symbolic; the dynamo exporter would silently raise the opset to 18. Its graph
    then goes through :func:`tidy_qdq_graph` (own Q/DQ constants, no no-op Casts).
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
            _tidy_file(tmp)
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


# ----------------------------------------------------------------------------- the tidy pass
def _tidy_file(path) -> None:
    import onnx

    model = onnx.load(str(path))
    tidy_qdq_graph(model)
    onnx.save(model, str(path))


def _retain(field, keep) -> None:
    """Keep only the items of a repeated protobuf field (nodes, initializers, ...) for which ``keep`` is true."""
    items = [x for x in field if keep(x)]
    del field[:]
    field.extend(items)


def tidy_qdq_graph(model) -> Dict[str, int]:
    """Rewrite an exported graph in place into the form TensorRT's ONNX parser documents. Exact.

    * every QuantizeLinear / DequantizeLinear reads its own scale and zero-point initializer,
      as in pytorch_quantization's graphs: the TorchScript exporter folds equal constants
      into one initializer, shares it between quantizers (and routes some uses through
      ``Identity`` nodes) and leaves the zero points as ``Constant`` nodes;
    * a ``Cast`` to the type its input already has is removed (the exporter records a
      ``.float()`` of a float tensor as one); a Cast that changes the type stays.

    The values are untouched, so every output is bit-identical. :func:`export_onnx` runs this
    on every export; it also tidies a graph exported before (running it twice changes nothing).
    Returns counts: ``qdq_constants`` (scale/zero-point inputs given their own initializer),
    ``casts`` (Casts removed), ``nodes_removed`` (those Casts and the Identity/Constant nodes
    no longer read).
    """
    n_before = len(model.graph.node)
    given = _own_qdq_constants(model)
    casts = remove_noop_casts(model)
    return {"qdq_constants": given, "casts": casts, "nodes_removed": n_before - len(model.graph.node)}


def _constant_protos(graph) -> Dict[str, object]:
    """Tensor name -> the TensorProto holding its value: initializers, ``Constant`` nodes, and
    ``Identity`` copies of those (graph order: an Identity comes after what it copies)."""
    protos = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                protos[node.output[0]] = value
        elif node.op_type == "Identity" and node.input[0] in protos:
            protos[node.output[0]] = protos[node.input[0]]
    return protos


def _subgraph_names(graph) -> set:
    """Every tensor name read or written inside a subgraph (If/Loop/Scan bodies) of ``graph``."""
    names = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                for n in sub.node:
                    names.update(n.input)
                    names.update(n.output)
                names.update(_subgraph_names(sub))
    return names


def _all_names(graph) -> set:
    names = {i.name for i in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    names |= {v.name for v in graph.value_info} | _subgraph_names(graph)
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


def _own_qdq_constants(model) -> int:
    """Give every Q/DQ node its own scale and zero-point initializer; drop what no longer has a reader."""
    import collections

    g = model.graph
    protos = _constant_protos(g)
    readers = collections.Counter(i for n in g.node for i in n.input)
    readers.update(v.name for v in g.output)
    readers.update(_subgraph_names(g))
    inits = {i.name for i in g.initializer}
    taken = _all_names(g)
    detached, given = set(), 0
    for k, node in enumerate(g.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        prefix = "y" if node.op_type == "QuantizeLinear" else "x"
        for slot, what in ((1, "scale"), (2, "zero_point")):
            if slot >= len(node.input) or node.input[slot] not in protos:
                continue   # an optional zero point left out, or a scale computed at run time
            src, base = node.input[slot], f"{node.name or f'{node.op_type}_{k}'}/{prefix}_{what}"
            if src in inits and readers[src] == 1 and src.startswith(base):
                continue   # already its own (a tidied graph)
            name, n = base, 0
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            tensor = g.initializer.add()
            tensor.CopyFrom(protos[src])
            tensor.name = name
            taken.add(name)
            readers[src] -= 1
            node.input[slot] = name
            detached.add(src)
            given += 1
    _drop_unread(g, detached, readers)
    return given


def _drop_unread(graph, names: set, readers) -> None:
    """Remove the initializers, ``Constant`` and ``Identity`` nodes among ``names`` nobody reads."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer} - {v.name for v in graph.input}
    dead_nodes, dead_inits = set(), set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if readers[name] > 0 or name in dead_inits:
            continue
        node = producer.get(name)
        if node is None:
            if name in inits:
                dead_inits.add(name)
        elif node.op_type in ("Constant", "Identity") and id(node) not in dead_nodes:
            dead_nodes.add(id(node))
            for i in node.input:   # an Identity's source loses a reader
                readers[i] -= 1
                todo.append(i)
    gone = {o for n in producer.values() if id(n) in dead_nodes for o in n.output} | dead_inits
    _retain(graph.node, lambda n: id(n) not in dead_nodes)
    _retain(graph.initializer, lambda i: i.name not in dead_inits)
    _retain(graph.value_info, lambda v: v.name not in gone)


def remove_noop_casts(model) -> int:
    """Remove, in place, every ``Cast`` of the main graph whose input already has the target type.

    The types come from ONNX shape inference; a Cast whose input type is unknown, or that
    changes the type, stays. Readers of the Cast's output read its input instead; where the
    output is a graph output, the input's producer writes it under that name (a Cast that
    copies a graph input or an initializer straight to a graph output stays: no node could).
    Exact. Returns how many were removed.
    """
    import onnx

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a graph shape inference cannot read: keep every Cast
        return 0
    elem = {v.name: v.type.tensor_type.elem_type
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    elem.update({i.name: i.data_type for i in g.initializer})
    outputs = {v.name for v in g.output}
    fixed = {v.name for v in g.input} | {i.name for i in g.initializer} | outputs | _subgraph_names(g)
    producer = {o: n for n in g.node for o in n.output}
    removed, gone = [], set()
    for cast in list(g.node):
        if cast.op_type != "Cast":
            continue
        to = next((a.i for a in cast.attribute if a.name == "to"), None)
        src, out = cast.input[0], cast.output[0]
        if not to or elem.get(src) != to:
            continue
        if out in outputs:   # the graph output keeps its name: src's producer writes it
            if src in fixed or src not in producer:
                continue
            old, new = src, out
            producer[src].output[list(producer[src].output).index(src)] = out
            producer[out] = producer.pop(src)
        elif out in fixed:
            continue
        else:
            old, new = out, src
        for n in g.node:
            if n is not cast:
                for k, i in enumerate(n.input):
                    if i == old:
                        n.input[k] = new
        removed.append(cast)
        gone.add(old)
    if removed:
        ids = {id(c) for c in removed}
        _retain(g.node, lambda n: id(n) not in ids)
        _retain(g.value_info, lambda v: v.name not in gone)
    return len(removed)


#: the largest ONNX file read: protobuf's 2 GiB limit (weights beyond it live in external data files)
MAX_ONNX_BYTES = 2 << 30


def load_onnx(path: Union[str, os.PathLike]):
    """``onnx.load`` with clear errors for a missing, corrupt or too large file (refused before it is read)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}; export one with qcourse.export.export_onnx")
    check_file_size(path, MAX_ONNX_BYTES, "an ONNX file (protobuf's limit; a larger model keeps its weights in "
                    "external data files)", "pass an ONNX model exported by qcourse.export.export_onnx")
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
    # export_onnx gives each node its own initializers; older exports may route a shared one
    # through Identity nodes, or hold a zero point in a Constant node: both are read here too
    protos = _constant_protos(model.graph)
    consts = {name: numpy_helper.to_array(t) for name, t in protos.items()}
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
