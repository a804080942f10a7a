"""Lesson 5 — post-training quantization, model-agnostic parts, with TensorRT's Q/DQ placement rules.

PTQ is: insert quantizers (:func:`qcourse.quant_modules.replace_modules`), run N calibration
batches (:func:`calibrate`), turn the statistics into ``amax`` with one method
(:func:`qcourse.workflow.compute_amax`), evaluate, export (:func:`qcourse.export.export_onnx`).
This module adds what a deployer needs on top:

* :func:`apply_placement_rules` — NVIDIA's yolov7_qat ``rules.py``, found from the model's own
  graph. TensorRT fuses a Concat with quantized neighbours into INT8 only when every tensor
  around it carries one scale, otherwise it inserts INT8<->FP16 reformat layers that can make the
  INT8 engine slower than FP16. So:

  - **Concat**: the input quantizers of every conv reading the Concat's output, and of every
    conv reading one of the tensors the Concat reads, become the input quantizer of the first
    conv reading its output (the *major*);
  - **MaxPool**: when the first reader of its output is a quantized conv (the major), every other
    quantized conv reading the MaxPool's input is tied to it (max-pooling commutes with
    quantization, so TensorRT moves the Q across the pool and wants one scale on both sides).

  *Tied* means the very same :class:`~qcourse.nn.TensorQuantizer` object, so calibration,
  ``state_dict`` and export all see one amax.
* :func:`check_qdq_placement` — reads an exported ONNX file and lists the Concats and MaxPools
  whose neighbouring QuantizeLinear nodes disagree on the scale.
* :func:`compare_graphs` — node counts by type, Q/DQ pairs and distinct scales of ONNX files.

The graph comes from one traced forward pass (:func:`trace_graph`): a
``torch.overrides.TorchFunctionMode`` records every ``torch.cat`` and ``max_pool2d`` call with
the tensors it read and wrote, and forward pre-hooks record which quantized module read which
tensor. Nothing here knows YOLOv7: any model :func:`~qcourse.quant_modules.replace_modules`
quantizes works, fused or not (lesson 5 applies it to YOLOv7 in :mod:`qcourse.yolo.ptq`).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qcourse import calib, workflow
from qcourse.export import list_qdq_nodes, load_onnx
from qcourse.nn import TensorQuantizer

__all__ = [
    "METHODS", "TracedGraph", "trace_graph", "find_placement_groups", "apply_placement_rules",
    "shared_input_quantizers", "check_qdq_placement", "calibrate", "load_amax", "compare_graphs",
]

#: the calibration methods lesson 5 compares (``max`` plus the three histogram methods)
METHODS = ("max",) + tuple(calib.METHODS)

_CAT = {torch.cat, torch.concat, torch.concatenate}


# ----------------------------------------------------------------------------- tracing
@dataclass
class TracedGraph:
    """What one forward pass did; tensors are numbered in the order they were first seen.

    ``ops``: ``(step, kind, [input tensor ids], output tensor id)`` for each Concat and MaxPool;
    ``readers``: tensor id -> ``[(step, module name)]`` for the quantized modules (enabled input
    quantizer) that read it. ``step`` counts events, so ops and reads compare in time.
    """

    ops: List[tuple] = field(default_factory=list)
    readers: Dict[int, List[tuple]] = field(default_factory=dict)

    def reader_names(self, tensor: int) -> List[str]:
        return [name for _, name in self.readers.get(tensor, [])]


class _Recorder(TorchFunctionMode):
    """Records torch.cat / max_pool2d calls and quantized reads; keeps every tensor it saw alive,
    so that Python never reuses an id during the pass."""

    def __init__(self, graph: TracedGraph):
        super().__init__()
        self.graph, self.ids, self.alive, self.step = graph, {}, [], 0

    def tid(self, t) -> int:
        self.alive.append(t)
        return self.ids.setdefault(id(t), len(self.ids))

    def read(self, name: str, t) -> None:
        self.step += 1
        self.graph.readers.setdefault(self.tid(t), []).append((self.step, name))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in _CAT:
            tensors = args[0] if args else kwargs.get("tensors", ())
            self._record("Concat", list(tensors), out)
        elif "max_pool" in name and "backward" not in name:
            x = args[0] if args else kwargs.get("input")
            self._record("MaxPool", [x], out[0] if isinstance(out, tuple) else out)
        return out

    def _record(self, kind, inputs, out):
        self.step += 1
        self.graph.ops.append((self.step, kind, [self.tid(t) for t in inputs], self.tid(out)))


def _input_quantized(module: nn.Module) -> bool:
    q = getattr(module, "_input_quantizer", None)
    return isinstance(q, TensorQuantizer) and q.is_enabled


def _example_for(model: nn.Module) -> torch.Tensor:
    """A small input for models that start with a 2-d convolution (64 px: a multiple of 32)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("cannot guess an input for this model (it has no Conv2d); pass "
                         "example=torch.zeros(...) with the model's input shape")
    p = next(model.parameters())
    return torch.zeros(1, first.in_channels, 64, 64, device=p.device, dtype=p.dtype)


