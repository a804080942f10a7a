"""Lesson 6 — per-layer sensitivity analysis: which layers lose accuracy in INT8, and which to leave in float.

The recipe of the course (NVIDIA's yolov7_qat does the same): for each quantized layer, switch
off that layer's quantizers only, evaluate, switch them back on; rank the layers by how much
accuracy came back; re-quantize with the top-k layers left in float. On real COCO one scan is
~100 full evaluations, hours of work, so :func:`sensitivity_analysis` writes its JSON file
after every layer (atomically) and a rerun resumes where the last one stopped.

* A *layer* is a group of quantizers named by ``layer_of(slot name)``; the default,
  :func:`default_layer_of`, cuts the name after the first numbered block:
  ``model.37.conv._input_quantizer`` belongs to ``model.37``, as the course's tables read.
* **Ties.** :func:`qcourse.ptq.apply_placement_rules` makes several convs share one input
  quantizer (one object). Switching that object off would also put the *other* layers' inputs
  in float and measure two layers at once. :func:`layers_in_float` instead gives the layer in
  float a disabled stand-in for the shared quantizer while it runs: the other layers keep the
  shared quantizer, with its switches and amax, and the tie is restored on exit. That is what
  leaving the layer out through the ignore list means for the engine: its conv runs in float,
  its neighbours stay INT8.
* :func:`proxy_sqnr` is the label-free first look: one float pass with forward hooks that re-run
  each block with only its own quantizers on; the SQNR (dB) of its output says how much noise
  INT8 adds there. :func:`rank_correlation` says how well it predicts the mAP ranking.
* :func:`top_k_table` tabulates accuracy and INT8 layer count with the top-k layers in float.

Nothing here knows YOLOv7: ``evaluate(model) -> float`` and a ``requantize(layers)`` callable
come from the caller (lesson 6 uses :mod:`qcourse.yolo.sensitivity`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from qcourse import workflow
from qcourse.nn import TensorQuantizer
from qcourse.utils import InputFileError, atomic_write, check_writable, load_json

__all__ = [
    "FORMAT", "KS", "Slot", "default_layer_of", "quantizer_slots", "layer_groups", "quantized_layers",
    "layers_in_float", "int8_layer_count", "state_fingerprint", "SensitivityFileError", "write_json_atomic",
    "load_results", "sensitivity_analysis", "ranking", "proxy_sqnr", "rank_correlation", "top_k_table",
]

#: written into every file's config: a file of another format is refused, not misread
FORMAT = "qcourse.sensitivity/1"
#: the k of the top-k table: how many of the most sensitive layers stay in float
KS = (0, 1, 3, 5, 10)

_NUMBERED = re.compile(r"^\d+$")


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class Slot:
    """One place a quantizer sits: ``getattr(model.get_submodule(owner), attr)``.

    A tied quantizer has one slot per module that holds it; ``name`` reads like a
    ``state_dict`` key prefix, e.g. ``model.37.conv._input_quantizer``.
    """

    owner: str
    attr: str
    quantizer: TensorQuantizer

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.attr}" if self.owner else self.attr


def default_layer_of(name: str) -> str:
    """The layer a quantizer slot belongs to: its name up to the first numbered part.

    ``model.37.conv._input_quantizer`` -> ``model.37``; ``3._weight_quantizer`` -> ``3``
    (an ``nn.Sequential``); a name with no number -> its owning module (``conv1``).
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMBERED.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def quantizer_slots(model: nn.Module) -> List[Slot]:
    """Every (module, attribute) holding a :class:`TensorQuantizer`, in model order, ties included.

    :func:`qcourse.workflow.quantizers` lists each quantizer object once (under its first
    name); sensitivity needs every holder, because a tie is one object in several layers.
    """
    slots = []
    for owner, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            continue
        for attr, child in module.named_children():
            if isinstance(child, TensorQuantizer):
                slots.append(Slot(owner, attr, child))
    return slots


def layer_groups(model: nn.Module, layer_of: Callable[[str], str] = default_layer_of) -> Dict[str, List[Slot]]:
    """``{layer: [its slots]}`` in model order (the order a layer's first slot appears in)."""
    groups: Dict[str, List[Slot]] = {}
    for slot in quantizer_slots(model):
        groups.setdefault(layer_of(slot.name), []).append(slot)
    return groups


