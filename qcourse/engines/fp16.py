"""Lesson 8 — an FP16 copy of a float ONNX graph: what a strongly typed TensorRT build runs in FP16.

A strongly typed TensorRT network (the only kind TensorRT 11 builds, and the one
:mod:`qcourse.engines.trt` builds on 10 too) runs every layer in the type its graph says:
there is no ``--fp16`` switch that lets the builder pick. An FP16 engine therefore starts
from an FP16 graph, written here:

* every float32 weight, ``Constant`` and ``ConstantOfShape`` value becomes float16, and every
  ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``; a weight outside FP16's range (65504) is
  refused with its name, since FP16 cannot hold it;
* with ``keep_io_types`` (the default) the graph still takes and returns float32, as the FP32
  and INT8 engines do: a ``Cast`` to float16 follows each float input and a ``Cast`` to float32
  precedes each float output, so TensorRT converts on the GPU and callers change nothing;
* the inputs ONNX types as float32 only (``Resize``'s scales, ``Upsample``'s) stay float32.

Integer tensors (shapes, indices) are untouched. The result is checked by ONNX's type
inference before it is returned.
"""
from __future__ import annotations

from typing import Dict, Set, Tuple

import numpy as np

from qcourse.engines.base import EngineError

__all__ = ["to_fp16", "FP16_MAX"]

FP16_MAX = float(np.finfo(np.float16).max)

#: (op_type, input index) that ONNX types as tensor(float) whatever the data's type
FLOAT32_ONLY: Set[Tuple[str, int]] = {("Resize", 2), ("Upsample", 1)}
#: ops whose output type comes from an attribute other than the ones handled here
UNSUPPORTED = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike",
               "Multinomial", "Bernoulli", "QuantizeLinear", "DequantizeLinear")


def _half(array: np.ndarray, what: str) -> np.ndarray:
    big = float(np.abs(array).max()) if array.size else 0.0
    if not np.isfinite(big) or big > FP16_MAX:
        raise EngineError(f"{what} holds {big:g}, beyond FP16's range (+-{FP16_MAX:g}): this model cannot "
                          "run in FP16; build it in fp32 (or int8)")
    return array.astype(np.float16)


def to_fp16(model, keep_io_types: bool = True):
    """An FP16 copy of the float ONNX ``model`` (a ``ModelProto``; the input is not changed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for node in g.node:
        if node.op_type in UNSUPPORTED:
            raise EngineError(f"node {node.name or node.op_type} ({node.op_type}) has no FP16 form here: pass a float "
                              "graph without Q/DQ or random ops for fp16 (Q/DQ graphs build int8)")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise EngineError(f"node {node.name or node.op_type} ({node.op_type}) has a subgraph, which the FP16 "
                              "conversion does not handle; build fp32")
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    keep = set()  # float32-only inputs fed by a constant: the constant stays float32
    casts = []  # float32-only inputs fed by a computed tensor: a Cast back to float32 in front
    for node in g.node:
        for op, idx in FLOAT32_ONLY:
            if node.op_type == op and len(node.input) > idx and node.input[idx]:
                if node.input[idx] in consts:
                    keep.add(node.input[idx])
                else:
                    casts.append((node, idx))

    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(init), f"weight {init.name!r}"),
                                                  init.name))
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT and (
                    node.op_type != "Constant" or node.output[0] not in keep):
                attr.t.CopyFrom(numpy_helper.from_array(
                    _half(numpy_helper.to_array(attr.t), f"constant {node.output[0]!r}"), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                raise EngineError(f"node {node.name or node.op_type} holds a float64 constant; export in float32")
    for k, (node, idx) in enumerate(casts):
        name = f"{node.input[idx]}__fp32_{k}"
        g.node.append(helper.make_node("Cast", [node.input[idx]], [name], to=TensorProto.FLOAT,
                                       name=f"{name}_cast"))
        node.input[idx] = name

    float_inputs = [v for v in g.input if v.type.tensor_type.elem_type == TensorProto.FLOAT
                    and v.name not in {i.name for i in g.initializer}]
    float_outputs = [v for v in g.output if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    if keep_io_types:
        first: list = []
        for v in float_inputs:
            half = f"{v.name}__fp16"
            for node in g.node:
                node.input[:] = [half if i == v.name else i for i in node.input]
            first.append(helper.make_node("Cast", [v.name], [half], to=TensorProto.FLOAT16, name=f"{half}_cast"))
        renamed: Dict[str, str] = {v.name: f"{v.name}__fp16" for v in float_outputs}
        for node in g.node:
            node.output[:] = [renamed.get(o, o) for o in node.output]
            node.input[:] = [renamed.get(i, i) for i in node.input]
        last = [helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT, name=f"{half}_cast")
                for name, half in renamed.items()]
        _set_nodes(g, first + list(g.node) + last)
    else:
        for v in float_inputs + float_outputs:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    _toposort(g)
    del g.value_info[:]  # float32 types of intermediate tensors: inference gives them again
    try:
        onnx.checker.check_model(out)
        onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    except Exception as e:  # onnx's checker / inference errors: one line, with the fix
        raise EngineError(f"the FP16 copy of the graph does not type-check ({' '.join(str(e).split())[:300]}); "
                          "build fp32, or export the model in FP16 yourself") from None
    return out


def _toposort(g) -> None:
    """Order ``g.node`` so that every node follows the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes, done = list(g.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                done.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise EngineError(f"the graph has a cycle or a missing input at {rest[0].name or rest[0].op_type}")
        nodes = rest
    _set_nodes(g, done)


def _set_nodes(g, nodes) -> None:
    """Replace ``g.node`` by ``nodes`` (copied first: they may be ``g.node``'s own messages)."""
    from onnx import NodeProto

    copies = []
    for n in nodes:
        c = NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