def trace_graph(model: nn.Module, example: Optional[torch.Tensor] = None) -> TracedGraph:
    """Run ``model`` once on ``example`` (default: zeros, 64x64) and record its Concat/MaxPool graph.

    Quantizers are switched off during the pass (and restored), so no calibrator collects
    anything and a quantized module hands its own input, the very tensor object, to its op.
    """
    example = _example_for(model) if example is None else example
    graph = TracedGraph()
    rec = _Recorder(graph)
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: rec.read(name, inp[0]))
             for name, m in model.named_modules() if _input_quantized(m)]
    was_training = model.training
    try:
        model.eval()
        with workflow.disable_quantization(model), torch.no_grad(), rec:
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return graph


# ----------------------------------------------------------------------------- the rules
def _pairs(graph: TracedGraph) -> List[tuple]:
    """(major, tied) module-name pairs, as NVIDIA's rules.py derives them from the ONNX graph."""
    pairs = []
    for step, kind, inputs, out in graph.ops:
        out_readers = graph.reader_names(out)
        if kind == "Concat":
            if not out_readers:
                continue  # nothing quantized reads the Concat: no Q to move across it
            major = out_readers[0]
            pairs += [(major, r) for r in out_readers[1:]]
            pairs += [(major, r) for t in inputs for r in graph.reader_names(t)]
        elif kind == "MaxPool":
            major = _first_consumer(graph, out)
            if major is not None:
                pairs += [(major, r) for r in graph.reader_names(inputs[0])]
    return [(a, b) for a, b in pairs if a != b]


def _first_consumer(graph: TracedGraph, tensor: int) -> Optional[str]:
    """The quantized module that consumes ``tensor`` first, or None when an op (a Concat, as in
    the SPP pools) reads it before any quantized module: NVIDIA requires the first node
    reading a pool's output to be a QuantizeLinear."""
    reads = graph.readers.get(tensor, [])
    if not reads:
        return None
    first_op = min((s for s, _, ins, _ in graph.ops if tensor in ins), default=None)
    step, name = reads[0]
    return name if first_op is None or step < first_op else None


def find_placement_groups(model: nn.Module, example: Optional[torch.Tensor] = None) -> Dict[str, List[str]]:
    """``{major module name: [module names whose input quantizer must be the major's]}``.

    The pairs of NVIDIA's rules merged into groups (union-find), so a module tied through two
    Concats ends up with the same quantizer whatever order the rules are applied in; each
    group's major is the first major the graph names. ``{}`` when no Concat or MaxPool has
    quantized neighbours.
    """
    pairs = _pairs(trace_graph(model, example))
    parent: Dict[str, str] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rank = {}  # the group keeps the major seen first
    for major, tied in pairs:
        for name in (major, tied):
            rank.setdefault(name, len(rank))
        a, b = root(major), root(tied)
        if a != b:
            keep, drop = (a, b) if rank[a] < rank[b] else (b, a)
            parent[drop] = keep
    groups: Dict[str, List[str]] = {}
    for name in sorted(rank, key=rank.get):
        r = root(name)
        if name != r:
            groups.setdefault(r, []).append(name)
    return {k: sorted(v, key=_natural) for k, v in groups.items()}


