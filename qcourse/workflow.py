"""Lessons 4-7 — the calibration workflow around a model full of quantizers.

* :func:`quantizers` lists every :class:`~qcourse.nn.TensorQuantizer` by module name;
* :func:`collect_stats` feeds N batches through the model with every quantizer in
  calibration mode (statistics collected, nothing quantized);
* :func:`compute_amax` turns each calibrator's statistics into an amax
  (``method="max" | "entropy" | "mse" | "percentile"``);
* :func:`calibrate_model` does both; :func:`quantized_copy` copies a float model, inserts
  quantizers and calibrates the copy, the start of every experiment in the lessons;
* :func:`disable_quantization` / :func:`enable_quantization` are context managers that
  switch the quantizers of one module (or the whole model) off or on and restore the
  previous state on exit — the building block of sensitivity analysis.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn

from qcourse import calib
from qcourse.nn.tensor_quantizer import TensorQuantizer
from qcourse.quant_modules import replace_modules
from qcourse.tensor_quant import QuantDescriptor

__all__ = [
    "quantizers", "quant_layers", "collect_stats", "compute_amax", "calibrate_model", "quantized_copy",
    "disable_quantization", "enable_quantization", "set_quantizers", "default_batch_input",
    "summarize_quantizers",
]

def quantizers(model: nn.Module, pattern: Optional[str] = None) -> Dict[str, TensorQuantizer]:
    """``{module name: TensorQuantizer}`` in model order, optionally filtered by a regex."""
    rx = re.compile(pattern) if pattern else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and (rx is None or rx.search(name))}


def quant_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module name: module}`` for every module that directly owns a quantizer.

    These are the units sensitivity analysis switches on and off (``model.37.conv``...).
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            continue
        if any(isinstance(c, TensorQuantizer) for c in m.children()):
            out[name] = m
    return out


def default_batch_input(batch):
    """The model input of a batch: the batch itself, its first item, or ``batch['image']``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "input", "img"):
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}; "
                    "pass batch_fn=lambda batch: ... to say where it is")


def _progress(iterable, total, desc, progress):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=None, leave=False)


def collect_stats(model: nn.Module, loader: Iterable, num_batches: Optional[int] = None,
                  device: Union[str, torch.device, None] = None,
                  batch_fn: Callable = default_batch_input, progress: bool = True) -> int:
    """Run ``num_batches`` batches through ``model`` with every quantizer collecting statistics.

    Quantizers with a calibrator switch to ``disable_quant(); enable_calib()``; those without
    are disabled; afterwards every quantizer is back in the state it had. Returns the number of
    batches seen. Raises if the loader is empty or the model has no quantizers.
    """
    qs = quantizers(model)
    if not qs:
        raise ValueError("the model has no TensorQuantizer: insert quantizers first "
                         "(quant_modules.initialize() or quant_modules.replace_modules(model))")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    saved = {n: q.switches for n, q in qs.items()}
    for q in qs.values():
        if q.calibrator is not None:
            q.disable_quant()
            q.enable_calib()
        else:
            q.disable()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        total = num_batches
        if total is None:
            try:
                total = len(loader)
            except TypeError:
                total = None
        with torch.no_grad():
            for batch in _progress(loader, total, "calibrating", progress):
                x = batch_fn(batch)
                x = x.to(device) if isinstance(x, torch.Tensor) else x
                model(x)
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
    finally:
        for n, q in qs.items():
            q.switches = saved[n]
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration loader yielded no batch; give it calibration images")
    return seen


def compute_amax(model: nn.Module, method: str = "max", strict: bool = True, **kwargs) -> Dict[str, torch.Tensor]:
    """Load amax into every quantizer from its calibrator's statistics.

    ``method`` applies to histogram calibrators (``"entropy" | "mse" | "percentile"``; extra
    keyword arguments such as ``percentile=99.99`` go along); max calibrators always use
    their running max. ``method="max"`` with histogram calibrators takes the histogram's
    upper edge, i.e. the maximum seen. Returns ``{quantizer name: amax}``.
    """
    if method not in ("max",) + calib.METHODS:
        raise ValueError(f"method must be 'max' or one of {calib.METHODS}, got {method!r}")
    out = {}
    for name, q in quantizers(model).items():
        c = q.calibrator
        if c is None:
            continue
        if isinstance(c, calib.MaxCalibrator):
            amax = q.load_calib_amax(strict=strict)
        elif method == "max":
            amax = _histogram_max(q, strict)
        else:
            amax = q.load_calib_amax(method=method, strict=strict, **kwargs)
        if amax is not None:
            out[name] = amax
    return out