def quantized_layers(model: nn.Module, layer_of: Callable[[str], str] = default_layer_of) -> List[str]:
    """The layers with at least one enabled quantizer, in model order (the units of the scan)."""
    return [layer for layer, slots in layer_groups(model, layer_of).items()
            if any(s.quantizer.is_enabled for s in slots)]


def int8_layer_count(model: nn.Module, layer_of: Callable[[str], str] = default_layer_of) -> int:
    """How many layers still run quantized (at least one enabled quantizer)."""
    return len(quantized_layers(model, layer_of))


@contextlib.contextmanager
def layers_in_float(model: nn.Module, layers: Iterable[str],
                    layer_of: Callable[[str], str] = default_layer_of) -> Iterator[nn.Module]:
    """Inside the block, the quantizers of ``layers`` are off and every other quantizer is untouched.

    A quantizer held only by these layers is switched off (its switches restored on exit). One
    also held by another layer (a tie) stays on for that layer: these layers' slots get a
    disabled stand-in instead, and the shared object goes back into the slot on exit. Raises
    ``ValueError`` for a name that is not a layer of the model.
    """
    layers = list(layers)
    groups = layer_groups(model, layer_of)
    unknown = [name for name in layers if name not in groups]
    if unknown:
        sample = ", ".join(list(groups)[:4])
        raise ValueError(f"{unknown[0]!r} is not a quantized layer of this model; layers are named like {sample}")
    inside = [s for name in layers for s in groups[name]]
    held_outside = {id(s.quantizer) for name, slots in groups.items() if name not in layers for s in slots}
    saved: Dict[int, tuple] = {}  # id -> (quantizer, switches): a quantizer tied inside the group once
    swapped: List[Slot] = []
    try:
        for s in inside:
            q = s.quantizer
            if id(q) in held_outside:
                setattr(model.get_submodule(s.owner), s.attr, TensorQuantizer(q.quant_desc, disabled=True))
                swapped.append(s)
            elif id(q) not in saved:
                saved[id(q)] = (q, q.switches)
                q.disable()
        yield model
    finally:
        for q, switches in saved.values():
            q.switches = switches
        for s in swapped:
            setattr(model.get_submodule(s.owner), s.attr, s.quantizer)


