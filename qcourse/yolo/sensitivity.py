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
  scan into ``OUT/sensitivity.json`` (each evaluation's per-image match table kept in
  ``OUT/tables/``), the label-free proxy, the top-k table, and the statistics that say whether
  the ranking means anything (:func:`statistics`), into ``OUT/results.json``;
* :func:`split_half` — the scan scored on two disjoint halves of the evaluated images: the
  Spearman correlation of the two rankings (1: the same order; near 0: the ranking is noise).

The quantization :class:`qcourse.yolo.ptq.Setting` is W8pcA8 by default (what TensorRT runs). On
the embedded default 8-bit quantization costs under a point of mAP, so a scan there measures
noise; :data:`qcourse.yolo.ptq.SENSITIVITY_STRESS` (4-bit activations, amax by entropy) is the
setting where quantization costs enough for a ranking to be tested.
"""
from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from qcourse import ptq, sensitivity
from qcourse.sensitivity import KS
from qcourse.utils import check_writable, file_sha256

from . import ptq as yptq
from .models.checkpoint import float_model_from_checkpoint, read_checkpoint

__all__ = ["SensitivityConfig", "Prepared", "prepare", "requantizer", "run_sensitivity", "check_files",
           "PUBLISHED_YOLOV7_TOP10", "TableKeeper", "halves", "split_rhos", "split_half", "statistics",
           "TOP_K", "CRITERIA", "resampled", "random_draws", "summary_lines", "ranking_title"]

#: how many of the first-ranked layers the top-k tests leave in float (the issue's "top 5")
TOP_K = 5
#: the thresholds a ranking must pass before it may be called "the most sensitive layers"
CRITERIA = {"min_loss": 0.03, "min_rho": 0.7, "min_share": 0.5}

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
    ``setting``: bit widths, weight granularity and amax method when calibrating here (None:
    W8pcA8 with ``method``; e.g. :data:`qcourse.yolo.ptq.SENSITIVITY_STRESS`, whose own method is
    then used). ``draws``: random :data:`TOP_K`-layer choices the top-k is compared with (0: none).
    ``splits``: random half-splits of the images for :func:`split_half`. ``seed``: of the splits and
    the random draws. ``boot``: bootstrap samples of every interval (seed 0, as the course's).
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
    setting: Optional[yptq.Setting] = None
    draws: int = 3
    splits: int = 50
    seed: int = 0
    boot: int = 1000
    log: Callable[[str], None] = field(default=print, compare=False, repr=False)

    @property
    def quant(self) -> yptq.Setting:
        """The setting calibrated here: ``setting``, or W8pcA8 with ``method``."""
        return self.setting if self.setting is not None else yptq.Setting(method=self.method)

    def __post_init__(self):
        if self.setting is not None and not isinstance(self.setting, yptq.Setting):
            raise ValueError(f"setting must be a qcourse.yolo.ptq.Setting such as Setting.parse('W8pcA4'), "
                             f"got {self.setting!r}")
        if self.setting is not None and self.calibrated is not None:
            raise ValueError("pass either a setting (to calibrate here) or calibrated (a `qcourse ptq` checkpoint), "
                             "not both: the checkpoint was calibrated at its own setting")
        if self.method not in ptq.METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(ptq.METHODS)}")
        if self.weights is not None and self.calibrated is not None:
            raise ValueError("pass either weights (to calibrate here) or calibrated (a `qcourse ptq` checkpoint), "
                             "not both: the calibrated checkpoint already holds its weights")
        for name in ("batch_size", "calib_batches", "proxy_batches", "top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("draws", "splits", "seed", "boot"):
            value = getattr(self, name)
            low = {"splits": 1, "boot": 10}.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
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
    setting: Optional[yptq.Setting] = None
    #: ``evaluate_matches(model) -> (mAP, match table)``: the same evaluation, with its per-image matches
    evaluate_matches: Optional[Callable[[nn.Module], tuple]] = None


def _models(config: SensitivityConfig):
    """(float model, calibrated quantized model or None, ignore, setting, calib batches, source)."""
    if config.calibrated is None:
        model = yptq.load_float_model(config.weights)
        source = {"weights": str(config.weights) if config.weights else "embedded default"}
        return model, None, yptq.default_ignore(model), config.quant, config.calib_batches, source
    path = Path(config.calibrated)
    qmodel = yptq.load_quantized(path)  # checks the file; the float model below comes from the same file
    model = float_model_from_checkpoint(read_checkpoint(path), path.name)
    meta = qmodel.meta
    method, batches = meta.get("method"), meta.get("calib_batches")
    if method not in ptq.METHODS or not isinstance(batches, int):
        raise ValueError(f"{path.name} does not record its calibration method and batches; recreate it with "
                         "`qcourse ptq` or calibrate here (omit --calibrated)")
    source = {"calibrated": str(path), "calibrated_sha256": file_sha256(path)}
    info = qmodel.ptq_info
    setting = yptq.Setting(info["weight_desc"]["num_bits"], info["weight_desc"]["axis"] is not None,
                           info["input_desc"]["num_bits"], method)
    return model, qmodel, list(info["ignore"]), setting, batches, source


def prepare(config: SensitivityConfig) -> Prepared:
    """Load, calibrate (unless a calibrated checkpoint is given), build the loaders and ``evaluate``."""
    from .evaluate import evaluate

    model, qmodel, ignore, setting, calib_batches, source = _models(config)
    method = setting.method
    img_size = config.img_size or int(model.meta.get("img_size", 640))
    # the loaders of lesson 5: calibration on the first training batches in a fixed order, val for mAP
    root, calib, val = yptq.loaders(config.coco, config.batch_size, img_size, config.progress)
    model = model.to(config.device).eval()
    if qmodel is None:
        qmodel = _calibrated(model, ignore, setting, calib, calib_batches, config)
    qmodel = qmodel.to(config.device).eval()

    def evaluate_matches(m: nn.Module) -> tuple:
        r = evaluate(m, val, device=config.device, progress=False, max_batches=config.eval_batches, matches=True)
        return float(r["map"]), r["matches"]

    def evaluate_map(m: nn.Module) -> float:
        return float(evaluate(m, val, device=config.device, progress=False, max_batches=config.eval_batches)["map"])

    run_config = {**source, "data": str(root), "img_size": img_size, "batch_size": config.batch_size,
                  "setting": setting.name, "method": method, "calib_batches": calib_batches, "ignore": ignore,
                  "eval_batches": config.eval_batches, "metric": "mAP@0.5:0.95"}
    return Prepared(model, qmodel, ignore, method, calib_batches, calib, val, evaluate_map, run_config, setting,
                    evaluate_matches)


def _calibrated(model, ignore, setting: yptq.Setting, calib, calib_batches, config: SensitivityConfig) -> nn.Module:
    """Lesson 5's recipe at ``setting``: quantize with ``ignore`` and the placement rules, calibrate, load amax."""
    return yptq.calibrated(model, setting, calib, calib_batches, ignore, device=config.device,
                           progress=config.progress)