def _histogram_max(q: TensorQuantizer, strict: bool):
    """amax = the upper edge of the histogram: the largest |x| the calibrator saw."""
    c = q.calibrator
    edges = c.bin_edges
    if edges is None:
        if strict:
            raise RuntimeError("the histogram calibrator has collected no data; run collect_stats first")
        return None
    if isinstance(edges, list):
        template = c.compute_amax("percentile", percentile=100.0)
        amax = torch.tensor([float(e[-1]) for e in edges], dtype=torch.float32).reshape(template.shape)
    else:
        amax = torch.tensor(float(edges[-1]), dtype=torch.float32)
    q.amax = amax
    return q.amax


def calibrate_model(model: nn.Module, loader: Iterable, num_batches: Optional[int] = None,
                    method: str = "max", device=None, batch_fn: Callable = default_batch_input,
                    progress: bool = True, **kwargs) -> Dict[str, torch.Tensor]:
    """:func:`collect_stats` then :func:`compute_amax`; returns ``{quantizer name: amax}``."""
    collect_stats(model, loader, num_batches, device=device, batch_fn=batch_fn, progress=progress)
    return compute_amax(model, method=method, **kwargs)


def quantized_copy(model: nn.Module, calib_data: Optional[Iterable] = None, *, method: Optional[str] = "max",
                   quant_desc_input: Optional[QuantDescriptor] = None,
                   quant_desc_weight: Optional[QuantDescriptor] = None, ignore=None,
                   weights_only: bool = False, num_batches: Optional[int] = None,
                   progress: bool = False, **amax_kwargs) -> nn.Module:
    """A quantized, calibrated copy of ``model``; ``model`` itself is left as it was (lessons 1-7).

    The three steps every experiment starts with: ``copy.deepcopy``,
    :func:`~qcourse.quant_modules.replace_modules` (``ignore``, ``quant_desc_input``,
    ``quant_desc_weight`` go to it) and calibration on ``calib_data``:

    * ``method="max" | "entropy" | "mse" | "percentile"``: :func:`collect_stats` then
      :func:`compute_amax`. Without ``quant_desc_input`` the inputs get the calibrator the
      method needs (max, or a histogram for the other three).
    * ``method=None``: statistics only, amax not computed yet (inspect the calibrators).
    * ``calib_data=None``: no calibration; quantizers without amax stay dynamic.
    * ``weights_only=True``: every input quantizer disabled (weight-only quantization).

    Returns the copy in eval mode.
    """
    if method is not None and method not in ("max",) + calib.METHODS:
        raise ValueError(f"method must be None, 'max' or one of {calib.METHODS}, got {method!r}")
    if quant_desc_input is None and method not in (None, "max"):
        quant_desc_input = QuantDescriptor(calib_method="histogram")
    qmodel = copy.deepcopy(model)
    replace_modules(qmodel, ignore=ignore, quant_desc_input=quant_desc_input,
                    quant_desc_weight=quant_desc_weight)
    if weights_only:
        for name, q in quantizers(qmodel).items():
            if name.endswith("_input_quantizer"):
                q.disable()
    if calib_data is not None:
        collect_stats(qmodel, calib_data, num_batches, progress=progress)
        if method is not None:
            compute_amax(qmodel, method=method, **amax_kwargs)
    return qmodel.eval()


def set_quantizers(module: nn.Module, enabled: bool) -> None:
    """Enable or disable every quantizer inside ``module`` (the module itself included)."""
    for m in module.modules():
        if isinstance(m, TensorQuantizer):
            m.enable() if enabled else m.disable()


@contextlib.contextmanager
def _switched(module: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    qs = [m for m in module.modules() if isinstance(m, TensorQuantizer)]
    saved = [q.switches for q in qs]
    try:
        set_quantizers(module, enabled)
        yield module
    finally:
        for q, switches in zip(qs, saved):
            q.switches = switches


def disable_quantization(module: nn.Module):
    """Context manager: every quantizer in ``module`` is off inside the block.

    ``with disable_quantization(model.model[37]): evaluate(model)`` measures what
    leaving layer 37 in float is worth. The previous on/off state is restored on exit.
    """
    return _switched(module, False)


def enable_quantization(module: nn.Module):
    """Context manager: every quantizer in ``module`` is on inside the block."""
    return _switched(module, True)


def summarize_quantizers(model: nn.Module) -> List[dict]:
    """One row per quantizer: name, enabled, bits, axis, amax (min/max), calibrator."""
    rows = []
    for name, q in quantizers(model).items():
        a = q.amax
        rows.append({
            "name": name, "enabled": q.is_enabled, "num_bits": q.num_bits, "axis": q.axis,
            "amax_min": None if a is None else float(a.min()),
            "amax_max": None if a is None else float(a.max()),
            "calibrator": type(q.calibrator).__name__ if q.calibrator is not None else None,
        })
    return rows