# ----------------------------------------------------------------------------- the file
class SensitivityFileError(ValueError):
    """The results file cannot be resumed: corrupted, or made by a different run."""


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of what the scan measures: weights (exact), amax (6 significant digits), switches, ties.

    amax is rounded so that a rerun with another thread count, which may sum a histogram in
    another order, still resumes; a different calibration changes amax far more than that.
    """
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        if key.endswith("_amax"):
            h.update(" ".join(f"{v:.6g}" for v in t.double().flatten().tolist()).encode())
        else:
            h.update(t.contiguous().numpy().tobytes())
    ids: Dict[int, int] = {}
    for s in quantizer_slots(model):  # which slots share an object, and which are on
        h.update(f"{s.name}:{ids.setdefault(id(s.quantizer), len(ids))}:{s.quantizer.switches}".encode())
    return h.hexdigest()


def write_json_atomic(path: Union[str, os.PathLike], obj) -> None:
    """Write ``obj`` as JSON so that ``path`` always holds either the old or the new file.

    A temporary file in the same folder is written and fsync'ed, then renamed over ``path``
    (``os.replace`` is atomic on one file system); the folder is fsync'ed so the rename itself
    survives a power cut. A SIGKILL at any point leaves a whole file.
    """
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _check_row(row) -> Optional[str]:
    if not isinstance(row, dict) or set(row) != {"layer", "map", "drop", "seconds"}:
        return "a layers entry is not {layer, map, drop, seconds}"
    if not isinstance(row["layer"], str) or not all(_is_number(row[k]) for k in ("map", "drop", "seconds")):
        return f"the layers entry {row.get('layer')!r} has a non-numeric value"
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(data) -> Optional[str]:
    """What makes ``data`` not a sensitivity file, or None."""
    if not isinstance(data, dict) or list(data) != ["config", "fp32", "int8", "layers", "complete"]:
        return "its top level is not {config, fp32, int8, layers, complete}"
    if not isinstance(data["config"], dict) or data["config"].get("format") != FORMAT:
        return f"its config does not say format {FORMAT!r}"
    for key in ("fp32", "int8"):
        if data[key] is not None and not (isinstance(data[key], dict) and _is_number(data[key].get("map"))):
            return f"{key} is neither null nor {{\"map\": number}}"
    if not isinstance(data["layers"], list) or not isinstance(data["complete"], bool):
        return "layers is not a list or complete is not true/false"
    for row in data["layers"]:
        problem = _check_row(row)
        if problem:
            return problem
    names = [row["layer"] for row in data["layers"]]
    expected = data["config"].get("layers", [])
    if names != expected[: len(names)]:
        return "its layers are not the first layers of its config, in order"
    return None


#: the largest sensitivity file read (one row per layer: ~20 KiB for YOLOv7's ~100 layers)
MAX_RESULTS_BYTES = 8 << 20


def load_results(path: Union[str, os.PathLike]) -> dict:
    """Read a sensitivity file; ``SensitivityFileError`` (the file left as it is) when it is not one."""
    path = Path(path)
    try:  # bounded: a huge or deeply nested file is reported like any damaged one
        data = load_json(path, MAX_RESULTS_BYTES, "a sensitivity results file (one row per layer: "
                         "about 20 KiB for YOLOv7)", "")  # the fix is said below
    except InputFileError as e:
        problem = f"it {e.problem}"
    else:
        problem = _problem(data)
    if problem:
        raise SensitivityFileError(
            f"{path} is not a sensitivity results file that can be resumed: {problem}. It was left as it "
            "is; move it away (or delete it) to start over, or write to another path (qcourse sensitivity --out DIR)")
    return data


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_difference(old: dict, new: dict) -> str:
    """'key: <in the file> in the file, <now> now' for each differing key (the first three)."""
    keys = [k for k in list(old) + [k for k in new if k not in old] if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:3]:
        if k == "state":
            parts.append("state: the model's weights, amax, switches or ties differ (another model or calibration)")
        else:
            parts.append(f"{k}: {_short(old.get(k))} in the file, {_short(new.get(k))} now")
    return "; ".join(parts) + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


def _start(path: Path, config: dict, fresh: bool) -> dict:
    """The results to continue: the file's (same config), or a new empty one."""
    if path.exists() and not fresh:
        data = load_results(path)
        if data["config"] != config:
            raise SensitivityFileError(
                f"{path} was made by a different run ({_config_difference(data['config'], config)}); it was "
                "left as it is: write to another path (qcourse sensitivity --out DIR) or start over with "
                "fresh=True (--fresh), which replaces it")
        return data
    return {"config": config, "fp32": None, "int8": None, "layers": [], "complete": False}


