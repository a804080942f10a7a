"""Shared checks of an exported graph's Q/DQ structure, and the graph as the exporter wrote it.

The oracles: the graph read node by node, ONNX shape inference for the types, and ONNX
Runtime with its graph optimizations off (the reference kernels, run as written).
"""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcourse import export


def untidied_export(*args, **kwargs):
    """``export_onnx`` without its tidy pass: the TorchScript exporter's graph as it comes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "_tidy_file", lambda path: None)
        return export.export_onnx(*args, **kwargs)


def qdq_structure(model) -> dict:
    """Counts on the main graph: ``identity`` (Q/DQ scale or zero-point inputs an Identity
    makes), ``not_initializer`` (such inputs that are no initializer), ``shared`` (such inputs
    some other node reads too), ``noop_casts`` (Casts to their input's inferred type),
    ``casts``, ``identities``, ``qdq`` (Q/DQ nodes) and ``nodes``."""
    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    reads = collections.Counter(i for n in g.node for i in n.input)
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    params = [i for n in qdq for i in n.input[1:3] if i]
    inferred = onnx.shape_inference.infer_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    elem.update({i.name: i.data_type for i in g.initializer})
    casts = [n for n in g.node if n.op_type == "Cast"]
    return {
        "identity": sum(p in producer and producer[p].op_type == "Identity" for p in params),
        "not_initializer": sum(p not in inits for p in params),
        "shared": sum(reads[p] > 1 for p in params),
        "noop_casts": sum(elem.get(c.input[0]) == next(a.i for a in c.attribute if a.name == "to") for c in casts),
        "casts": len(casts),
        "identities": sum(n.op_type == "Identity" for n in g.node),
        "qdq": len(qdq),
        "nodes": len(g.node),
    }


TIDY = {"identity": 0, "not_initializer": 0, "shared": 0, "noop_casts": 0}


def assert_tidy(model):
    got = qdq_structure(model)
    assert {k: got[k] for k in TIDY} == TIDY, got


def run_reference(model, *inputs):
    """ONNX Runtime outputs with graph optimizations off (the graph run exactly as written)."""
    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), inputs)})


def assert_bit_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
        assert x.tobytes() == y.tobytes()   # bit for bit: the sign of zero too


def assert_same_quantizers(a, b):
    """``list_qdq_nodes`` of two graphs: the same nodes, scales, zero points (and types), axes."""
    ra, rb = export.list_qdq_nodes(a), export.list_qdq_nodes(b)
    assert [r["name"] for r in ra] == [r["name"] for r in rb] and ra
    for p, q in zip(ra, rb):
        assert p["axis"] == q["axis"]
        for key in ("scale", "zero_point"):
            assert p[key].dtype == q[key].dtype and p[key].shape == q[key].shape
            np.testing.assert_array_equal(p[key], q[key])
