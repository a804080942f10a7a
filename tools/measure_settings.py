"""Measure, on the embedded default, settings in which the course's effects are significant (issue 22).

At W8A8 (8-bit per-channel weights, 8-bit per-tensor activations) the embedded YOLOv7-tiny loses
under a point of mAP with every calibration method, so lessons 5-7 compare numbers that lie within
the noise of 250 val images. This script looks for ONE lower-precision setting in which, on all
250 val images, with 95 % bootstrap intervals over images (paired where two models are compared
on the same images, :mod:`qcourse.yolo.intervals`):

* lesson 5 (``screen``): max calibration loses at least 2 points more than the best histogram
  method, the paired interval excluding 0;
* lesson 6 (``sensitivity``): quantization costs at least 3 points; the per-layer ranking is
  stable between two disjoint halves of the val images (Spearman rho >= 0.7; both halves come
  from ONE scan, each evaluation keeping its per-image match table); the top-5 layers left in
  float win back at least half of the loss, and more than 5 random layers do; the label-free
  SQNR proxy's rank correlation with the mAP ranking;
* lesson 7 (``qat``): QAT (:mod:`qcourse.yolo.qat`'s losses, :func:`qcourse.qat.train`) wins
  back at least 70 % of the PTQ loss, with the paired intervals of QAT - PTQ and FP32 - QAT and
  a bootstrap interval of the share won back.

Every bootstrap uses the same 1000 draws of the images (``--boot``, ``--seed``), so a difference
of two models' sample scores is the paired bootstrap of :func:`qcourse.yolo.intervals.paired`.

Settings are named ``W<bits><pc|pt>A<bits>``: weight bits, per-channel (axis 0) or per-tensor
weights (max calibration either way), activation bits (per-tensor, histogram calibration; the
amax ``method`` is one of :data:`qcourse.ptq.METHODS`). The detection head stays in float and
TensorRT's placement rules tie quantizers, as in lesson 5 (:func:`qcourse.yolo.ptq.quantize`).

Everything lands in ``--out`` (default ``runs/settings``): ``results.json`` (rewritten after
every step), ``report.md`` (the tables), and per setting the evaluations' match tables
(``.npz``), the scan's resumable ``sensitivity.json`` and the QAT runs' checkpoints. A rerun of
the same command reuses what is there, so an interrupted run continues where it stopped; delete
the folder (or pass another ``--out``) to start over. Several runs (other settings) may share
``--out`` at the same time: each writes only its own entries of ``results.json``.

The record of how the setting was chosen (one thread each, the last three side by side):

    python tools/measure_settings.py --steps screen --candidates W8pcA5,W4pcA6,W8pcA6,W4pcA8,W8pcA4
    python tools/measure_settings.py --out runs/settings/probe --steps screen --methods mse \\
        --candidates W3pcA8,W4ptA8,W5ptA8
    python tools/measure_settings.py --steps sensitivity --setting W8pcA5 --method mse
    python tools/measure_settings.py --steps sensitivity --setting W4ptA8 --method mse
    python tools/measure_settings.py --steps sensitivity --setting W8pcA4 --method entropy
    python tools/measure_settings.py --steps qat --setting W8pcA4 --method entropy --learn-amax \\
        --qat detection:4x40,detection:4x80

A quick check of the script (32 images, a few layers, two QAT steps):

    python tools/measure_settings.py --out runs/settings/smoke --eval-batches 1 --scan-layers 6 \\
        --candidates W8pcA5 --qat detection:1x2 --random-draws 2 --splits 5 --boot 50
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from qcourse import ptq, qat, sensitivity
from qcourse.yolo import intervals
from qcourse.yolo import ptq as yptq
from qcourse.yolo import qat as yqat
from qcourse.yolo.datasets import create_dataloader, dataset_splits
from qcourse.yolo.evaluate import evaluate

STEPS = ("screen", "sensitivity", "qat")
DEFAULT_CANDIDATES = ("W8pcA5", "W4pcA6", "W8pcA6", "W4pcA8", "W8pcA4")
DEFAULT_SETTING, DEFAULT_METHOD = "W8pcA4", "entropy"  # the closest to every criterion (see the record above)
HISTOGRAM_METHODS = tuple(m for m in ptq.METHODS if m != "max")
TOP_KS = (1, 3, 5, 10)  # k = 0 is the scanned INT8 model itself
TOP = 5  # the issue's "top 5 layers in float"
COURSE_SCAN_IMAGES = 64  # `qcourse course` scans on 2 val batches of 32

# the issue's thresholds
MIN_MAX_GAP = 0.02  # max calibration loses >= 2 points more than the best histogram method
MIN_LOSS = 0.03  # quantization costs >= 3 points
MIN_RHO = 0.7  # split-half Spearman rho of the layer ranking
MIN_TOP_SHARE = 0.5  # the top-5 in float win back >= half of the loss
MIN_QAT_SHARE = 0.7  # QAT wins back >= 70 % of the PTQ loss


# ----------------------------------------------------------------------------- settings
Setting = yptq.Setting


def parse_setting(text: str) -> Setting:
    """``W8pcA6`` -> :class:`qcourse.yolo.ptq.Setting` (an argparse error for anything else)."""
    try:
        return Setting.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_qat_runs(text: str) -> List[dict]:
    """``"detection:4x40,distill:4x40"`` -> ``[{"loss", "epochs", "iters"}, ...]``."""
    runs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+):(\d+)x(\d+)", part)
        if not m or m[1] not in yqat.LOSSES or int(m[2]) < 1 or int(m[3]) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not a QAT run like detection:4x40 (loss "
                                             f"{' or '.join(yqat.LOSSES)}, epochs x steps per epoch)")
        runs.append({"loss": m[1], "epochs": int(m[2]), "iters": int(m[3])})
    return runs


# ----------------------------------------------------------------------------- the run's state
class Run:
    """The model, the data, the bootstrap draws, the results file and the cached evaluations."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = {"weights": "embedded default", "calib_batches": args.calib_batches,
                       "calib_batch_size": 32, "eval_batches": args.eval_batches, "boot": args.boot,
                       "seed": args.seed}
        self.results = self._load_results()
        self._touched = set()
        self.fp32_model = yptq.load_float_model()
        self.img_size = int(self.fp32_model.meta.get("img_size", 640))
        # lesson 5's loaders: calibration on the first training batches in a fixed order, val for mAP
        self.root, self.calib, self.val = yptq.loaders(None, 32, self.img_size)
        _, self.train_split, _ = dataset_splits(None)
        self.draws = None  # the bootstrap draws, made once the number of images is known
        self._samples: Dict[str, np.ndarray] = {}

    def _load_results(self) -> dict:
        path = self.out / "results.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("config") != self.config:
                sys.exit(f"{path} was made with other settings ({old.get('config')}, now {self.config}); "
                         "pass another --out, or delete that folder to start over")
            return old
        return {"config": self.config, "fp32": None, "screen": {}, "sensitivity": {}, "qat": {}}

    def entry(self, section: str, key: str, default: dict) -> dict:
        """``results[section][key]``, marked as this run's: :meth:`save` writes it back."""
        self._touched.add((section, key))
        return self.results[section].setdefault(key, default)

    def save(self) -> None:
        """Write ``results.json``: the entries this run touched over what is in the file now.

        Several runs of the script (other settings) may share ``--out``: each one writes only its
        own entries, under a lock, so none undoes another's.
        """
        import fcntl

        path = self.out / "results.json"
        with open(self.out / ".results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(path.read_text()) if path.is_file() else {}
            merged = {**self.results, **{k: v for k, v in disk.items() if k in ("screen", "sensitivity", "qat")}}
            merged["fp32"] = self.results["fp32"] or disk.get("fp32")
            for section, key in self._touched:
                merged[section] = {**merged[section], key: self.results[section][key]}
            sensitivity.write_json_atomic(path, merged)
            self.results = {**merged, **{section: {**merged[section]} for section in ("screen", "sensitivity", "qat")}}

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # ------------------------------------------------------------------ models
    def calibrated(self, setting: Setting, method: str, float_layers: Sequence[str] = ()):
        """Lesson 5's PTQ at ``setting``: head (and ``float_layers``) in float, tied, calibrated, amax by ``method``."""
        ignore = yptq.default_ignore(self.fp32_model) + [re.escape(l) + r"\..*" for l in float_layers]
        input_desc, weight_desc = setting.descriptors()
        qmodel, _ = yptq.quantize(self.fp32_model, ignore, input_desc=input_desc, weight_desc=weight_desc)
        ptq.calibrate(qmodel, self.calib, self.args.calib_batches, progress=False)
        ptq.load_amax(qmodel, method)
        return qmodel.eval()

    # ------------------------------------------------------------------ evaluations
    def table(self, model, path: Path) -> intervals.MatchTable:
        """The match table of ``model`` on the val images: read from ``path`` when an earlier run saved it."""
        if path.is_file():
            return intervals.load_table(path)
        t0 = time.perf_counter()
        r = evaluate(model, self.val, progress=False, max_batches=self.args.eval_batches, matches=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        intervals.save_table(path, r["matches"])
        sensitivity.write_json_atomic(path.with_suffix(".json"), {"seconds": round(time.perf_counter() - t0, 1),
                                                                  "map": r["map"], "images": r["images"]})
        return r["matches"]

    def seconds(self, path: Path) -> Optional[float]:
        """How long the evaluation saved at ``path`` took (when it ran)."""
        side = path.with_suffix(".json")
        return json.loads(side.read_text())["seconds"] if side.is_file() else None

    def samples(self, key: str, table: intervals.MatchTable) -> np.ndarray:
        """mAP of ``table`` on each bootstrap draw (the same draws for every table: differences are paired)."""
        if key not in self._samples:
            if self.draws is None:
                self.draws = intervals.resample(table.n_images, self.args.boot, self.args.seed)
            self._samples[key] = intervals.score(table, self.draws)["map"]
        return self._samples[key]

    def fp32(self):
        path = self.out / "fp32.npz"
        table = self.table(self.fp32_model, path)
        if self.results["fp32"] is None:
            self.results["fp32"] = {**self.value(table, "fp32"), "eval_s": self.seconds(path)}
            self.save()
        return table

    def value(self, table, key: str) -> dict:
        """``{"map", "ci"}``: the mAP and its 95 % bootstrap interval."""
        return {"map": rnd(intervals.score(table)["map"]), "ci": ci(self.samples(key, table))}

    def diff(self, a, key_a: str, b, key_b: str) -> dict:
        """``{"diff", "ci"}``: mAP(a) - mAP(b) and its paired 95 % bootstrap interval."""
        d = intervals.score(a)["map"] - intervals.score(b)["map"]
        return {"diff": rnd(d), "ci": ci(self.samples(key_a, a) - self.samples(key_b, b))}

    def share(self, gained: np.ndarray, lost: np.ndarray, point: float) -> dict:
        """A recovered share (gain / loss) and its interval on the same bootstrap draws."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = gained / lost
        return {"share": rnd(point), "ci": ci(s[np.isfinite(s)])}


class Recorder:
    """``evaluate(model) -> mAP`` for the package's scan and top-k table, keeping every match table.

    The evaluation is named after the model: ``fp32`` (no quantizer on), ``int8`` (every scanned
    layer quantized) or ``float-<layers>`` (those of ``layers`` not quantized), so a resumed scan
    finds its tables again.
    """

    def __init__(self, run: Run, folder: Path, layers: Sequence[str]):
        self.run, self.folder, self.layers = run, folder, list(layers)
        self.tables: Dict[str, intervals.MatchTable] = {}

    def name(self, model) -> str:
        on = set(sensitivity.quantized_layers(model))
        if not on:
            return "fp32"
        return self.name_for(layer for layer in self.layers if layer not in on)

    def name_for(self, float_layers) -> str:
        """The name of the evaluation with ``float_layers`` (and no other scanned layer) in float."""
        off = set(float_layers)
        return "float-" + "+".join(layer for layer in self.layers if layer in off) if off else "int8"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def __call__(self, model) -> float:
        name = self.name(model)
        self.tables[name] = self.run.table(model, self.path(name))
        return intervals.score(self.tables[name])["map"]

    def key(self, name: str) -> str:
        return str(self.path(name))


def rnd(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def ci(samples: np.ndarray) -> List[float]:
    return [rnd(v) for v in intervals.interval(samples)]


def excludes_zero(c: Sequence[float]) -> bool:
    return c[0] > 0 or c[1] < 0


# ----------------------------------------------------------------------------- lesson 5: calibration
def screen(run: Run, setting: Setting, methods: Sequence[str] = ptq.METHODS) -> dict:
    """The calibration ``methods`` at ``setting``: mAP, loss vs FP32, and max vs the best histogram method."""
    fp32 = run.fp32()
    folder = run.out / setting.name / "screen"
    res = run.entry("screen", setting.name, {"methods": {}})
    todo = [m for m in methods if m not in res["methods"]]
    if todo:
        t0 = time.perf_counter()
        qmodel = run.calibrated(setting, "max")
        res["calibrate_s"] = round(time.perf_counter() - t0, 1)
        for method in todo:
            ptq.load_amax(qmodel, method)
            path = folder / f"{method}.npz"
            table = run.table(qmodel, path)
            row = {**run.value(table, str(path)), "vs_fp32": run.diff(table, str(path), fp32, "fp32"),
                   "eval_s": run.seconds(path)}
            res["methods"][method] = row
            run.log(f"{setting.name} {method:10s} mAP {row['map']:.4f} {row['ci']}  vs FP32 "
                    f"{row['vs_fp32']['diff']:+.4f} {row['vs_fp32']['ci']}")
            run.save()
    histogram = [m for m in HISTOGRAM_METHODS if m in res["methods"]]
    if "max" not in res["methods"] or not histogram:
        return res  # a quick look at the loss only: no method comparison
    tables = {m: intervals.load_table(folder / f"{m}.npz") for m in ["max"] + histogram}
    best = max(histogram, key=lambda m: res["methods"][m]["map"])
    gap = run.diff(tables[best], str(folder / f"{best}.npz"), tables["max"], str(folder / "max.npz"))
    res["best_histogram"] = best
    res["best_minus_max"] = gap
    res["significant"] = gap["diff"] >= MIN_MAX_GAP and gap["ci"][0] > 0
    run.log(f"{setting.name}: {best} - max = {gap['diff']:+.4f} {gap['ci']} -> item 2 "
            f"{'met' if res['significant'] else 'not met'}")
    run.save()
    return res


# ----------------------------------------------------------------------------- lesson 6: sensitivity
# the split-half machinery is the package's (the course's sensitivity stage and lesson 6 use the same code)
from qcourse.yolo.sensitivity import halves, split_rhos  # noqa: E402


def within(run: Run, table, half: np.ndarray) -> np.ndarray:
    """mAP of ``table`` on bootstrap draws of the images of ``half`` only (an indicator row)."""
    idx = np.flatnonzero(half)
    w = np.zeros((run.args.boot, table.n_images))
    w[:, idx] = intervals.resample(len(idx), run.args.boot, run.args.seed)
    return intervals.score(table, w)["map"]


def sensitivity_step(run: Run, setting: Setting, method: str) -> dict:
    """The scan, its split-half stability, the proxy, top-k in float, top-5 vs random 5."""
    args, key = run.args, f"{setting.name}/{method}"
    fp32 = run.fp32()
    base = run.out / setting.name / method
    res = run.entry("sensitivity", key, {})
    t0 = time.perf_counter()
    qmodel = run.calibrated(setting, method)
    res["calibrate_s"] = round(time.perf_counter() - t0, 1)
    every = sensitivity.quantized_layers(qmodel)
    layers = every[: args.scan_layers]

    # the scan, resumable: the package's loop, each evaluation's match table kept by the recorder
    scan_rec = Recorder(run, base / "scan", every)
    t0 = time.perf_counter()
    config = {"setting": setting.name, "method": method, "calib_batches": args.calib_batches,
              "eval_batches": args.eval_batches, "metric": "mAP@0.5:0.95"}
    scan = sensitivity.sensitivity_analysis(qmodel, scan_rec, base / "scan" / "sensitivity.json", config,
                                            layers=layers)
    scan_s = [r["seconds"] for r in scan["layers"]]
    int8 = intervals.load_table(scan_rec.path("int8"))
    int8_key = scan_rec.key("int8")
    res.update({"layers_scanned": len(layers), "int8": run.value(int8, int8_key),
                "loss": run.diff(fp32, "fp32", int8, int8_key),
                "scan_s": round(sum(scan_s), 1), "eval_s_mean": rnd(np.mean(scan_s), 1)})
    res["loss_significant"] = res["loss"]["diff"] >= MIN_LOSS and res["loss"]["ci"][0] > 0
    run.log(f"{key}: INT8 {res['int8']['map']:.4f}, loss {res['loss']['diff']:+.4f} {res['loss']['ci']}; "
            f"scan of {len(layers)} layers {res['scan_s']:.0f} s")
    ranked = [r["layer"] for r in sensitivity.ranking(scan)]
    layer_tables = {r["layer"]: intervals.load_table(scan_rec.path(f"float-{r['layer']}")) for r in scan["layers"]}
    res["top"] = [{"layer": name, **run.diff(layer_tables[name], scan_rec.key(f"float-{name}"), int8, int8_key)}
                  for name in ranked[:TOP]]
    run.save()

    # split-half stability: the same scan scored on two disjoint halves of the images
    w = halves(int8.n_images, args.seed, args.splits)
    s_int8 = intervals.score(int8, w)["map"]
    s_fp32 = intervals.score(fp32, w)["map"]
    drops, rhos = split_rhos([layer_tables[name] for name in layers], int8, w)  # drops: (L, 2 splits)
    half_rank = [[layers[j] for j in np.argsort(-drops[:, h], kind="stable")] for h in (0, 1)]  # split 0
    res["split_half"] = {"rho": rnd(rhos[0], 3), "splits": args.splits, "rho_median": rnd(np.median(rhos), 3),
                         "rho_p05_p95": [rnd(np.percentile(rhos, 5), 3), rnd(np.percentile(rhos, 95), 3)],
                         "loss_halves": [rnd(s_fp32[0] - s_int8[0]), rnd(s_fp32[1] - s_int8[1])],
                         "top5_halves": [half_rank[0][:TOP], half_rank[1][:TOP]],
                         "top5_overlap": len(set(half_rank[0][:TOP]) & set(half_rank[1][:TOP]))}
    run.log(f"{key}: split-half rho {res['split_half']['rho']:.3f} (median over {args.splits} splits "
            f"{res['split_half']['rho_median']:.3f}, 90 % of splits in {res['split_half']['rho_p05_p95']})")
    # the course's quick scan evaluates 64 images (2 batches of 32): how well does such a ranking
    # agree with the one of the other images?
    if int8.n_images > 2 * COURSE_SCAN_IMAGES:
        _, r64 = split_rhos([layer_tables[name] for name in layers], int8,
                            halves(int8.n_images, args.seed, args.splits, COURSE_SCAN_IMAGES))
        res["split_64"] = {"rho_median": rnd(np.median(r64), 3),
                           "rho_p05_p95": [rnd(np.percentile(r64, 5), 3), rnd(np.percentile(r64, 95), 3)]}
        run.log(f"{key}: {COURSE_SCAN_IMAGES} random images vs the other {int8.n_images - COURSE_SCAN_IMAGES}: "
                f"rho median {res['split_64']['rho_median']:.3f}, 5-95 % {res['split_64']['rho_p05_p95']}")
    run.save()

    # the label-free proxy (the first 2 calibration batches, as the course's scan uses)
    t0 = time.perf_counter()
    proxy = sensitivity.proxy_sqnr(qmodel, itertools.islice(run.calib, 2))
    corr = sensitivity.rank_correlation(scan, proxy)
    proxy_top = sorted((n for n in layers if proxy[n] is not None), key=proxy.get)[:TOP]
    res["proxy"] = {"spearman": None if corr["spearman"] is None else rnd(corr["spearman"], 3),
                    "p_value": None if corr["p_value"] is None else float(f"{corr['p_value']:.3g}"),
                    "seconds": round(time.perf_counter() - t0, 1), "top5": proxy_top,
                    "top5_overlap": len(set(proxy_top) & set(ranked[:TOP]))}
    run.log(f"{key}: proxy rho {res['proxy']['spearman']} ({res['proxy']['seconds']:.0f} s)")
    run.save()

    # re-quantized with layers in float (lesson 5's ignore list, calibration again)
    top_rec = Recorder(run, base / "topk", every)
    t0 = time.perf_counter()
    table = sensitivity.top_k_table(qmodel, top_rec, ranked, TOP_KS,
                                    requantize=lambda ls: run.calibrated(setting, method, ls))
    res["top_k_s"] = round(time.perf_counter() - t0, 1)
    lost_s = run.samples("fp32", fp32) - run.samples(int8_key, int8)
    lost = intervals.score(fp32)["map"] - intervals.score(int8)["map"]
    res["map_vs_k"] = []
    for row in table:
        name = top_rec.name_for(row["float_layers"])
        t = top_rec.tables[name]
        gained = run.samples(top_rec.key(name), t) - run.samples(int8_key, int8)
        res["map_vs_k"].append({"k": row["k"], **run.value(t, top_rec.key(name)),
                                "share": run.share(gained, lost_s, (row["map"] - intervals.score(int8)["map"]) / lost),
                                "eval_s": run.seconds(top_rec.path(name))})
    top5 = next(r for r in res["map_vs_k"] if r["k"] == TOP)
    run.log(f"{key}: top-{TOP} in float {top5['map']:.4f}, share of the loss won back {top5['share']['share']:.2f} "
            f"{top5['share']['ci']}")
    run.save()

    def requantized(float_layers: Sequence[str]):
        name = top_rec.name_for(float_layers)
        if not top_rec.path(name).is_file():  # calibrate only what an earlier run did not evaluate
            top_rec(run.calibrated(setting, method, float_layers))
        return intervals.load_table(top_rec.path(name)), top_rec.key(name)

    # top 5 vs 5 random layers (fixed seed; averaged over the draws, and draw by draw)
    top_t, top_k = requantized(ranked[:TOP])
    rng = np.random.default_rng(args.seed)
    draws, rand_samples, rand_points = [], [], []
    for _ in range(args.random_draws):
        pick = sorted(rng.choice(every, TOP, replace=False).tolist(), key=every.index)
        t, k = requantized(pick)
        rand_samples.append(run.samples(k, t))
        rand_points.append(intervals.score(t)["map"])
        draws.append({"layers": pick, **run.value(t, k), "top5_minus": run.diff(top_t, top_k, t, k)})
    mean_rand = float(np.mean(rand_points))
    res["random5"] = {"seed": args.seed, "draws": draws, "mean_map": rnd(mean_rand),
                      "top5_minus_mean": {"diff": rnd(intervals.score(top_t)["map"] - mean_rand),
                                          "ci": ci(run.samples(top_k, top_t) - np.mean(rand_samples, axis=0))}}
    run.log(f"{key}: top-{TOP} - mean of {args.random_draws} random {TOP}: "
            f"{res['random5']['top5_minus_mean']['diff']:+.4f} {res['random5']['top5_minus_mean']['ci']}")
    run.save()

    # selection on one half, measured on the other: the top-5 share without choosing and scoring on the same images
    cross = []
    for pick_half, score_half in ((0, 1), (1, 0)):
        t, _ = requantized(half_rank[pick_half][:TOP])
        hw = w[score_half][None, :]
        gain_p = intervals.score(t, hw)["map"][0] - intervals.score(int8, hw)["map"][0]
        lost_p = intervals.score(fp32, hw)["map"][0] - intervals.score(int8, hw)["map"][0]
        g = within(run, t, w[score_half]) - within(run, int8, w[score_half])
        l_ = within(run, fp32, w[score_half]) - within(run, int8, w[score_half])
        cross.append({"picked_on": f"half {pick_half}", "scored_on": f"half {score_half}",
                      "layers": half_rank[pick_half][:TOP], **run.share(g, l_, gain_p / lost_p)})
    res["top5_cross_validated"] = cross
    run.log(f"{key}: top-{TOP} picked on one half, share won back on the other: "
            + ", ".join(f"{c['share']:.2f} {c['ci']}" for c in cross))

    # the proxy's top 5 in float (label-free choice)
    t, k = requantized(proxy_top)
    res["proxy"]["top5_in_float"] = {**run.value(t, k), "share": rnd((intervals.score(t)["map"] - intervals.score(int8)["map"]) / lost)}

    sp = res["split_half"]
    res["criteria"] = {
        "loss >= 3 points, CI > 0": res["loss_significant"],
        "split-half rho >= 0.7": sp["rho"] >= MIN_RHO,
        "top-5 share >= 0.5": top5["share"]["share"] >= MIN_TOP_SHARE,
        "top-5 beats random 5 (CI > 0)": res["random5"]["top5_minus_mean"]["ci"][0] > 0,
    }
    run.log(f"{key}: criteria {res['criteria']}")
    run.save()
    return res


# ----------------------------------------------------------------------------- lesson 7: QAT
def qat_step(run: Run, setting: Setting, method: str, spec: dict) -> dict:
    """One QAT run from the scanned PTQ model (the same calibration), evaluated with intervals every epoch."""
    args, key = run.args, f"{setting.name}/{method}"
    name = (f"{spec['loss']}-{spec['epochs']}x{spec['iters']}-lr{args.lr:g}-b{args.qat_batch_size}"
            + ("-learn-amax" if args.learn_amax else ""))
    folder = run.out / setting.name / method / f"qat-{name}"
    fp32 = run.fp32()
    int8_path = run.out / setting.name / method / "scan" / "int8.npz"
    student = run.calibrated(setting, method).requires_grad_(True)
    ptq_table = run.table(student, int8_path)  # the scan's INT8 model: the same calibration, the same numbers
    if spec["loss"] == "distill":
        loss = yqat.distillation_loss(run.fp32_model, student)
    else:
        loss = yqat.detection_loss(student, run.img_size)
    # lesson 7's training data: the training images, shuffled from the seed, no augmentation
    fit = create_dataloader(run.root, run.train_split, img_size=run.img_size, batch_size=args.qat_batch_size,
                            shuffle=True)
    last = folder / "last.pt"
    start = qat.load_state(last)["epoch"] if last.is_file() else 0
    epoch = [start]

    def score(model) -> dict:
        epoch[0] += 1
        path = folder / f"epoch{epoch[0]}.npz"
        t = run.table(model, path)
        return {"score": intervals.score(t)["map"]}

    config = qat.QATConfig(epochs=spec["epochs"], iters_per_epoch=spec["iters"], lr=args.lr,
                           learn_amax=args.learn_amax, seed=args.seed)
    t0 = time.perf_counter()
    out = qat.train(student, loss, fit, config, evaluate=score, out_dir=folder, resume=True,
                    save_model=lambda m, p: yptq.save_quantized(m, p, img_size=run.img_size), log=lambda s: None)
    wall = time.perf_counter() - t0
    ptq_key = str(int8_path)
    lost_s = run.samples("fp32", fp32) - run.samples(ptq_key, ptq_table)
    lost = intervals.score(fp32)["map"] - intervals.score(ptq_table)["map"]
    epochs = []
    for row in out["history"]:
        path = folder / f"epoch{row['epoch']}.npz"
        t = intervals.load_table(path)
        gained = run.samples(str(path), t) - run.samples(ptq_key, ptq_table)
        epochs.append({"epoch": row["epoch"], "steps": row["epoch"] * spec["iters"], "lr": row["lr"],
                       "train_s": row["seconds"], "eval_s": run.seconds(path), **run.value(t, str(path)),
                       "qat_minus_ptq": run.diff(t, str(path), ptq_table, ptq_key),
                       "fp32_minus_qat": run.diff(fp32, "fp32", t, str(path)),
                       "share": run.share(gained, lost_s, (intervals.score(t)["map"] - intervals.score(ptq_table)["map"]) / lost)})
    res = {"loss": spec["loss"], "epochs": spec["epochs"], "iters_per_epoch": spec["iters"], "lr": args.lr,
           "batch_size": args.qat_batch_size, "learn_amax": args.learn_amax, "ptq": run.value(ptq_table, ptq_key),
           "history": epochs, "best_epoch": out["best_epoch"], "wall_s_this_run": round(wall, 1),
           "train_s": rnd(sum(e["train_s"] for e in epochs), 1),
           "s_per_step": rnd(sum(e["train_s"] for e in epochs) / (spec["epochs"] * spec["iters"]), 2)}
    last_row, best_row = epochs[-1], epochs[out["best_epoch"] - 1]
    res["criteria"] = {"last epoch share >= 0.7": last_row["share"]["share"] >= MIN_QAT_SHARE,
                       "best epoch share >= 0.7 (epoch chosen on the val images)": best_row["share"]["share"] >= MIN_QAT_SHARE}
    run.entry("qat", f"{key}/{name}", res)
    run.log(f"{key} QAT {name}: " + ", ".join(f"ep{e['epoch']} {e['map']:.4f} share {e['share']['share']:.2f} "
                                               f"{e['share']['ci']}" for e in epochs)
            + f"; {res['s_per_step']:.2f} s/step")
    run.save()
    return res


# ----------------------------------------------------------------------------- the report
def fmt(row: dict, key: str = "map") -> str:
    return f"{row[key]:.4f} [{row['ci'][0]:.4f}, {row['ci'][1]:.4f}]"


def report(results: dict) -> str:
    lines = ["# Settings in which the course's effects are significant (issue 22)", "",
             f"Config: {json.dumps(results['config'])}. Intervals: 95 % bootstrap over the val images "
             "(the same draws for every model, so differences are paired).", ""]
    if results.get("fp32"):
        lines += [f"FP32 mAP@0.5:0.95 {fmt(results['fp32'])}", ""]
    if results["screen"]:
        lines += ["## Lesson 5: calibration methods", "",
                  "| setting | " + " | ".join(ptq.METHODS) + " | best hist. - max | item 2 | calib s |",
                  "|---|" + "---|" * (len(ptq.METHODS) + 3)]
        for name, s in results["screen"].items():
            cells = [f"{fmt(s['methods'][m])} ({s['methods'][m]['vs_fp32']['diff']:+.4f})" if m in s["methods"] else ""
                     for m in ptq.METHODS]
            gap = (f"{s['best_histogram']}: {fmt(s['best_minus_max'], 'diff')} | {'yes' if s['significant'] else 'no'}"
                   if "best_minus_max" in s else " | ")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {gap} | {s.get('calibrate_s', '')} |")
        lines.append("")
    if results["sensitivity"]:
        lines += ["## Lesson 6: sensitivity (one layer in float at a time, 250 images per evaluation)", "",
                  "| setting/method | INT8 | FP32 - INT8 | split-half rho (split 0; median, 5-95 % of "
                  f"{results['sensitivity'][next(iter(results['sensitivity']))].get('split_half', {}).get('splits', '')} splits) | "
                  f"rho {COURSE_SCAN_IMAGES} images vs rest | proxy rho | top-{TOP} share | top-{TOP} - random {TOP} | "
                  f"top-{TOP} share, picked on the other half | scan s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, s in results["sensitivity"].items():
            if "split_half" not in s:
                continue
            sp = s["split_half"]
            top5 = next((r for r in s.get("map_vs_k", []) if r["k"] == TOP), None)
            cells = [key, fmt(s["int8"]), fmt(s["loss"], "diff"),
                     f"{sp['rho']:.2f} ({sp['rho_median']:.2f}, {sp['rho_p05_p95'][0]:.2f}..{sp['rho_p05_p95'][1]:.2f})",
                     f"{s['split_64']['rho_median']:.2f}" if "split_64" in s else "",
                     f"{s['proxy']['spearman']}" if "proxy" in s else "",
                     fmt(top5["share"], "share") if top5 else "",
                     fmt(s["random5"]["top5_minus_mean"], "diff") if "random5" in s else "",
                     "; ".join(fmt(c, "share") for c in s.get("top5_cross_validated", [])),
                     f"{s['scan_s']:.0f} ({s['eval_s_mean']:.1f} per eval.)"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for key, s in results["sensitivity"].items():
        if "criteria" not in s:
            continue
        r5 = s["random5"]
        lines += [f"### {key}", "",
                  f"- calibration {s['calibrate_s']:.0f} s; top-k table {s['top_k_s']:.0f} s",
                  f"- top {TOP} by the scan (drop with its paired interval): "
                  + ", ".join(f"{t['layer']} {fmt(t, 'diff')}" for t in s["top"]),
                  f"- top {TOP} of the two halves: {s['split_half']['top5_halves']} ({s['split_half']['top5_overlap']} shared)",
                  f"- proxy (SQNR) top {TOP}: {s['proxy']['top5']} ({s['proxy']['top5_overlap']} shared with the scan's); "
                  f"in float: {fmt(s['proxy']['top5_in_float'])}, share {s['proxy']['top5_in_float']['share']:.2f}",
                  "", "| k in float | mAP | share of the loss won back | eval s |", "|---|---|---|---|",
                  f"| 0 | {fmt(s['int8'])} | 0 | |"]
        lines += [f"| {r['k']} | {fmt(r)} | {fmt(r['share'], 'share')} | {r['eval_s']} |" for r in s["map_vs_k"]]
        lines += ["", f"- top {TOP} - mean of {len(r5['draws'])} random {TOP} (seed {r5['seed']}): "
                  f"{fmt(r5['top5_minus_mean'], 'diff')}; per draw: "
                  + "; ".join(f"{fmt(d)} (top5 - it {fmt(d['top5_minus'], 'diff')})" for d in r5["draws"]),
                  "- top 5 picked on one half, share won back on the other: "
                  + "; ".join(f"{c['picked_on']} -> {c['scored_on']}: {fmt(c, 'share')}" for c in s["top5_cross_validated"]),
                  f"- criteria: {s['criteria']}", ""]
    grouped: Dict[str, Dict[str, dict]] = {}
    for full, r in results["qat"].items():  # "<setting>/<method>/<run>"
        key, name = full.rsplit("/", 1)
        grouped.setdefault(key, {})[name] = r
    for key, runs in grouped.items():
        lines += [f"## Lesson 7: QAT at {key}", "",
                  "| run | epoch | steps | mAP | QAT - PTQ | FP32 - QAT | share won back | train s | eval s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            for e in r["history"]:
                lines.append(f"| {name} | {e['epoch']} | {e['steps']} | {fmt(e)} | {fmt(e['qat_minus_ptq'], 'diff')} | "
                             f"{fmt(e['fp32_minus_qat'], 'diff')} | {fmt(e['share'], 'share')} | {e['train_s']:.0f} | "
                             f"{e['eval_s']} |")
        lines += [""] + [f"- {name}: PTQ {fmt(r['ptq'])}; best epoch {r['best_epoch']}; {r['s_per_step']} s per step; "
                         f"criteria {r['criteria']}" for name, r in runs.items()] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="settings the screen compares")
    p.add_argument("--methods", default=",".join(ptq.METHODS), help="calibration methods the screen compares")
    p.add_argument("--setting", type=parse_setting, default=parse_setting(DEFAULT_SETTING),
                   help="the setting of the sensitivity and QAT steps")
    p.add_argument("--method", choices=ptq.METHODS, default=DEFAULT_METHOD, help="amax method of those steps")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 32 training images")
    p.add_argument("--eval-batches", type=int, default=None, help="val batches of 32 (default: all 250 images)")
    p.add_argument("--scan-layers", type=int, default=None, help="scan only the first N layers (a quick check)")
    p.add_argument("--splits", type=int, default=50, help="random half/half splits for the rho distribution")
    p.add_argument("--random-draws", type=int, default=5, help="draws of 5 random layers")
    p.add_argument("--qat", type=parse_qat_runs, default=parse_qat_runs("detection:4x40,detection:4x80"),
                   help="QAT runs, e.g. detection:4x40,distill:2x20 (loss:epochs x steps per epoch)")
    p.add_argument("--lr", type=float, default=yqat.STRESS["lr"], help="QAT peak learning rate")
    p.add_argument("--learn-amax", action="store_true", help="QAT also trains the activation ranges")
    p.add_argument("--qat-batch-size", type=int, default=16)
    p.add_argument("--boot", type=int, default=1000, help="bootstrap draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 stays fast on a shared CPU)")
    p.add_argument("--out", default="runs/settings")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    candidates = [parse_setting(c) for c in args.candidates.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ptq.METHODS for m in methods):
        p.error(f"--methods must be some of {', '.join(ptq.METHODS)}, got {args.methods!r}")
    if args.scan_layers is not None and args.scan_layers <= max(TOP_KS[:-1]):
        p.error(f"--scan-layers must be at least {max(TOP_KS[:-1]) + 1}: the top-{TOP} needs more layers than {TOP}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    run = Run(args)
    run.fp32()
    run.log(f"FP32 mAP {fmt(run.results['fp32'])}")
    for step in steps:
        t0 = time.perf_counter()
        if step == "screen":
            for setting in candidates:
                screen(run, setting, methods)
        elif step == "sensitivity":
            sensitivity_step(run, args.setting, args.method)
        elif step == "qat":
            for spec in args.qat:
                qat_step(run, args.setting, args.method, spec)
        run.log(f"step {step} took {time.perf_counter() - t0:.0f} s")
    text = report(run.results)
    (run.out / "report.md").write_text(text + "\n")
    print(text)
    run.log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