def requantizer(prep: Prepared, config: SensitivityConfig) -> Callable[[List[str]], nn.Module]:
    """``requantize(layers)``: a new calibrated model with ``layers`` (``model.N``) added to the ignore list.

    No layer: the calibrated model itself (the same calibration the scan measured).
    """
    def requantize(layers: List[str]) -> nn.Module:
        if not layers:
            return prep.qmodel
        ignore = prep.ignore + [re.escape(layer) + r"\..*" for layer in layers]
        setting = prep.setting or yptq.Setting(method=prep.method)
        return _calibrated(prep.float_model, ignore, setting, prep.calib, prep.calib_batches, config)

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
    config.log(f"{len(sensitivity.quantized_layers(prep.qmodel))} quantized layers at {prep.setting.name} "
               f"(amax by {prep.method}); "
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


class TableKeeper:
    """``evaluate(model) -> mAP`` for the scan and the top-k table that keeps each evaluation's match table.

    The table is written (atomically) to ``folder/<name>.npz`` before the mAP is returned, so a
    scan's row in ``sensitivity.json`` always has its table on disk and a resumed scan keeps
    them. An evaluation is named after its model: ``fp32`` (no quantizer on), ``int8`` (every
    layer of ``layers`` quantized) or ``<kind>-<layers>`` (those of ``layers`` not quantized,
    ``+``-joined in model order): ``float-model.3`` is the scan's model.3 switched off in the
    calibrated model, ``ignore-model.3`` the model re-calibrated with model.3 in the ignore list.
    """

    def __init__(self, prep: Prepared, folder, layers: Sequence[str], kind: str = "float"):
        self.prep, self.folder, self.layers, self.kind = prep, Path(folder), list(layers), kind
        self.tables: Dict[str, object] = {}

    def name_for(self, float_layers) -> str:
        off = set(float_layers)
        return f"{self.kind}-" + "+".join(layer for layer in self.layers if layer in off) if off else "int8"

    def name(self, model: nn.Module) -> str:
        on = set(sensitivity.quantized_layers(model))
        if not on:
            return "fp32"
        return self.name_for(layer for layer in self.layers if layer not in on)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def __call__(self, model: nn.Module) -> float:
        from .intervals import save_table

        name = self.name(model)
        value, table = self.prep.evaluate_matches(model)
        save_table(self.path(name), table)
        self.tables[name] = table
        return value

    def table(self, name: str):
        """The table of evaluation ``name``: this run's, or the one an earlier (interrupted) run saved."""
        from .intervals import load_table

        if name not in self.tables:
            path = self.path(name)
            if not path.is_file():
                raise ValueError(f"{path} is missing: sensitivity.json has this evaluation but not its match table "
                                 "(a scan of an older qcourse?); rerun with --fresh (fresh=True) to scan again")
            self.tables[name] = load_table(path)
        return self.tables[name]


# ----------------------------------------------------------------------------- statistics
def halves(n: int, seed: int, count: int, size: Optional[int] = None) -> np.ndarray:
    """(2 * count, n) indicator weights: rows 2i and 2i + 1 split the images at random into ``size``
    (default: half) and the rest, a new split for each i."""
    rng = np.random.default_rng(seed)
    size = n // 2 if size is None else size
    w = np.zeros((2 * count, n))
    for i in range(count):
        perm = rng.permutation(n)
        w[2 * i, perm[:size]] = 1.0
        w[2 * i + 1, perm[size:]] = 1.0
    return w


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def split_rhos(layer_tables: Sequence, int8, w: np.ndarray) -> tuple:
    """``(drops (layers, rows), rho of each split)``: each layer's drop on every row of ``w``, and the
    Spearman correlation of the two rankings of each split (rows 2i, 2i + 1; NaN where a half's drops are
    all equal)."""
    from .intervals import score

    s_int8 = score(int8, w)["map"]
    drops = np.stack([score(t, w)["map"] - s_int8 for t in layer_tables])
    return drops, np.array([_spearman(drops[:, 2 * i], drops[:, 2 * i + 1]) for i in range(w.shape[0] // 2)])


def _finite(x) -> Optional[float]:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def split_half(tables: Mapping[str, object], int8_table, seed: int = 0, splits: int = 50) -> dict:
    """How stable the scan's ranking is: the same scan scored on two disjoint halves of its images.

    ``tables``: ``{layer: match table}`` of the scan (each layer in float), ``int8_table`` the
    INT8 model's, all on the same images. The images are split at random (``seed``) into two
    halves; on each, every layer's drop (mAP with it in float minus INT8) is scored and the
    layers ranked; ``rho`` is Spearman's correlation of the two rankings of the first split,
    ``median`` and ``p05_p95`` those of ``splits`` random splits (the first included). A rho near
    1 says the ranking would come out the same on other images; near 0, that it is noise.
    ``top5_halves``: the first :data:`TOP_K` layers of each half of the first split.
    """
    names = list(tables)
    if len(names) < 3:
        raise ValueError(f"a rank correlation needs at least 3 layers, got {len(names)}")
    n = int8_table.n_images
    if n < 4:
        raise ValueError(f"splitting the images in two halves needs at least 4 images, got {n}")
    w = halves(n, seed, splits)
    drops, rhos = split_rhos([tables[name] for name in names], int8_table, w)
    finite = rhos[np.isfinite(rhos)]
    ranks = [[names[j] for j in np.argsort(-drops[:, h], kind="stable")] for h in (0, 1)]
    return {"rho": _finite(rhos[0]), "halves": [int(w[0].sum()), int(w[1].sum())], "seed": seed, "splits": splits,
            "median": float(np.median(finite)) if len(finite) else None,
            "p05_p95": [float(np.percentile(finite, 5)), float(np.percentile(finite, 95))] if len(finite) else None,
            "top5_halves": [ranks[0][:TOP_K], ranks[1][:TOP_K]]}


def _value(r) -> dict:
    b = r.bootstrap()
    return {"map": b["value"], "interval": b["interval"]}


def _diff(a, b) -> dict:
    d = a.minus(b)
    return {"diff": d["diff"], "interval": d["interval"]}


def _excludes_zero_above(interval) -> bool:
    return interval is not None and interval[0] > 0


def _share(top, int8, fp32) -> dict:
    """The share of the FP32 - INT8 gap that ``top`` wins back, with its interval (None when the gap is noise)."""
    try:
        rec = top.recovered(int8, fp32)
    except ValueError as e:
        return {"recovered_share": None, "interval": None, "why_none": str(e)}
    return {"recovered_share": float(rec["share"]), "interval": rec["interval"]}


def random_draws(layers: Sequence[str], k: int, draws: int, seed: int) -> List[List[str]]:
    """``draws`` random choices of ``k`` of ``layers`` (seeded; each in model order)."""
    rng = np.random.default_rng(seed)
    order = {name: i for i, name in enumerate(layers)}
    return [sorted(rng.choice(list(layers), k, replace=False).tolist(), key=order.get) for _ in range(draws)]


def resampled(cache: Optional[dict], table, boot: int = 1000):
    """``Resampled(table, boot, seed 0)``, scored once per table object when a ``cache`` dict is passed."""
    from .intervals import Resampled

    if cache is None:
        return Resampled(table, n=boot, seed=0)
    if id(table) not in cache:
        cache[id(table)] = (table, Resampled(table, n=boot, seed=0))  # the table is held: its id stays its own
    return cache[id(table)][1]


def statistics(fp32, int8, layer_tables: Mapping[str, object], top_table, random_tables: Sequence,
               *, boot: int = 1000, seed: int = 0, splits: int = 50, k: int = TOP_K,
               cache: Optional[dict] = None) -> dict:
    """What says whether the scan's ranking means anything, from match tables alone (nothing is run).

    ``fp32``, ``int8``: the two reference evaluations; ``layer_tables``: ``{layer: table}`` of the
    scan; ``top_table``: the model re-calibrated with the first ``k`` layers of the ranking in
    float; ``random_tables``: the same with ``k`` random layers. Every interval is a 95 %
    bootstrap over the images (``boot`` draws, seed 0), paired (the same draws) for differences.

    Returns ``fp32``/``int8`` (``{"map", "interval"}``), ``loss`` (FP32 - INT8), ``split_half_rho``
    (:func:`split_half`), ``topk`` (``recovered_share``: the share of the loss the top-k wins
    back, and ``vs_random``: top-k minus the mean of the random draws, each bootstrap sample the
    mean of the draws' samples), ``criteria`` (:data:`CRITERIA`) and ``holds`` (all of them).
    """
    from .intervals import interval

    rs = {name: resampled(cache, t, boot) for name, t in (("fp32", fp32), ("int8", int8))}
    res = {"fp32": _value(rs["fp32"]), "int8": _value(rs["int8"]), "loss": _diff(rs["fp32"], rs["int8"]),
           "split_half_rho": split_half(layer_tables, int8, seed=seed, splits=splits)}
    topk = {"k": k, "recovered_share": None, "interval": None, "vs_random": None}
    if top_table is not None:
        top = resampled(cache, top_table, boot)
        topk.update({"map": _value(top), **_share(top, rs["int8"], rs["fp32"])})
        if random_tables:
            rand = [resampled(cache, t, boot) for t in random_tables]
            for r in rand:
                top.minus(r)  # the same images and draws, or a clear error
            mean_value = float(np.mean([r.value for r in rand]))
            topk["vs_random"] = {"diff": top.value - mean_value,
                                 "interval": interval(top.samples - np.mean([r.samples for r in rand], axis=0)),
                                 "random_maps": [r.value for r in rand]}
    res["topk"] = topk
    rho = res["split_half_rho"]["rho"]
    criteria = {
        f"loss >= {CRITERIA['min_loss']}, interval > 0":
            res["loss"]["diff"] >= CRITERIA["min_loss"] and _excludes_zero_above(res["loss"]["interval"]),
        f"split-half rho >= {CRITERIA['min_rho']}": rho is not None and rho >= CRITERIA["min_rho"],
        f"top-{k} share >= {CRITERIA['min_share']}":
            topk["recovered_share"] is not None and topk["recovered_share"] >= CRITERIA["min_share"],
        f"top-{k} beats random {k}, interval > 0":
            topk["vs_random"] is not None and _excludes_zero_above(topk["vs_random"]["interval"]),
    }
    res["criteria"] = criteria
    res["holds"] = all(criteria.values())
    return res


def _scan_and_table(prep: Prepared, config: SensitivityConfig, proxy, out: Path, seconds: dict) -> dict:
    t = time.perf_counter()
    every = sensitivity.quantized_layers(prep.qmodel)
    layers = every[:config.max_layers]  # [:None]: all of them
    keeper = TableKeeper(prep, out / "tables", every, "float")
    scan = sensitivity.sensitivity_analysis(prep.qmodel, keeper, out / "sensitivity.json",
                                            prep.run_config, fresh=config.fresh, progress=config.progress,
                                            layers=layers)
    seconds["scan"] = round(time.perf_counter() - t, 1)
    ranked = [r["layer"] for r in sensitivity.ranking(scan)]
    t = time.perf_counter()
    config.log(f"re-quantizing with the first-ranked layers in float, k = {', '.join(map(str, config.ks))}")
    requantize = requantizer(prep, config)
    again = TableKeeper(prep, out / "tables", every, "ignore")
    table = sensitivity.top_k_table(prep.qmodel, again, ranked, config.ks, requantize=requantize, log=config.log)
    for row in table:
        row["matches"] = again.path(again.name_for(row["float_layers"])).relative_to(out).as_posix()
    seconds["top_k"] = round(time.perf_counter() - t, 1)
    k = TOP_K if len(ranked) > TOP_K else None
    top_table, random_tables, draws = None, [], []
    t = time.perf_counter()
    if k is not None:
        if k not in config.ks:
            again(requantize(ranked[:k]))
        top_table = again.table(again.name_for(ranked[:k]))
        draws = random_draws(layers, k, config.draws, config.seed)
        for i, pick in enumerate(draws, 1):
            config.log(f"  random {k} layers #{i} in float: {', '.join(pick)}")
            again(requantize(pick))
            random_tables.append(again.table(again.name_for(pick)))
    seconds["random"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    layer_tables = {name: keeper.table(keeper.name_for([name])) for name in layers}
    fp32, int8 = keeper.table("fp32"), keeper.table("int8")
    cache: dict = {}
    stats = statistics(fp32, int8, layer_tables, top_table, random_tables, boot=config.boot, seed=config.seed,
                       splits=config.splits, k=k or TOP_K, cache=cache)
    if stats["topk"]["vs_random"] is not None:
        stats["topk"]["vs_random"]["draws"] = draws
    _intervals_of_rows(table, again, fp32, int8, config.boot, cache)
    seconds["statistics"] = round(time.perf_counter() - t, 1)
    corr = sensitivity.rank_correlation(scan, proxy)
    res = {"setting": prep.setting.as_dict() if prep.setting else None, "images": int(int8.n_images),
            "fp32": stats["fp32"], "int8": stats["int8"], "loss": stats["loss"], "layers_scanned": len(scan["layers"]),
            "top": _top_rows(scan, proxy, config.top), "proxy_correlation": corr,
            "spearman": {"rho": corr["spearman"], "p_value": corr["p_value"]},
            "map_vs_k": table, "split_half_rho": stats["split_half_rho"], "topk": stats["topk"],
            "criteria": stats["criteria"], "holds": stats["holds"],
            "sensitivity_json": "sensitivity.json", "tables": "tables"}
    for line in summary_lines(res):
        config.log(line)
    return res


def _iv(interval) -> str:
    return "[-]" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def ranking_title(res: dict) -> str:
    """"the most sensitive layers" only where every criterion holds; "the layers the scan ranks first" otherwise."""
    return "the most sensitive layers" if res.get("holds") else "the layers the scan ranks first"


def summary_lines(res: dict) -> List[str]:
    """The statistics of a :func:`run_sensitivity` result in words, intervals included."""
    sh, topk = res["split_half_rho"], res["topk"]
    rho = "n/a" if sh["rho"] is None else f"{sh['rho']:.2f}"
    med = "n/a" if sh["median"] is None else f"{sh['median']:.2f}"
    lines = [f"{res['setting']['name'] if res.get('setting') else 'INT8'} on {res['images']} images: FP32 "
             f"{res['fp32']['map']:.4f}, INT8 {res['int8']['map']:.4f}, loss {res['loss']['diff']:+.4f} "
             f"{_iv(res['loss']['interval'])} (paired 95 % interval)",
             f"split-half rho {rho} (halves of {sh['halves'][0]} and {sh['halves'][1]} images; median {med} over "
             f"{sh['splits']} random splits)"]
    if topk["recovered_share"] is not None:
        lo, hi = topk["interval"]
        lines.append(f"top-{topk['k']} in float wins back {topk['recovered_share']:.2f} of the loss [{lo:.2f}, {hi:.2f}]")
    elif topk.get("why_none"):
        lines.append(f"top-{topk['k']} share of the loss: not measurable (the loss is within noise)")
    if topk["vs_random"] is not None:
        v = topk["vs_random"]
        lines.append(f"top-{topk['k']} minus the mean of {len(v['random_maps'])} random {topk['k']}-layer choices: "
                     f"{v['diff']:+.4f} {_iv(v['interval'])}")
    met = [name for name, ok in res["criteria"].items() if ok]
    unmet = [name for name, ok in res["criteria"].items() if not ok]
    lines.append("criteria met: " + (", ".join(met) or "none") + "; not met: " + (", ".join(unmet) or "none")
                 + f" -> the ranking lists {ranking_title(res)}")
    return lines


def _intervals_of_rows(rows: List[dict], keeper: TableKeeper, fp32, int8, boot: int, cache: dict) -> None:
    """Each top-k row gets its mAP's interval and its paired differences with FP32 and INT8."""
    r_fp32, r_int8 = resampled(cache, fp32, boot), resampled(cache, int8, boot)
    for row in rows:
        r = r_int8 if row["k"] == 0 else resampled(cache, keeper.table(keeper.name_for(row["float_layers"])), boot)
        row["interval"] = r.bootstrap()["interval"]
        row["vs_fp32"] = _diff(r, r_fp32)
        row["vs_int8"] = _diff(r, r_int8)
