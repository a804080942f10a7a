"""Lesson 6's application — sensitivity analysis of YOLOv7(-tiny), as ``qcourse sensitivity`` and the notebook run it.

The model-agnostic scan, proxy and top-k table live in :mod:`qcourse.sensitivity`; this module
adds what is YOLOv7's:

* :func:`prepare` — the calibrated model (lesson 5's :mod:`qcourse.yolo.ptq`: the fused model,
  the head left in float, TensorRT's placement rules, histogram inputs calibrated on training
  images; or a calibrated checkpoint of ``qcourse ptq``), the float model it came from, the
  loaders, and ``evaluate(model) -> mAP@0.5:0.95`` on the val split (or its first batches);
* :func:`requantizer` — lesson 5's ignore list: a fresh quantized, calibrated model with some
  ``model.N`` layers left in float;
* :func:`run_sensitivity` — the whole lesson for one :class:`SensitivityConfig`: the resumable
  scan into ``OUT/sensitivity.json``, the label-free proxy, the top-k table, ``OUT/results.json``.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from qcourse import ptq, sensitivity
from qcourse.sensitivity import KS
from qcourse.utils import check_writable, file_sha256

from . import ptq as yptq
from .models.checkpoint import float_model_from_checkpoint, read_checkpoint

__all__ = ["SensitivityConfig", "Prepared", "prepare", "requantizer", "run_sensitivity", "check_files",
           "PUBLISHED_YOLOV7_TOP10"]

#: the ten most sensitive layers of YOLOv7 on COCO in the course's video (seed 002): a published
#: reference, not measured here; another run on other data ranked other layers
PUBLISHED_YOLOV7_TOP10 = ("model.104", "model.37", "model.2", "model.1", "model.77",
                          "model.99", "model.70", "model.95", "model.92", "model.81")


@dataclass(frozen=True)
class SensitivityConfig:
    """Everything one run needs (``qcourse sensitivity`` fills it from its options).

    ``weights``: float checkpoint (None: the embedded default). ``calibrated``: a calibrated
    checkpoint of ``qcourse ptq`` instead (its method, ignore list and amax are used).
    ``coco``: COCO root (None: the synthetic dataset). ``method``: how amax is computed when
    calibrating here. ``eval_batches``: evaluate only the first N val batches (None: all).
    ``proxy_only``: the label-free ranking alone. ``top``: rows of the printed ranking.
    ``max_layers``: scan only the first N >= 3 quantized layers in model order, a quick look (None: all).
    """

    weights: Optional[Path] = None
    calibrated: Optional[Path] = None
    coco: Optional[Path] = None
    method: str = "mse"
    img_size: Optional[int] = None
    batch_size: int = 32
    calib_batches: int = 8
    eval_batches: Optional[int] = None
    proxy_batches: int = 2
    proxy_only: bool = False
    top: int = 10
    ks: Tuple[int, ...] = KS
    device: str = "cpu"
    out: Path = Path("runs/sensitivity")
    fresh: bool = False
    progress: bool = True
    max_layers: Optional[int] = None
    log: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self):
        if self.method not in ptq.METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(ptq.METHODS)}")
        if self.weights is not None and self.calibrated is not None:
            raise ValueError("pass either weights (to calibrate here) or calibrated (a `qcourse ptq` checkpoint), "
                             "not both: the calibrated checkpoint already holds its weights")
        for name in ("batch_size", "calib_batches", "proxy_batches", "top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name, low in (("eval_batches", 1), ("max_layers", 3)):  # 3 layers: the least a rank correlation takes
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be a whole number >= {low} or None, got {value!r}")


@dataclass
class Prepared:
    """What :func:`prepare` made: the models, the data and the run's identity (``run_config``)."""

    float_model: nn.Module
    qmodel: nn.Module
    ignore: List[str]
    method: str
    calib_batches: int
    calib: object
    val: object
    evaluate: Callable[[nn.Module], float]
    run_config: Dict[str, object]


def _models(config: SensitivityConfig):
    """(float model, calibrated quantized model or None, ignore, method, calib batches, source)."""
    if config.calibrated is None:
        model = yptq.load_float_model(config.weights)
        source = {"weights": str(config.weights) if config.weights else "embedded default"}
        return model, None, yptq.default_ignore(model), config.method, config.calib_batches, source
    path = Path(config.calibrated)
    qmodel = yptq.load_quantized(path)  # checks the file; the float model below comes from the same file
    model = float_model_from_checkpoint(read_checkpoint(path), path.name)
    meta = qmodel.meta
    method, batches = meta.get("method"), meta.get("calib_batches")
    if method not in ptq.METHODS or not isinstance(batches, int):
        raise ValueError(f"{path.name} does not record its calibration method and batches; recreate it with "
                         "`qcourse ptq` or calibrate here (omit --calibrated)")
    source = {"calibrated": str(path), "calibrated_sha256": file_sha256(path)}
    return model, qmodel, list(qmodel.ptq_info["ignore"]), method, batches, source


def prepare(config: SensitivityConfig) -> Prepared:
    """Load, calibrate (unless a calibrated checkpoint is given), build the loaders and ``evaluate``."""
    from .evaluate import evaluate

    model, qmodel, ignore, method, calib_batches, source = _models(config)
    img_size = config.img_size or int(model.meta.get("img_size", 640))
    # the loaders of lesson 5: calibration on the first training batches in a fixed order, val for mAP
    root, calib, val = yptq.loaders(config.coco, config.batch_size, img_size, config.progress)
    model = model.to(config.device).eval()
    if qmodel is None:
        qmodel = _calibrated(model, ignore, method, calib, calib_batches, config)
    qmodel = qmodel.to(config.device).eval()

    def evaluate_map(m: nn.Module) -> float:
        return float(evaluate(m, val, device=config.device, progress=False, max_batches=config.eval_batches)["map"])

    run_config = {**source, "data": str(root), "img_size": img_size, "batch_size": config.batch_size,
                  "method": method, "calib_batches": calib_batches, "ignore": ignore,
                  "eval_batches": config.eval_batches, "metric": "mAP@0.5:0.95"}
    return Prepared(model, qmodel, ignore, method, calib_batches, calib, val, evaluate_map, run_config)


