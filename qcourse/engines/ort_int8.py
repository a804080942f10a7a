"""Lesson 8 — rewrite a TensorRT-style Q/DQ graph so that ONNX Runtime runs it in INT8.

qcourse exports what TensorRT wants (lesson 3): a QuantizeLinear/DequantizeLinear pair on
every quantized Conv's *input* and *weight*, nothing on its output. TensorRT fuses the
pairs into INT8 kernels itself. ONNX Runtime on a CPU only forms an integer kernel
(QLinearConv) where a whole ``DQ -> Conv -> Q`` pattern exists; without the output Q it
runs DequantizeLinear + a float Conv, slower than the FP32 model (0.62x on the default).

:func:`to_ort_int8` rewrites the graph in steps; each step says whether it is exact:

1. ``_drop_float_casts``: Casts to the type a tensor already has (graphs exported before
   export_onnx removed them). Exact.
2. ``_fold_weights``: ``Q(W) -> DQ`` becomes ``DQ(codes)`` (the codes ORT would compute),
   stored as uint8 with zero point 128 by default (same values; see ``_weights_to_uint8``). Exact.
3. ``_to_uint8``: activation Q/DQ int8/zero point 0 -> uint8/zero point 128: the same
   values, shifted by 128 — and ORT's fast u8s8 kernels need unsigned activations. Exact.
4. ``_quantize_outputs``: a Conv's output goes through an activation whose positive side
   is the identity (LeakyRelu, Relu) and then, possibly through Concat / MaxPool / nearest
   Resize, into Q nodes that all use one scale ``s`` (the next layers' calibrated input
   scale, kept). Quantizing the activation output at ``s`` is exact (those ops commute
   with rounding, and Q(DQ(Q(x))) = Q(x)). Where the uses quantize at several scales (a
   Conv and a Concat with its own scale), the direct Conv's scale is used and the Concat
   re-quantizes: one more rounding (see ``_choose_qparams``). Quantizing the Conv output itself at ``s``
   (uint8, zero point 128) is what QLinearConv needs: exact for outputs >= 0, within one
   code of the fake-quant value for negative ones (LeakyRelu's 0.1 slope rounds twice),
   and clipped at -128 s before the slope (outputs below -128 s, rare after a calibrated
   layer). The Conv's float bias becomes int32 at scale ``s_x * s_w`` (ORT's QLinearConv
   needs it; an error of at most half a bias code, far below one output code).
5. ``_requantize_transparent``: a Q/DQ after Concat / MaxPool / Resize whose inputs are
   all on one grid (so ORT runs them on uint8). Exact.
6. ``_drop_requantize``: ``DQ(s, z) -> Q(s, z)`` pairs left by steps 4-5 are removed. Exact.
7. ``_merge_quantizers``: Q nodes reading one tensor with the same scale become one (ORT
   forms an integer MaxPool / QLinearConcat only under a single Q). Exact.
8. ``_split_concats``: one copy of a Concat per Q node reading it (QLinearConcat needs a
   single Q). Exact.
9. ``_float_weights``: a Conv that stays float reads its weight as a float constant
   (``DQ(codes)`` computed once) so that ORT pre-packs it. Exact.

Convs whose output feeds anything else (the float detection head, a graph output, Q
nodes of different scales) keep a float output: the rewrite never guesses a scale. It
can *measure* one: the Convs that feed only float Convs (in YOLOv7 the three 3x3 Convs
before the float detection head, the largest in the network) are listed by
:func:`calibration_targets`; :func:`calibrate_outputs` runs the Q/DQ graph on
calibration images and picks each output's amax with qcourse's calibrators (lesson 4),
and ``to_ort_int8(..., output_amax=...)`` quantizes those outputs (``_quantize_calibrated``,
one extra rounding where TensorRT would run an INT8 Conv with a float output; ORT has no
such kernel). The activation after them, and the head, stay float.

``exact_only=True`` stops before the inexact part of step 4, so tests can check that
every other step leaves the outputs bit-identical.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from qcourse.engines.base import EngineError, as_batch
from qcourse.export import remove_noop_casts

__all__ = ["to_ort_int8", "strip_qdq", "qdq_summary", "cpu_has_vnni", "calibration_targets", "calibrate_outputs"]

#: ops through which a per-tensor quantization commutes exactly (max, copy, select)
_TRANSPARENT = ("Concat", "MaxPool", "Resize")
#: activations whose positive side is the identity, so a Q before them can reuse the scale after
_ACTIVATIONS = ("LeakyRelu", "Relu")


class _Graph:
    """Producers, consumers and constants of an ONNX graph, rebuilt after every edit."""

    def __init__(self, model):
        self.model = model
        self.g = model.graph
        self.refresh()

    def refresh(self):
        from onnx import numpy_helper

        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}
        self.const = {i.name: i for i in self.g.initializer}
        self.values = {}  # Constant node outputs, as arrays
        for n in self.g.node:
            if n.op_type == "Constant":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            elif n.op_type == "Identity" and (n.input[0] in self.const or n.input[0] in self.values):
                self.values[n.output[0]] = self.array(n.input[0])

    def array(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        if name in self.const:
            return numpy_helper.to_array(self.const[name])
        return self.values.get(name)

    def qparams(self, node) -> Optional[Tuple[float, int, str]]:
        """``(scale, zero point, dtype)`` of a per-tensor Q/DQ node, else ``None``."""
        scale = self.array(node.input[1])
        zp = self.array(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale is None or zp is None or scale.size != 1:
            return None
        return float(scale.reshape(())), int(zp.reshape(())), str(zp.dtype)

    def add_init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.g.initializer.append(numpy_helper.from_array(arr, name))
        return name


def _rebuild(graph: _Graph, after: Dict[str, List], drop: set) -> None:
    """Replace the node list: drop ``drop`` (node names), insert ``after[name]`` after each node."""
    nodes = []
    for n in graph.g.node:
        if n.name not in drop:
            nodes.append(n)
        nodes.extend(after.get(n.name, []))
    del graph.g.node[:]
    graph.g.node.extend(nodes)
    graph.refresh()


def _rename_input(graph: _Graph, old: str, new: str, skip=()) -> None:
    for n in list(graph.consumers[old]):
        if n.name in skip:
            continue
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


def _name_nodes(graph: _Graph) -> None:
    # every node needs a unique name: _rebuild keys on it
    seen = set()
    for k, n in enumerate(graph.g.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{k}"
        seen.add(n.name)


def _drop_float_casts(graph: _Graph) -> None:
    """Remove Casts to the type the tensor already has (the exporter's ``.float()``). Exact.

    export_onnx already removes them; a graph exported before may still hold some."""
    remove_noop_casts(graph.model)
    graph.refresh()


def _fold_weights(graph: _Graph, weight_dtype: str) -> None:
    """``QuantizeLinear(W const) -> DQ`` becomes ``DQ(int8 codes)``, rounded as ONNX does. Exact."""
    drop = set()
    for n in graph.g.node:
        w = graph.array(n.input[0]) if n.op_type == "QuantizeLinear" else None
        if w is None or w.ndim < 2:
            continue
        scale, zp = graph.array(n.input[1]), graph.array(n.input[2])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        # ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in float32
        q = np.rint(w.astype(np.float32) / scale.astype(np.float32).reshape(shape)) + zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        codes = np.clip(q, info.min, info.max).astype(zp.dtype)
        if weight_dtype == "uint8" and zp.dtype == np.int8 and not zp.any():
            codes, zp_u8 = _weights_to_uint8(codes)
            dq = graph.consumers[n.output[0]]
            for d in dq:
                d.input[2] = graph.add_init(f"{n.name}_zp_u8", zp_u8.reshape(zp.shape))
        graph.add_init(n.output[0], codes)
        drop.add(n.name)
    _rebuild(graph, {}, drop)


def _weights_to_uint8(codes: np.ndarray):
    """int8 weight codes with zero point 0 -> uint8 codes with zero point 128 (the same values).

    On x86 CPUs without VNNI, ORT's uint8 x int8 kernels add pairs of products in 16 bits
    (``vpmaddubsw``), which saturates: on the default model that cost 4.6 mAP points. The
    uint8 x uint8 kernels widen first and never saturate.
    """
    return (codes.astype(np.int16) + 128).astype(np.uint8), np.full(codes.shape[0], 128, np.uint8)


def _to_uint8(graph: _Graph) -> None:
    """Per-tensor activation Q/DQ: int8 with zero point 0 -> uint8 with zero point 128. Exact."""
    shifted = {}
    for n in graph.g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[0] in graph.const:
            continue
        p = graph.qparams(n)
        if p is None or p[1:] != (0, "int8"):
            continue
        key = n.input[2] if len(n.input) > 2 else None
        if key not in shifted:
            shifted[key] = graph.add_init(f"{n.name}_zp_u8", np.array(128, np.uint8))
        if len(n.input) > 2:
            n.input[2] = shifted[key]
        else:
            n.input.append(shifted[key])
    graph.refresh()


def _requests(graph: _Graph, tensor: str, memo: dict):
    """How the uses of ``tensor`` quantize it: ``(direct, through)`` sets of ``(scale, zp, dtype)``.

    ``direct``: Q nodes reading ``tensor`` itself; ``through``: Q nodes reached through
    Concat / MaxPool / nearest Resize (quantization commutes with them). ``None`` when some
    use is a float op or a graph output: then ``tensor`` must stay float.
    """
    if tensor in memo:
        return memo[tensor]
    memo[tensor] = None  # guards against cycles, which a valid graph has not
    direct, through = set(), set()
    if tensor in graph.outputs or not graph.consumers[tensor]:
        return None
    for c in graph.consumers[tensor]:
        if c.op_type == "QuantizeLinear" and c.input[0] == tensor and graph.qparams(c) is not None:
            direct.add(graph.qparams(c))
        elif c.op_type in _TRANSPARENT and _passes_through(graph, c, tensor):
            sub = _requests(graph, c.output[0], memo)
            if sub is None:
                return None
            through |= sub[0] | sub[1]
        else:
            return None
    memo[tensor] = (direct, through)
    return memo[tensor]


def _choose_qparams(requests, exact_only: bool):
    """The quantization to put on a tensor with these ``requests``, or ``None``.

    One request: exact. Several (YOLOv7's ELAN blocks feed a Conv directly and a Concat
    whose Conv has its own scale): the direct Conv's scale (its consumer stays exact, the
    Concat re-quantizes, one extra rounding); among several direct ones the largest, which
    clips nothing any of them keeps. ``exact_only`` refuses the several-request case.
    """
    if requests is None:
        return None
    direct, through = requests
    every = direct | through
    if len(every) == 1:
        return next(iter(every))
    if exact_only or not every:
        return None
    return max(direct or every, key=lambda qp: qp[0])


def _passes_through(graph: _Graph, node, tensor: str) -> bool:
    if node.op_type == "Concat":
        return True
    if node.input[0] != tensor:  # Resize's scales/sizes, MaxPool has one input
        return False
    if node.op_type == "Resize":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode == b"nearest"
    return len(node.output) == 1  # MaxPool without the Indices output


def _qdq_pair(graph: _Graph, tensor: str, qp, tag: str):
    """Q -> DQ nodes for ``tensor`` with ``qp``; returns (nodes, dequantized tensor name)."""
    from onnx import helper

    scale = graph.add_init(f"{tag}_scale", np.array(qp[0], np.float32))
    zp = graph.add_init(f"{tag}_zp", np.array(qp[1], np.dtype(qp[2])))
    q = helper.make_node("QuantizeLinear", [tensor, scale, zp], [f"{tag}_q"], name=f"{tag}_Q")
    dq = helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zp], [f"{tag}_dq"], name=f"{tag}_DQ")
    return [q, dq], f"{tag}_dq"


def _quantized_conv(graph: _Graph, node) -> bool:
    # a Conv whose input and weight both come from DequantizeLinear (what QLinearConv needs)
    if node.op_type != "Conv":
        return False
    feeds = [graph.producer.get(i) for i in node.input[:2]]
    return all(f is not None and f.op_type == "DequantizeLinear" for f in feeds)


def _quantize_outputs(graph: _Graph, exact_only: bool, skip=frozenset()) -> int:
    """Step 4: Q/DQ after activations (exact) and after Convs (not exact); returns Convs done.

    ``skip``: names of Convs whose output is quantized already (the calibrated ones)."""
    memo, plan, after, done = {}, [], defaultdict(list), 0
    for conv in [n for n in graph.g.node if _quantized_conv(graph, n) and n.name not in skip]:
        users = graph.consumers[conv.output[0]]
        act = users[0] if len(users) == 1 and users[0].op_type in _ACTIVATIONS else None
        qp = _choose_qparams(_requests(graph, (act or conv).output[0], memo), exact_only)
        if qp is not None and qp[1:] == (128, "uint8"):
            plan.append((conv, act, qp))
    for conv, act, qp in plan:  # planned first: the edits below change who reads what
        y = conv.output[0]
        if act is not None:  # exact: every use of the activation quantizes at qp anyway
            nodes, dq = _qdq_pair(graph, act.output[0], qp, f"{act.name}_out")
            _rename_input(graph, act.output[0], dq, skip={nodes[0].name})
            after[act.name] += nodes
        if act is None or not exact_only:
            nodes, dq = _qdq_pair(graph, y, qp, f"{conv.name}_out")
            _rename_input(graph, y, dq, skip={nodes[0].name})
            after[conv.name] += nodes
            _quantize_bias(graph, conv)
            done += 1
    _rebuild(graph, after, set())
    return done


def _feeds_float_convs(graph: _Graph, conv) -> bool:
    """True when ``conv``'s output, directly or through one activation, is read only by Convs
    and Q nodes, at least one of them a Conv that is not quantized (a float head)."""
    users = graph.consumers[conv.output[0]]
    if len(users) == 1 and users[0].op_type in _ACTIVATIONS:
        tensor = users[0].output[0]
        users = graph.consumers[tensor]
    else:
        tensor = conv.output[0]
    if tensor in graph.outputs or not users:
        return False
    if any(u.op_type not in ("Conv", "QuantizeLinear") or u.input[0] != tensor for u in users):
        return False
    return any(u.op_type == "Conv" and not _quantized_conv(graph, u) for u in users)


def _targets(graph: _Graph) -> Dict[str, object]:
    return {n.output[0]: n for n in graph.g.node if _quantized_conv(graph, n) and _feeds_float_convs(graph, n)}


def calibration_targets(model) -> List[str]:
    """Outputs of quantized Convs that feed float Convs: what ``output_amax`` can quantize.

    A quantized Conv (Q/DQ on its input and weight) only becomes an integer kernel in ORT
    with a quantized output; these have no scale to reuse, so they need calibrating.
    """
    return list(_targets(_Graph(model)))


def calibrate_outputs(model, tensors: Sequence[str], batches: Iterable, method: str = "entropy",
                      threads: Optional[int] = None) -> Dict[str, float]:
    """``{tensor: amax}`` of ``tensors`` of the ONNX ``model`` run by ORT on ``batches``.

    ``batches``: float32 arrays (or tensors) the model's single input takes. ``method``:
    ``"max"``, or a histogram method of lesson 4 (``"entropy"``, TensorRT's and the
    default; ``"mse"``, ``"percentile"`` at 99.99). The graph is run as exported, so the
    statistics are those of the fake-quantized model these outputs belong to.
    """
    import onnx
    import onnxruntime as ort
    import torch

    from qcourse.calib import METHODS, HistogramCalibrator, MaxCalibrator

    if method not in ("max",) + tuple(METHODS):
        raise ValueError(f"calibration method must be one of {('max',) + tuple(METHODS)}, got {method!r}")
    tensors = list(tensors)
    if not tensors:
        return {}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {n for node in probe.graph.node for n in node.output}
    missing = [t for t in tensors if t not in known]
    if missing:
        raise EngineError(f"the ONNX model has no tensor {missing[0]!r} to calibrate; use calibration_targets(model)")
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    from qcourse.engines.ort import session_options

    sess = ort.InferenceSession(probe.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    cals = {t: MaxCalibrator() if method == "max" else HistogramCalibrator() for t in tensors}
    seen = 0
    for x in batches:
        for t, y in zip(tensors, sess.run(tensors, {name: as_batch(x)})):
            cals[t].collect(torch.from_numpy(y))
        seen += 1
    if not seen:
        raise EngineError("no calibration batches: pass at least one batch of images to calibrate the outputs of "
                          f"{len(tensors)} Convs (or none, and they stay float)")
    amax = {}
    for t, cal in cals.items():
        a = cal.compute_amax() if method == "max" else cal.compute_amax(
            method, **({"percentile": 99.99} if method == "percentile" else {}))
        a = float(a.reshape(()))
        if not np.isfinite(a) or a <= 0:
            raise EngineError(f"calibrating {t!r} gave amax {a}: its values were all zero on the calibration "
                              "images; calibrate on real images")
        amax[t] = a
    return amax


def _quantize_calibrated(graph: _Graph, output_amax: Dict[str, float]) -> set:
    """Q/DQ (uint8, zero point 128, scale amax / 127) on each calibrated Conv output. Not exact.

    The symmetric range of every other activation here; the Conv's bias becomes int32 as
    in step 4. The activation after the Conv and the float Convs it feeds are untouched.
    Returns the names of the Convs done.
    """
    for y, amax in output_amax.items():
        if not isinstance(amax, (int, float, np.floating, np.integer)) or not np.isfinite(amax) or amax <= 0:
            raise ValueError(f"output_amax[{y!r}] must be a finite number > 0, got {amax!r}")
    targets = _targets(graph)
    wrong = sorted(set(output_amax) - set(targets))
    if wrong:
        raise EngineError(f"output_amax names {wrong[0]!r}, which is not the output of a quantized Conv feeding "
                          "float Convs; calibrate the tensors calibration_targets(model) lists")
    after, done = {}, set()
    for y, amax in output_amax.items():
        conv = targets[y]
        nodes, dq = _qdq_pair(graph, y, (float(amax) / 127.0, 128, "uint8"), f"{conv.name}_calibrated")
        _rename_input(graph, y, dq, skip={nodes[0].name})
        after[conv.name] = nodes
        _quantize_bias(graph, conv)
        done.add(conv.name)
    _rebuild(graph, after, set())
    return done


def _quantize_bias(graph: _Graph, conv) -> None:
    """Float bias -> DQ(int32 codes at scale s_x * s_w per channel), as QLinearConv needs."""
    from onnx import helper

    if len(conv.input) < 3 or graph.array(conv.input[2]) is None:
        return
    dq_x, dq_w = (graph.producer[i] for i in conv.input[:2])
    s_x = graph.array(dq_x.input[1]).astype(np.float32).reshape(())
    s_w = graph.array(dq_w.input[1]).astype(np.float32).reshape(-1)
    bias = graph.array(conv.input[2]).astype(np.float32)
    scale = (s_x * s_w * np.ones_like(bias)).astype(np.float32)
    codes = np.clip(np.rint(bias / scale), -2**31, 2**31 - 1).astype(np.int32)
    tag = f"{conv.name}_bias"
    graph.add_init(f"{tag}_int32", codes)
    graph.add_init(f"{tag}_scale", scale)
    graph.add_init(f"{tag}_zp", np.zeros_like(codes))
    dq = helper.make_node("DequantizeLinear", [f"{tag}_int32", f"{tag}_scale", f"{tag}_zp"],
                          [f"{tag}_dq"], name=f"{tag}_DQ", axis=0)
    graph.g.node.insert(0, dq)
    conv.input[2] = f"{tag}_dq"


def _grid_of(graph: _Graph, node):
    """The ``(scale, zp, dtype)`` every data input of ``node`` is dequantized with, else None."""
    inputs = node.input if node.op_type == "Concat" else node.input[:1]
    found = set()
    for i in inputs:
        p = graph.producer.get(i)
        found.add(graph.qparams(p) if p is not None and p.op_type == "DequantizeLinear" else None)
    return found.pop() if len(found) == 1 else None


def _requantize_transparent(graph: _Graph) -> None:
    """Q/DQ after a Concat / MaxPool / nearest Resize whose inputs all sit on one grid. Exact.

    Their output is on that grid already, so the Q changes nothing; it lets ORT run the op
    on uint8 codes (an integer MaxPool, QLinearConcat) instead of dequantizing around it.
    Runs until nothing changes, so chains (MaxPool -> Concat) are covered in one call.
    """
    while True:
        after = {}
        for n in graph.g.node:
            if n.op_type not in _TRANSPARENT or not _passes_through(graph, n, n.input[0]):
                continue
            qp, users = _grid_of(graph, n), graph.consumers[n.output[0]]
            if qp is None or n.output[0] in graph.outputs:
                continue
            if all(u.op_type == "QuantizeLinear" and graph.qparams(u) == qp for u in users):
                continue
            nodes, dq = _qdq_pair(graph, n.output[0], qp, f"{n.name}_out")
            _rename_input(graph, n.output[0], dq)
            after[n.name] = nodes
        if not after:
            return
        _rebuild(graph, after, set())


def _merge_quantizers(graph: _Graph) -> None:
    """Q nodes that read one tensor with the same scale and zero point become one. Exact.

    YOLOv7's lesson-5 rules tie the input scales of the Convs reading one tensor (after a
    MaxPool, a Concat), so the export has a Q per Conv computing the same codes. ORT turns
    ``DQ -> MaxPool -> Q`` into an integer MaxPool and ``DQ... -> Concat -> Q`` into
    QLinearConcat only when a single Q reads the result.
    """
    drop = set()
    for tensor, users in list(graph.consumers.items()):
        first = {}
        for q in users:
            if q.op_type != "QuantizeLinear" or q.input[0] != tensor or q.output[0] in graph.outputs:
                continue
            qp = graph.qparams(q)
            if qp is None:
                continue
            if qp in first:
                _rename_input(graph, q.output[0], first[qp].output[0])
                drop.add(q.name)
            else:
                first[qp] = q
    _rebuild(graph, {}, drop)


def _split_concats(graph: _Graph) -> None:
    """A Concat of dequantized inputs read by several Q nodes becomes one Concat per Q. Exact.

    YOLOv7 feeds one Concat to two Convs with their own input scales; ORT's QLinearConcat
    needs ``DQ... -> Concat -> Q`` with a single Q, so each Q gets its own copy.
    """
    from onnx import helper

    after = {}
    for n in graph.g.node:
        users = graph.consumers[n.output[0]]
        if (n.op_type != "Concat" or len(users) < 2 or n.output[0] in graph.outputs
                or any(u.op_type != "QuantizeLinear" for u in users)
                or any(getattr(graph.producer.get(i), "op_type", None) != "DequantizeLinear" for i in n.input)):
            continue
        after[n.name] = []
        for k, u in enumerate(users[1:], 1):
            copy = helper.make_node("Concat", list(n.input), [f"{n.output[0]}_copy{k}"], name=f"{n.name}_copy{k}")
            copy.attribute.extend(n.attribute)
            u.input[0] = copy.output[0]
            after[n.name].append(copy)
    _rebuild(graph, after, set())


def _output_quantized(graph: _Graph, conv) -> bool:
    users = graph.consumers[conv.output[0]]
    return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)


def _float_weights(graph: _Graph) -> None:
    """Step 9: a Conv that stays float gets its weight as a float constant, ``DQ(codes)``. Exact.

    ORT keeps ``DequantizeLinear`` nodes unfolded (for its own Q/DQ fusions), so a float
    Conv reading ``DQ(W codes)`` sees a weight computed at run time: it cannot pre-pack it
    and falls back to a slow im2col path (on the default at batch 8 the three Convs before
    the float head took 40 % of the INT8 model's time). The constant holds the values the
    DQ would compute, ``(codes - zero point) * scale`` in float32, so outputs are unchanged.
    """
    for conv in graph.g.node:
        dq = graph.producer.get(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or _output_quantized(graph, conv):
            continue
        codes, scale = graph.array(dq.input[0]), graph.array(dq.input[1])
        zp = graph.array(dq.input[2]) if len(dq.input) > 2 else np.zeros_like(scale, dtype=np.int8)
        if codes is None or scale is None or zp is None:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        if scale.size > 1:
            shape[axis] = -1
        w = ((codes.astype(np.int32) - zp.astype(np.int32).reshape(shape)).astype(np.float32)
             * scale.astype(np.float32).reshape(shape))
        conv.input[1] = graph.add_init(f"{conv.name}_weight_float", w.astype(np.float32))
    graph.refresh()


def _drop_requantize(graph: _Graph) -> None:
    """``DQ(s, z) -> Q(s, z)`` is the identity on the codes: wire the Q's users to the DQ's input. Exact."""
    drop = set()
    for q in graph.g.node:
        dq = graph.producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        pq, pdq = graph.qparams(q), graph.qparams(dq)
        if pq is not None and pq == pdq and q.output[0] not in graph.outputs:
            _rename_input(graph, q.output[0], dq.input[0])
            drop.add(q.name)
    _rebuild(graph, {}, drop)


def _prune(graph: _Graph) -> None:
    """Remove nodes whose outputs nobody reads (the Qs that step 5 bypassed, their constants)."""
    while True:
        dead = {n.name for n in graph.g.node
                if not any(graph.consumers[o] or o in graph.outputs for o in n.output)}
        if not dead:
            break
        _rebuild(graph, {}, dead)
    used = {i for n in graph.g.node for i in n.input}
    keep = [i for i in graph.g.initializer if i.name in used]
    del graph.g.initializer[:]
    graph.g.initializer.extend(keep)
    graph.refresh()


def cpu_has_vnni() -> bool:
    """True where the CPU has AVX-VNNI / AVX512-VNNI (ORT's uint8 x int8 kernels then add in 32 bits)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:  # not Linux: assume the worst, the exact kernels are chosen
        return False
    return bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & set(flags))


def to_ort_int8(model, exact_only: bool = False, weight_dtype: str = "auto",
                output_amax: Optional[Dict[str, float]] = None):
    """A copy of the Q/DQ ``onnx.ModelProto`` that ONNX Runtime runs with QLinearConv (see module doc).

    ``weight_dtype="uint8"`` stores the int8 weight codes shifted to uint8/zero point 128
    (the same values), so ORT uses its uint8 x uint8 kernels, which never saturate;
    ``"int8"`` keeps int8 weights: ORT's faster uint8 x int8 kernels, which on CPUs
    without VNNI add product pairs in 16 bits and can saturate (see ``_weights_to_uint8``);
    ``"auto"`` (default) picks ``"int8"`` where this CPU has VNNI, else ``"uint8"``.

    ``output_amax``: ``{conv output: amax}`` from :func:`calibrate_outputs` for the Convs
    :func:`calibration_targets` lists; those become integer kernels too (one more rounding).

    Returns ``(model, info)`` where ``info`` counts what was rewritten: ``convs`` (Convs
    with a quantized output, i.e. integer kernels, the calibrated ones included),
    ``float_convs`` (the rest), ``calibrated_convs``, and says the ``weight_dtype`` used.
    """
    import onnx

    if weight_dtype not in ("auto", "uint8", "int8"):
        raise ValueError(f"weight_dtype must be 'auto', 'uint8' or 'int8', got {weight_dtype!r}")
    if weight_dtype == "auto":
        weight_dtype = "int8" if cpu_has_vnni() else "uint8"
    if output_amax and exact_only:
        raise ValueError("output_amax adds a rounding to each calibrated Conv output; exact_only=True cannot take it")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = _Graph(model)
    if not any(n.op_type == "QuantizeLinear" for n in graph.g.node):
        raise EngineError("the ONNX model has no QuantizeLinear nodes, so there is nothing to build an INT8 "
                         "engine from; calibrate the model and export it with Q/DQ first "
                         "(qcourse.workflow.quantized_copy + qcourse.export.export_onnx)")
    _name_nodes(graph)
    _drop_float_casts(graph)
    _fold_weights(graph, weight_dtype)
    _to_uint8(graph)
    calibrated = _quantize_calibrated(graph, dict(output_amax or {}))
    done = _quantize_outputs(graph, exact_only, skip=calibrated) + len(calibrated)
    _requantize_transparent(graph)
    _drop_requantize(graph)
    _merge_quantizers(graph)
    _split_concats(graph)
    _float_weights(graph)
    _prune(graph)
    convs = sum(n.op_type == "Conv" for n in graph.g.node)
    onnx.checker.check_model(model)
    return model, {"convs": done, "float_convs": convs - done, "calibrated_convs": len(calibrated),
                   "weight_dtype": weight_dtype}


def strip_qdq(model):
    """A copy of ``model`` with every ``Q -> DQ`` pair removed: the float model it was exported from. Exact."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = _Graph(model)
    _name_nodes(graph)
    for dq in list(graph.g.node):
        q = graph.producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and dq.output[0] not in graph.outputs:
            _rename_input(graph, dq.output[0], q.input[0])
    graph.refresh()
    _prune(graph)
    onnx.checker.check_model(model)
    return model


def qdq_summary(model) -> Dict[str, int]:
    """Counts of the ops that matter for speed in a graph ORT has optimized (or not)."""
    counts: Dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        counts[n.op_type] += 1
    return dict(counts)
