"""Parameter groups, freezing and in-place weight quantization for QAT (lesson 7).

The functions of ``pytorch_quantization.optim.helper``. Patterns are regular expressions
searched (``re.search``) in each parameter's qualified name, as in the reference: ``"bias"``
matches every bias, ``r"^conv1\\."`` only the first conv's parameters.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["match_parameters", "group_parameters", "freeze_parameters", "quant_weight_inplace"]

_log = logging.getLogger(__name__)


def _compiled(patterns, what: str = "patterns") -> List[re.Pattern]:
    # a bare string would be iterated character by character and match almost everything
    if isinstance(patterns, (str, re.Pattern)) or not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{what} must be a list of regex strings, got {patterns!r}; "
                        f"write [{patterns!r}] for a single pattern")
    out = []
    for p in patterns:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"{what} must hold regex strings, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid regex {p!r} in {what}: {e}") from None
    return out


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def match_parameters(model: nn.Module, patterns: Sequence[str]) -> Iterator[nn.Parameter]:
    """Yield each parameter of ``model`` whose name matches any of ``patterns``.

    A parameter matching several patterns is yielded once (the reference yields it once
    per pattern, which an optimizer then refuses as a duplicate).
    """
    _check_model(model)
    pats = _compiled(patterns)
    for name, param in model.named_parameters():
        if any(p.search(name) for p in pats):
            yield param


def _per_group(name: str, values, n: int) -> Optional[list]:
    if values is None:
        return None
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but patterns_list has {n} groups; "
                         f"give one {name[:-1]} per group")
    return values


def group_parameters(model: nn.Module, patterns_list: Sequence[Sequence[str]], lrs=None, momentums=None,
                     weight_decays=None) -> List[Dict]:
    """Per-parameter option groups for a torch optimizer, one per entry of ``patterns_list``.

    ``group_parameters(model, [["conv1", "conv2"], ["fc"]], lrs=[0.1, 0.01])`` ->
    ``[{"params": [...], "lr": 0.1}, {"params": [...], "lr": 0.01}]``. ``momentums`` and
    ``weight_decays`` work like ``lrs``. Parameters matching no group are left out (add a
    catch-all group to train them). Groups must not overlap: a parameter in two groups is
    an error here, not later inside the optimizer.
    """
    _check_model(model)
    if isinstance(patterns_list, str) or not all(isinstance(p, (list, tuple)) for p in patterns_list):
        raise TypeError(f"patterns_list must be a list of lists of patterns, e.g. [['conv'], ['fc']], "
                        f"got {patterns_list!r}")
    n = len(patterns_list)
    options = {key: _per_group(key, vals, n) for key, vals in
               (("lrs", lrs), ("momentums", momentums), ("weight_decays", weight_decays))}
    groups, owner = [], {}
    for i, patterns in enumerate(patterns_list):
        pats = _compiled(patterns, f"patterns_list[{i}]")
        params = []
        for name, param in model.named_parameters():
            if any(p.search(name) for p in pats):
                if name in owner:
                    raise ValueError(f"parameter {name!r} matches groups {owner[name]} and {i}; "
                                     "make the patterns exclusive")
                owner[name] = i
                params.append(param)
        groups.append({"params": params})
    for key, option in (("lrs", "lr"), ("momentums", "momentum"), ("weight_decays", "weight_decay")):
        for group, value in zip(groups, options[key] or ()):
            group[option] = value
    return groups


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches; return their names."""
    _check_model(model)
    pats = _compiled(patterns)
    frozen = []
    for name, param in model.named_parameters():
        if any(p.search(name) for p in pats):
            param.requires_grad_(False)
            frozen.append(name)
            _log.info("Freeze %s.", name)
    return frozen


def quant_weight_inplace(model: nn.Module) -> List[str]:
    """Replace each quantized layer's weight by its quantized value, in place; return the layer names.

    After this the weights lie on the quantization grid, so fake-quantizing them again
    changes nothing (for relax-and-round style training, or to inspect what TensorRT will
    store). A real (``fake_quant=False``) weight quantizer writes integer codes, which only
    makes sense for inference: a warning says so.
    """
    _check_model(model)
    done = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "_weight_quantizer", None)
        if quantizer is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not quantizer.fake_quant:
            _log.warning("%s: in-place real quantization stores integer codes in the weight; "
                         "use it for inference only", name)
        with torch.no_grad():
            module.weight.copy_(quantizer(module.weight))
        done.append(name)
    return done