def _calibrated(model, ignore, method, calib, calib_batches, config: SensitivityConfig) -> nn.Module:
    """Lesson 5's recipe: quantize with ``ignore`` and the placement rules, calibrate, load amax."""
    qmodel, _ = yptq.quantize(model, ignore)
    ptq.calibrate(qmodel, calib, calib_batches, device=config.device, progress=config.progress)
    ptq.load_amax(qmodel, method)
    return qmodel


def requantizer(prep: Prepared, config: SensitivityConfig) -> Callable[[List[str]], nn.Module]:
    """``requantize(layers)``: a new calibrated model with ``layers`` (``model.N``) added to the ignore list.

    No layer: the calibrated model itself (the same calibration the scan measured).
    """
    def requantize(layers: List[str]) -> nn.Module:
        if not layers:
            return prep.qmodel
        ignore = prep.ignore + [re.escape(layer) + r"\..*" for layer in layers]
        return _calibrated(prep.float_model, ignore, prep.method, prep.calib, prep.calib_batches, config)

    return requantize


def _proxy(prep: Prepared, config: SensitivityConfig) -> Dict[str, Optional[float]]:
    # label-free: the first calibration (training) batches, images only
    batches = itertools.islice(prep.calib, config.proxy_batches)
    return sensitivity.proxy_sqnr(prep.qmodel, batches, device=config.device)


def _top_rows(scan: dict, proxy: Dict[str, Optional[float]], top: int) -> List[dict]:
    return [{"rank": i + 1, "layer": r["layer"], "map": r["map"], "drop": r["drop"], "sqnr_db": proxy.get(r["layer"])}
            for i, r in enumerate(sensitivity.ranking(scan)[:top])]


def _proxy_rows(proxy: Dict[str, Optional[float]], top: int) -> List[dict]:
    order = sorted(proxy, key=lambda k: float("inf") if proxy[k] is None else proxy[k])
    return [{"rank": i + 1, "layer": name, "sqnr_db": proxy[name]} for i, name in enumerate(order[:top])]


def run_sensitivity(config: SensitivityConfig) -> dict:
    """The lesson on one model: scan (resumable), proxy, top-k; writes and returns ``OUT/results.json``'s content.

    ``OUT/sensitivity.json`` is the scan's file (see :func:`qcourse.sensitivity.sensitivity_analysis`):
    rerunning the same command resumes it. ``results.json`` is the summary, written last.
    A damaged ``sensitivity.json``, or a file of these names that qcourse did not write, is
    refused before the model is calibrated.
    """
    t0 = time.perf_counter()
    out = Path(config.out)
    check_files(config)
    out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be a folder fails here, before the work
    prep = prepare(config)
    config.log(f"{len(sensitivity.quantized_layers(prep.qmodel))} quantized layers; "
               f"evaluating {'all' if config.eval_batches is None else config.eval_batches} val batches each")
    t_proxy = time.perf_counter()
    proxy = _proxy(prep, config)
    results = {"config": prep.run_config, "proxy_sqnr_db": proxy, "proxy_top": _proxy_rows(proxy, config.top),
               "seconds": {"proxy": round(time.perf_counter() - t_proxy, 1)}}
    if not config.proxy_only:
        results.update(_scan_and_table(prep, config, proxy, out, results["seconds"]))
    results["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    sensitivity.write_json_atomic(out / "results.json", results)
    return results


def check_files(config: SensitivityConfig) -> None:
    """Refuse, before any work, what the run could not write: a damaged scan to resume, or a file qcourse
    did not write (:func:`qcourse.utils.check_writable`)."""
    out = Path(config.out)
    scan = out / "sensitivity.json"
    if not config.proxy_only and not config.fresh and scan.exists():
        sensitivity.load_results(scan)  # a damaged file to resume is reported as such (and left as it is)
    check_writable(out / "results.json", *(() if config.proxy_only else (scan,)))


def _scan_and_table(prep: Prepared, config: SensitivityConfig, proxy, out: Path, seconds: dict) -> dict:
    t = time.perf_counter()
    layers = sensitivity.quantized_layers(prep.qmodel)[:config.max_layers]  # [:None]: all of them
    scan = sensitivity.sensitivity_analysis(prep.qmodel, prep.evaluate, out / "sensitivity.json",
                                            prep.run_config, fresh=config.fresh, progress=config.progress,
                                            layers=layers)
    seconds["scan"] = round(time.perf_counter() - t, 1)
    ranked = [r["layer"] for r in sensitivity.ranking(scan)]
    t = time.perf_counter()
    config.log(f"re-quantizing with the top-k layers in float, k = {', '.join(map(str, config.ks))}")
    table = sensitivity.top_k_table(prep.qmodel, prep.evaluate, ranked, config.ks,
                                    requantize=requantizer(prep, config), log=config.log)
    seconds["top_k"] = round(time.perf_counter() - t, 1)
    return {"fp32": scan["fp32"], "int8": scan["int8"], "layers_scanned": len(scan["layers"]),
            "top": _top_rows(scan, proxy, config.top), "proxy_correlation": sensitivity.rank_correlation(scan, proxy),
            "map_vs_k": table, "sensitivity_json": "sensitivity.json"}