# ----------------------------------------------------------------------------- the scan
def _measure(evaluate: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    value = evaluate(model)
    if not _is_number(value):
        raise ValueError(f"evaluate() returned {value!r} for {what}; it must return a finite number (e.g. mAP)")
    return float(value)


def _bar(total: int, initial: int, progress: bool):
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (CI logs, notebooks run by nbval)
    return tqdm(total=total, initial=initial, desc="sensitivity", unit="layer", leave=False,
                disable=None if progress else True)


def sensitivity_analysis(model: nn.Module, evaluate: Callable[[nn.Module], float],
                         path: Union[str, os.PathLike], config: Optional[dict] = None, *,
                         layer_of: Callable[[str], str] = default_layer_of, fresh: bool = False,
                         progress: bool = False, layers: Optional[Sequence[str]] = None) -> dict:
    """Evaluate ``model`` with each quantized layer in float in turn; returns the results (the file's content).

    ``model`` is calibrated and quantized; ``evaluate(model)`` returns its accuracy (mAP).
    ``config`` (JSON-able) is everything outside the model that defines the run — data,
    calibration method, evaluation subset; the module adds the format, the layer list and
    :func:`state_fingerprint`. FP32 is ``model`` with every quantizer off.

    ``path`` is rewritten atomically after FP32, INT8 and every layer. When it already exists
    the run resumes: finished layers are skipped; a file of another config raises
    :class:`SensitivityFileError` naming the difference, so does a corrupted one, and the file
    is kept. ``fresh=True`` starts over. A ``path`` qcourse did not write (or that was edited since) is
    never replaced: it is refused before the first evaluation. Ctrl-C stops after the layers saved so far.
    ``layers`` scans only those quantized layers (kept in model order; a quick look on a big
    model); the default is all of them.
    """
    path = Path(path)
    every = quantized_layers(model, layer_of)
    if not every:
        raise ValueError("the model has no enabled quantizer: insert and calibrate quantizers first "
                         "(qcourse.workflow.quantized_copy)")
    if layers is None:
        layers = every
    else:
        unknown = [name for name in layers if name not in every]
        if unknown or not layers:
            raise ValueError(f"layers {unknown or list(layers)} are not quantized layers of the model; pass some "
                             f"of {', '.join(every[:3])}, ... ({len(every)} in all)")
        layers = [name for name in every if name in set(layers)]
    config = {"format": FORMAT, **json.loads(json.dumps(config or {})), "layers": layers,
              "state": state_fingerprint(model)}
    data = _start(path, config, fresh)
    if not data["complete"]:  # it will be written: refuse a file qcourse did not write before evaluating
        check_writable(path)
    if data["fp32"] is None:
        with workflow.disable_quantization(model):
            data["fp32"] = {"map": _measure(evaluate, model, "the FP32 model")}
        write_json_atomic(path, data)
    if data["int8"] is None:
        data["int8"] = {"map": _measure(evaluate, model, "the INT8 model")}
        write_json_atomic(path, data)
    _scan(model, evaluate, path, data, layer_of, progress)
    if not data["complete"]:
        data["complete"] = True
        write_json_atomic(path, data)
    return data


def _scan(model, evaluate, path: Path, data: dict, layer_of, progress: bool) -> None:
    """The loop over layers; one atomic write per layer, so a crash loses one evaluation at most."""
    layers = data["config"]["layers"]
    done = len(data["layers"])  # _problem checked they are the first `done` layers, in order
    base = data["int8"]["map"]
    bar = _bar(len(layers), done, progress)
    try:
        for layer in layers[done:]:
            bar.set_postfix_str(layer, refresh=True)
            t0 = time.perf_counter()
            with layers_in_float(model, [layer], layer_of):
                value = _measure(evaluate, model, f"the model with {layer} in float")
            # drop: the accuracy INT8 costs in this layer = what leaving it in float gives back
            data["layers"].append({"layer": layer, "map": value, "drop": value - base,
                                   "seconds": round(time.perf_counter() - t0, 3)})
            write_json_atomic(path, data)
            bar.update(1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped after {len(data['layers'])} of {len(layers)} layers, all saved in {path}; "
                                "rerun the same command to resume") from None
    finally:
        bar.close()


def ranking(results: dict) -> List[dict]:
    """The scanned layers, most sensitive first (largest drop; ties keep model order)."""
    order = {name: i for i, name in enumerate(results["config"]["layers"])}
    return sorted(results["layers"], key=lambda row: (-row["drop"], order[row["layer"]]))


# ----------------------------------------------------------------------------- the proxy
def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def proxy_sqnr(model: nn.Module, batches: Iterable, *, layer_of: Callable[[str], str] = default_layer_of,
               batch_fn: Callable = workflow.default_batch_input, device=None) -> Dict[str, Optional[float]]:
    """``{layer: SQNR in dB}`` of each layer's output with only that layer quantized; no labels needed.

    One pass over ``batches`` with every quantizer off (the FP32 model); a forward hook on
    each layer's module re-runs it on the same float input with its own quantizers on, and
    accumulates ``sum(y^2)`` and ``sum((y - y_q)^2)``: SQNR = 10 log10 of their ratio. Lower
    means more noise, a more sensitive layer. ``None`` when INT8 changed nothing (no noise).
    Layers must be module names (``model.37``), as :func:`default_layer_of` gives.
    """
    groups = {name: slots for name, slots in layer_groups(model, layer_of).items()
              if name in set(quantized_layers(model, layer_of))}
    on = {id(s.quantizer): s.quantizer.switches for slots in groups.values() for s in slots}
    signal = dict.fromkeys(groups, 0.0)
    noise = dict.fromkeys(groups, 0.0)
    busy = []  # set while a hook re-runs its layer, so nested hooks do not fire again

    def hook(name):
        def run(module, args, kwargs, out):
            if busy:
                return
            busy.append(name)
            try:
                qs = {id(s.quantizer): s.quantizer for s in groups[name]}
                for key, q in qs.items():
                    q.switches = on[key]
                quantized = _tensors(module(*args, **kwargs))
                for q in qs.values():
                    q.disable()
            finally:
                busy.pop()
            for y, yq in zip(_tensors(out), quantized):
                signal[name] += float(y.double().square().sum())
                noise[name] += float((y.double() - yq.double()).square().sum())
        return run

    _proxy_pass(model, groups, hook, batches, batch_fn, device)
    return {name: (10 * math.log10(signal[name] / noise[name]) if noise[name] > 0 else None) for name in groups}


def _proxy_pass(model, groups, hook, batches, batch_fn, device) -> None:
    try:
        modules = {name: model.get_submodule(name) for name in groups}
    except AttributeError as e:
        raise ValueError(f"proxy_sqnr needs layers that are module names ({e}); pass a layer_of that "
                         "returns a module path such as 'model.37'") from None
    if device is None:
        device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in modules.items()]
    was_training, seen = model.training, 0
    try:
        model.eval()
        with workflow.disable_quantization(model), torch.no_grad():
            for batch in batches:
                x = batch_fn(batch)
                model(x.to(device) if isinstance(x, torch.Tensor) else x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("proxy_sqnr got no batch; pass a few batches of images")


def rank_correlation(results: dict, proxy: Dict[str, Optional[float]]) -> dict:
    """Spearman's rank correlation of the proxy ranking (low SQNR first) with the mAP-drop ranking.

    ``rho`` near 1 means the label-free proxy orders the layers as the evaluations do. Layers
    with no noise (SQNR ``None``) count as the least sensitive.
    """
    from scipy.stats import spearmanr

    rows = [r for r in results["layers"] if r["layer"] in proxy]
    if len(rows) < 3:
        raise ValueError(f"a rank correlation needs at least 3 layers scanned by both, got {len(rows)}")
    worst = -min((v for v in proxy.values() if v is not None), default=0.0) - 1.0
    neg_sqnr = [-proxy[r["layer"]] if proxy[r["layer"]] is not None else worst for r in rows]
    rho, p = spearmanr([r["drop"] for r in rows], neg_sqnr)
    rho, p = float(rho), float(p)
    return {"spearman": None if math.isnan(rho) else rho, "p_value": None if math.isnan(p) else p,
            "layers": len(rows)}


# ----------------------------------------------------------------------------- top-k
def top_k_table(model: nn.Module, evaluate: Callable[[nn.Module], float], ranked: Sequence[str],
                ks: Sequence[int] = KS, *, requantize: Optional[Callable[[List[str]], nn.Module]] = None,
                layer_of: Callable[[str], str] = default_layer_of, log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """One row per k: the ``ranked[:k]`` layers left in float, the accuracy and the INT8 layer count.

    ``requantize(layers)`` builds a freshly quantized and calibrated model with those layers in
    the ignore list (lesson 5's way; the placement rules and calibration then see only the
    quantized layers). Without it, the layers are switched off in ``model`` with
    :func:`layers_in_float` (no recalibration). A k beyond the ranking is skipped.
    """
    rows = []
    for k in sorted(set(ks)):
        if k > len(ranked):
            continue
        layers = list(ranked[:k])
        if requantize is not None:
            m = requantize(layers)
            value, count = _measure(evaluate, m, f"top-{k} in float"), int8_layer_count(m, layer_of)
        else:
            with layers_in_float(model, layers, layer_of):
                value, count = _measure(evaluate, model, f"top-{k} in float"), int8_layer_count(model, layer_of)
        rows.append({"k": k, "float_layers": layers, "map": value, "int8_layers": count})
        if log:
            log(f"  top-{k:<2d} in float: mAP {value:.4f}, {count} INT8 layers")
    return rows