def _natural(name: str):
    """Sort key: model.6 before model.11 (numbers compare as numbers)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def apply_placement_rules(model: nn.Module, example: Optional[torch.Tensor] = None) -> Dict[str, List[str]]:
    """Tie input quantizers as TensorRT's placement rules need; returns the groups tied.

    Apply it before calibrating: the shared quantizer's calibrator then sees the inputs of
    every member (with max calibration its amax is the largest of theirs). Idempotent.
    """
    groups = find_placement_groups(model, example)
    for major, tied in groups.items():
        q = model.get_submodule(major)._input_quantizer
        for name in tied:
            setattr(model.get_submodule(name), "_input_quantizer", q)
    return groups


def shared_input_quantizers(model: nn.Module) -> List[List[str]]:
    """Groups of module names whose ``_input_quantizer`` is one object (ties), in model order."""
    by_id: Dict[int, List[str]] = {}
    for name, m in model.named_modules():
        q = getattr(m, "_input_quantizer", None)
        if isinstance(q, TensorQuantizer):
            by_id.setdefault(id(q), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


# ----------------------------------------------------------------------------- the checker
def _scale_key(scale) -> tuple:
    return tuple(np.asarray(scale, dtype=np.float32).ravel().tolist())


def _aliases(model) -> Dict[str, str]:
    """Tensor -> the tensor it copies, through Identity and float-to-float Cast nodes.

    The TorchScript exporter records ``x.float()`` on a float tensor as a Cast and then routes
    later readers of ``x`` through it: they read the same values under another name.
    :func:`~qcourse.export.export_onnx` removes such Casts; graphs exported before still hold them.
    """
    alias: Dict[str, str] = {}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Identity" or (node.op_type == "Cast" and to == 1):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    return alias


def check_qdq_placement(onnx_path: Union[str, os.PathLike]) -> List[str]:
    """Problems TensorRT would meet fusing this Q/DQ graph: one line per Concat or MaxPool.

    * a Concat whose quantized neighbours (QuantizeLinear nodes reading its output or one of
      its inputs) carry more than one scale: TensorRT cannot run it in INT8 without reformats;
    * a MaxPool whose first consumer is a QuantizeLinear with another scale than a
      QuantizeLinear reading the pool's input.

    An empty list means the placement is as TensorRT wants it.
    """
    model = load_onnx(onnx_path)
    q_scales = {row["name"]: _scale_key(row["scale"]) for row in list_qdq_nodes(model)}
    alias = _aliases(model)
    root = lambda t: alias.get(t, t)  # noqa: E731
    consumers: Dict[str, List] = collections.defaultdict(list)   # tensor -> nodes reading it, in order
    for node in model.graph.node:
        if node.output and node.output[0] not in alias:
            for t in node.input:
                consumers[root(t)].append(node)

    def q_readers(tensor):
        return [n for n in consumers.get(root(tensor), []) if n.op_type == "QuantizeLinear"]

    problems = []
    for node in model.graph.node:
        if node.op_type == "Concat":
            around = q_readers(node.output[0]) + [q for t in node.input for q in q_readers(t)]
            scales = {q_scales[q.name] for q in around}
            if len(scales) > 1:
                problems.append(f"Concat {node.name}: {len(around)} quantized neighbours carry "
                                f"{len(scales)} different scales")
        elif node.op_type == "MaxPool":
            first = consumers.get(root(node.output[0]), [None])[0]
            if first is None or first.op_type != "QuantizeLinear":
                continue
            other = {q_scales[q.name] for q in q_readers(node.input[0])} - {q_scales[first.name]}
            if other:
                problems.append(f"MaxPool {node.name}: output Q scale {q_scales[first.name][0]:.6g} "
                                f"differs from {len(other)} input Q scale(s)")
    return problems


# ----------------------------------------------------------------------------- calibration
def calibrate(model: nn.Module, loader: Iterable, num_batches: int, *, device=None,
              batch_fn=workflow.default_batch_input, progress: bool = True) -> int:
    """Collect statistics from exactly ``num_batches`` batches of ``loader`` (a tqdm bar on a TTY).

    Raises ``ValueError`` when the loader has fewer batches: a calibration on less data than
    asked for would be reported under the wrong number. Compute amax afterwards with
    :func:`load_amax`, once per method, from the same statistics.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a whole number >= 1, got {num_batches!r}")
    try:
        available = len(loader)
    except TypeError:
        available = None
    if available is not None and available < num_batches:
        raise ValueError(f"the calibration loader has {available} batches, fewer than the {num_batches} "
                         f"asked for; ask for at most {available} or use a smaller batch size")
    seen = workflow.collect_stats(model, loader, num_batches, device=device, batch_fn=batch_fn,
                                  progress=progress)
    if seen != num_batches:
        raise ValueError(f"the calibration loader yielded {seen} batches, fewer than the "
                         f"{num_batches} asked for; ask for at most {seen}")
    return seen


def load_amax(model: nn.Module, method: str, **kwargs) -> Dict[str, torch.Tensor]:
    """Load every quantizer's amax with ``method`` (one of :data:`METHODS`) from its statistics.

    ``"max"`` on a histogram calibrator takes the histogram's top edge, i.e. the largest |x|
    seen (up to one bin width above it); weights with max calibrators always take their max.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return workflow.compute_amax(model, method=method, **kwargs)


# ----------------------------------------------------------------------------- graphs
def compare_graphs(paths: Dict[str, Union[str, os.PathLike]]) -> Dict[str, dict]:
    """``{label: {"nodes": {op type: count}, "qdq_pairs": n, "distinct_scales": n, ...}}``.

    ``qdq_pairs`` counts QuantizeLinear nodes (each is followed by its DequantizeLinear);
    ``activation_scales`` counts distinct per-tensor scales (one per activation quantizer once
    ties are applied), ``weight_quantizers`` the per-channel ones.
    """
    out = {}
    for label, path in paths.items():
        model = load_onnx(path)
        nodes = collections.Counter(n.op_type for n in model.graph.node)
        rows = list_qdq_nodes(model)
        per_tensor = [r for r in rows if r["scale"] is not None and np.ndim(r["scale"]) == 0]
        out[label] = {
            "nodes": dict(sorted(nodes.items())),
            "total_nodes": int(sum(nodes.values())),
            "qdq_pairs": min(nodes.get("QuantizeLinear", 0), nodes.get("DequantizeLinear", 0)),
            "activation_scales": len({_scale_key(r["scale"]) for r in per_tensor}),
            "activation_q_nodes": len(per_tensor),
            "weight_quantizers": len(rows) - len(per_tensor),
            "size_bytes": os.path.getsize(path),
        }
    return out
