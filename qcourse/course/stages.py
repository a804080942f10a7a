"""The YOLOv7 stages of ``qcourse course``: lessons 5-8 on one model, each one call of the package.

``qcourse course`` reproduces the course's numbers stage by stage (:mod:`qcourse.course.run`
decides which stages run, caches and times them; :mod:`qcourse.course.report` writes the
report). The stages here are the application's own runs, with the course's fast settings:

* :func:`baseline` — FP32 mAP (:func:`qcourse.yolo.evaluate.evaluate`);
* :func:`ptq` — lesson 5, every calibration method (:func:`qcourse.yolo.ptq.run_ptq`);
* :func:`sensitivity` — lesson 6 at its stress setting (:data:`qcourse.yolo.ptq.SENSITIVITY_STRESS`,
  calibrated here from the FP32 weights), a scan on an evaluation subset, re-quantization with
  the top-k layers in float, and the tests of the ranking: split-half stability, top 5 vs
  random 5 (:func:`qcourse.yolo.sensitivity.run_sensitivity`);
* :func:`qat` — lesson 7, QAT (:data:`QAT_BUDGET`) at W8A8 (from the PTQ checkpoint) and at
  lesson 7's stress setting :data:`qcourse.yolo.qat.STRESS` (:func:`qcourse.yolo.qat.run_qat`);
* :func:`export` — the FP32, PTQ and QAT models as ONNX (:func:`qcourse.export.export_onnx`);
* :func:`engines` — lesson 8: ONNX Runtime engines (TensorRT's instead with ``--device cuda`` where
  it is installed), their latency, throughput and mAP (:mod:`qcourse.engines`).

Every mAP a stage measures carries its 95 % bootstrap interval over the evaluated images, and
every comparison the report makes (each PTQ method vs FP32, each engine vs the FP32 model, the
INT8 engines vs the reference engine) the paired interval of the difference
(:mod:`qcourse.yolo.intervals`, :data:`BOOTSTRAP`): the evaluations keep their per-image match
tables as ``.npz`` files in the stage folder, and the intervals are computed from those, the
model is not run again.

Each takes a :class:`StageContext` and returns its results as JSON-able data. With ``weights``
and ``coco`` (``qcourse course --weights yolov7.pt --coco PATH``) the same functions run on
real YOLOv7 and COCO.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

__all__ = ["STAGE_NAMES", "CourseConfig", "StageContext", "RECIPE_METHOD", "EVAL_BATCH", "SENSITIVITY_KS",
           "BENCH_BATCHES", "QAT_BUDGET", "BOOTSTRAP", "FP32_TABLE", "model_inputs", "qat_runs",
           "check_model_fits_data", "baseline", "ptq", "ptq_intervals", "sensitivity", "qat", "export", "engines",
           "engine_intervals"]

# This module imports nothing heavy at the top: the ``qcourse`` command reads STAGE_NAMES and
# CourseConfig for its --help, which must not wait for torch.

#: the stages of ``qcourse course`` in the order they run (:data:`qcourse.course.run.STAGES`)
STAGE_NAMES = ("demo", "baseline", "ptq", "sensitivity", "qat", "export", "engines", "notebooks")

#: NVIDIA's recipe (histogram calibration, amax by mse): the PTQ checkpoint the later stages start from
RECIPE_METHOD = "mse"
#: images per evaluation batch, everywhere (``run_qat`` evaluates in batches of 32): so
#: ``eval_batches`` means the same images in every stage
EVAL_BATCH = 32
#: k of the "top-k layers in float" table
SENSITIVITY_KS = (0, 1, 3, 5, 10)
#: batch sizes of the engine benchmark
BENCH_BATCHES = (1, 8)
#: the course run's QAT budgets (``--qat-epochs`` / ``--qat-iters`` set both runs'): W8A8, where PTQ loses
#: nothing measurable, briefly; the stress run as lesson 7 trains it (half of ``STRESS``'s steps), where
#: QAT wins back about 70 % of PTQ's loss (0.71 [0.64, 0.78] in lesson 7; 20 steps won back 0.44)
QAT_BUDGET = {"w8a8": {"epochs": 2, "iters_per_epoch": 10}, "stress": {"epochs": 4, "iters_per_epoch": 20}}
#: the bootstrap behind every interval (:mod:`qcourse.yolo.intervals`): 1000 resamples of the evaluated
#: images drawn from a fixed seed, so a rerun gives the same intervals; 95 % percentile intervals
BOOTSTRAP = {"n": 1000, "seed": 0, "level": 0.95}
#: the FP32 model's match table, in the baseline's and the PTQ stage's folders
FP32_TABLE = "fp32.npz"


@dataclass(frozen=True)
class CourseConfig:
    """One ``qcourse course`` run (the command fills it from its options).

    ``weights`` / ``coco``: YOLOv7 checkpoint and COCO root (None: the embedded default and the
    synthetic dataset). ``eval_batches``: evaluate on the first N val batches of 32 (None: all).
    ``calib_batches``: calibration batches. ``scan_batches`` / ``scan_layers``: the sensitivity
    scan's evaluation subset and how many layers it scans (None: all). ``qat_epochs`` /
    ``qat_iters``: QAT budget (None: :data:`QAT_BUDGET`).
    ``only`` / ``skip``: stage names. ``echo``: where progress lines go.
    """

    out: Path = Path("runs/course")
    weights: Optional[Path] = None
    coco: Optional[Path] = None
    device: str = "cpu"
    img_size: Optional[int] = None
    eval_batches: Optional[int] = None
    calib_batches: int = 4
    scan_batches: int = 2
    scan_layers: Optional[int] = None
    qat_epochs: Optional[int] = None
    qat_iters: Optional[int] = None
    bench_iterations: int = 20
    notebooks: Optional[Path] = None
    timeout: int = 600
    seed: int = 0
    fresh: bool = False
    only: Optional[str] = None
    skip: Tuple[str, ...] = ()
    progress: bool = False
    echo: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self):
        from qcourse.utils import is_int

        for name in ("calib_batches", "scan_batches", "bench_iterations", "timeout"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name, low in (("eval_batches", 1), ("scan_layers", 3), ("qat_epochs", 1), ("qat_iters", 1),
                          ("img_size", 32)):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < low):
                raise ValueError(f"{name} must be a whole number >= {low} or None, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")

    def settings(self) -> dict:
        """The settings as plain data (for results.json and the report)."""
        skip = ("echo", "progress")
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items() if k not in skip}


@dataclass
class StageContext:
    """What a stage gets: the settings, its own folder, the results of the stages it needs, a log,
    and its inputs as fingerprinted (``inputs["code"]``: the hash of qcourse's code this run uses)."""

    config: CourseConfig
    folder: Path
    prior: Dict[str, dict]
    log: Callable[[str], None]
    inputs: Dict[str, object] = field(default_factory=dict)

    def folder_of(self, stage: str) -> Path:
        return Path(self.config.out) / stage


# ----------------------------------------------------------------------------- what defines the results
def model_inputs(config: CourseConfig) -> dict:
    """The model and data a run uses, by content where it is cheap (for the stages' fingerprints)."""
    from qcourse.utils import file_sha256
    from qcourse.yolo import default_checkpoint
    from qcourse.yolo.datasets import DEFAULT_PARAMS

    weights = Path(config.weights) if config.weights else default_checkpoint()
    if config.coco:
        annotations = Path(config.coco) / "annotations"
        files = sorted(annotations.glob("instances_*.json")) if annotations.is_dir() else []
        data = {"coco": str(Path(config.coco).resolve()), "annotations": {f.name: f.stat().st_size for f in files}}
    else:
        data = {"synthetic": dict(DEFAULT_PARAMS)}
    return {"weights": str(config.weights) if config.weights else "embedded default",
            "weights_sha256": file_sha256(weights), "data": data, "img_size": config.img_size,
            "device": config.device}


def qat_runs(config: CourseConfig) -> Dict[str, dict]:
    """The two QAT runs, lesson 7's settings (:data:`~qcourse.yolo.qat.STRESS`: loss, lr, stress bits) at
    W8A8 and at the stress bits, each with its :data:`QAT_BUDGET` (or the ``qat_epochs`` / ``qat_iters`` given)."""
    from qcourse.yolo.qat import STRESS

    def budget(run: str) -> dict:
        return {"epochs": config.qat_epochs or QAT_BUDGET[run]["epochs"],
                "iters_per_epoch": config.qat_iters or QAT_BUDGET[run]["iters_per_epoch"]}

    return {"w8a8": {**STRESS, "w_bits": 8, "a_bits": 8, **budget("w8a8")}, "stress": {**STRESS, **budget("stress")}}


def _data(config: CourseConfig):
    """``(root, train split, val split)``: COCO's train2017/val2017, or the synthetic train/val."""
    from qcourse.yolo.datasets import dataset_splits

    return dataset_splits(config.coco, config.progress)


def _img_size(config: CourseConfig, model) -> int:
    return config.img_size or int(model.meta.get("img_size", 640))


def _val_loader(config: CourseConfig, img_size: int):
    """``(root, loader)``: the val split in batches of :data:`EVAL_BATCH`, in file order."""
    from qcourse.yolo.datasets import create_dataloader

    root, _, val = _data(config)
    return root, create_dataloader(root, val, img_size=img_size, batch_size=EVAL_BATCH)


def _row(result: dict) -> dict:
    """The numbers of an evaluation the report shows, rounded as ``run_ptq`` rounds them."""
    return {"map": round(float(result["map"]), 4), "map50": round(float(result["map50"]), 4),
            "images": int(result["images"])}


def _resampled(table):
    """A match table (or the ``.npz`` file of one) with its :data:`BOOTSTRAP` scores, computed once."""
    from qcourse.yolo.intervals import Resampled, load_table

    if isinstance(table, Path):
        table = load_table(table)
    return Resampled(table, n=BOOTSTRAP["n"], seed=BOOTSTRAP["seed"])


def _interval(scores) -> list:
    """The 95 % bootstrap interval ``[lo, hi]`` of a table's mAP@0.5:0.95."""
    return scores.bootstrap(BOOTSTRAP["level"])["interval"]


def _paired(a, b) -> dict:
    """``{"diff", "interval"}``: mAP(a) - mAP(b) on the same images and its paired 95 % interval."""
    d = a.minus(b, BOOTSTRAP["level"])
    return {"diff": d["diff"], "interval": d["interval"]}


def check_model_fits_data(config: CourseConfig) -> None:
    """Refuse weights whose classes do not match the dataset's, before any stage runs."""
    from qcourse.yolo.ptq import load_float_model

    model = load_float_model(config.weights)
    dataset = _val_loader(config, _img_size(config, model))[1].dataset
    if model.nc != dataset.nc:
        weights = config.weights or "the embedded default"
        data = config.coco or "the synthetic dataset"
        raise ValueError(f"--weights {weights} predicts {model.nc} classes but {data} has {dataset.nc} "
                         "categories; pass weights trained for that dataset (yolov7.pt with --coco, or none for "
                         "the embedded default)")


# ----------------------------------------------------------------------------- the stages
def baseline(ctx: StageContext) -> dict:
    """FP32 mAP of the fused model on the val split (or its first ``eval_batches`` batches), with its interval.

    The match table is kept as :data:`FP32_TABLE`.
    """
    from qcourse.yolo.evaluate import evaluate
    from qcourse.yolo.intervals import save_table
    from qcourse.yolo.ptq import load_float_model

    config = ctx.config
    model = load_float_model(config.weights).to(config.device)
    img_size = _img_size(config, model)
    root, loader = _val_loader(config, img_size)
    r = evaluate(model, loader, device=config.device, progress=config.progress, max_batches=config.eval_batches,
                 matches=True)
    save_table(ctx.folder / FP32_TABLE, r["matches"])
    interval = _interval(_resampled(r["matches"]))
    ctx.log(f"FP32 mAP@0.5:0.95 {r['map']:.4f} [{interval[0]:.4f}, {interval[1]:.4f}], mAP@0.5 {r['map50']:.4f} "
            f"on {r['images']} images")
    return {"weights": str(config.weights) if config.weights else "embedded default", "arch": model.arch,
            "classes": model.nc, "parameters": sum(p.numel() for p in model.parameters()),
            "data": str(root),
            "img_size": img_size, "eval_batches": config.eval_batches, "bootstrap": dict(BOOTSTRAP),
            "fp32": {**_row(r), "interval": interval, "matches": FP32_TABLE,
                     "model_ms_per_image": round(float(r["model_ms_per_image"]), 2)}}


def ptq(ctx: StageContext) -> dict:
    """Lesson 5: FP32 vs each calibration method; ``int8_<method>.pt`` / ``.onnx`` / ``.npz`` in the stage folder.

    Each mAP gets its interval, each method its paired difference to FP32 (``vs_fp32``: method
    minus FP32, from this stage's own FP32 evaluation: the same model on the same images as the
    baseline's), and ``best_histogram_vs_max`` the best histogram method minus max.

    Then lesson 5's stress setting (:data:`qcourse.yolo.ptq.METHOD_STRESS`, W8pcA6), where the
    method decides on the embedded default: every method again, from one calibration on the same
    calibration batches, evaluated on the same images; the tables in ``stress/<method>.npz``, the
    results ``stress`` (each method's mAP, interval and ``vs_fp32``) and ``method_gap`` (the best
    histogram method minus max there, paired).
    """
    from qcourse.yolo.ptq import PTQConfig, run_ptq

    c = ctx.config
    res = run_ptq(PTQConfig(weights=c.weights, coco=c.coco, img_size=c.img_size, batch_size=EVAL_BATCH,
                            calib_batches=c.calib_batches, eval_batches=c.eval_batches, device=c.device,
                            out=ctx.folder, progress=c.progress, log=ctx.log, matches=True))
    res["stress"] = _stress_screen(ctx, res["img_size"])
    return ptq_intervals(res, ctx.folder, ctx.log)


def ptq_intervals(res: dict, folder: Path, log: Callable[[str], None] = lambda line: None) -> dict:
    """Add to ``run_ptq``'s results (made with ``matches=True`` in ``folder``) the intervals :func:`ptq` records.

    Each row gets ``interval``, each method ``vs_fp32`` (method minus FP32, paired), and the
    results ``best_histogram_vs_max`` (the best histogram method minus max) and ``bootstrap``;
    with a ``stress`` entry (:func:`ptq`'s screen at the stress setting), its methods get the same
    and the results ``method_gap``.
    """
    fp32 = _resampled(Path(folder) / res["fp32"]["matches"])
    res["fp32"]["interval"] = _interval(fp32)
    found = _best_minus_max(_method_intervals(res["int8"], Path(folder), fp32, log))
    if found:
        res["best_histogram_vs_max"] = {"best": found[0], **found[1]}
    if res.get("stress"):
        _stress_intervals(res, Path(folder), fp32, log)
    res["bootstrap"] = dict(BOOTSTRAP)
    return res


def _method_intervals(rows: Dict[str, dict], folder: Path, fp32, log: Callable[[str], None], label: str = "") -> dict:
    """Give each method's row (its table in ``folder / row["matches"]``) its ``interval`` and ``vs_fp32`` (the
    method minus ``fp32``'s scores, paired), log it; returns the methods' resampled scores."""
    scores = {}
    for method, row in rows.items():
        scores[method] = _resampled(folder / row["matches"])
        row["interval"], row["vs_fp32"] = _interval(scores[method]), _paired(scores[method], fp32)
        lo, hi = row["vs_fp32"]["interval"]
        log(f"  {label}{method:10s} mAP@0.5:0.95 {row['map']:.4f} [{row['interval'][0]:.4f}, "
            f"{row['interval'][1]:.4f}], minus FP32 {row['vs_fp32']['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    return scores


def _best_minus_max(scores: dict) -> Optional[Tuple[str, dict]]:
    """``(best, {"diff", "interval"})``: the best histogram method (highest mAP) minus max, paired; None
    without max or without a histogram method."""
    histogram = [m for m in scores if m != "max"]
    if "max" not in scores or not histogram:
        return None
    best = max(histogram, key=lambda m: scores[m].value)
    return best, _paired(scores[best], scores["max"])


#: the PTQ stage's subfolder for the stress screen's match tables
_STRESS_FOLDER = "stress"


def _stress_screen(ctx: StageContext, img_size: int) -> dict:
    """``{"setting", "methods"}``: every method at :data:`~qcourse.yolo.ptq.METHOD_STRESS`, calibrated once on
    the W8A8 run's calibration batches, evaluated on its images; the tables in ``stress/<method>.npz``."""
    from qcourse.yolo.ptq import METHOD_STRESS, load_float_model, loaders, method_screen

    c = ctx.config
    _, calib, val = loaders(c.coco, EVAL_BATCH, img_size, c.progress)
    ctx.log(f"stress setting {METHOD_STRESS.name} (8-bit per-channel weights, 6-bit activations)")
    rows = method_screen(load_float_model(c.weights), METHOD_STRESS, calib, c.calib_batches, val,
                         eval_batches=c.eval_batches, device=c.device, out=ctx.folder / _STRESS_FOLDER,
                         progress=c.progress)
    methods = {m: {k: v for k, v in row.items() if k != "table"} for m, row in rows.items()}
    for row in methods.values():
        row["matches"] = f"{_STRESS_FOLDER}/{row['matches']}"
    return {"setting": METHOD_STRESS.as_dict(), "methods": methods}


def _stress_intervals(res: dict, folder: Path, fp32, log: Callable[[str], None]) -> None:
    """The stress methods' intervals and ``vs_fp32`` (against ``fp32``'s scores), and ``method_gap``: the best
    histogram method (highest mAP) minus max at the stress setting, with its paired interval."""
    stress, name = res["stress"], res["stress"]["setting"]["name"]
    found = _best_minus_max(_method_intervals(stress["methods"], folder, fp32, log, f"{name} "))
    if found:
        best, gap = found
        res["method_gap"] = {"setting": name, "best_method": best, "gap": gap["diff"], "interval": gap["interval"]}
        lo, hi = gap["interval"]
        log(f"  {name} {best} minus max {gap['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            f"{' (within noise)' if lo <= 0 <= hi else ''}")


def _recipe_checkpoint(ctx: StageContext) -> Path:
    return ctx.folder_of("ptq") / f"int8_{RECIPE_METHOD}.pt"


def sensitivity(ctx: StageContext) -> dict:
    """Lesson 6 at its stress setting: scan on ``scan_batches`` val batches, top-k in float, the ranking tested.

    At W8A8 the embedded default loses under a point of mAP and a scan ranks noise, so the stage
    calibrates its own model from the FP32 weights at :data:`qcourse.yolo.ptq.SENSITIVITY_STRESS`
    (``calib_batches``), not the PTQ stage's W8A8 checkpoint. Every evaluation keeps its match
    table (``tables/``): FP32, INT8 and each top-k row get :data:`BOOTSTRAP` intervals, the loss a
    paired one; ``split_half_rho``, ``topk`` (the share of the loss the top 5 win back, and top 5
    vs random 5), ``criteria`` and ``holds`` say whether the ranking may be called "the most
    sensitive layers". An interrupted scan resumes from ``sensitivity.json`` (same inputs: the
    stage folder is emptied when they change).
    """
    from qcourse.yolo.ptq import SENSITIVITY_STRESS
    from qcourse.yolo.sensitivity import SensitivityConfig, run_sensitivity

    c = ctx.config
    res = run_sensitivity(SensitivityConfig(weights=c.weights, setting=SENSITIVITY_STRESS, coco=c.coco,
                                            img_size=c.img_size, batch_size=EVAL_BATCH,
                                            calib_batches=c.calib_batches, eval_batches=c.scan_batches,
                                            max_layers=c.scan_layers, ks=SENSITIVITY_KS, device=c.device,
                                            seed=c.seed, boot=BOOTSTRAP["n"], out=ctx.folder, progress=c.progress,
                                            log=ctx.log))
    return res  # its intervals: BOOTSTRAP's n, seed 0 and 95 %, as everywhere in the course


def qat(ctx: StageContext) -> dict:
    """Lesson 7, twice: W8A8 from the PTQ stage's checkpoint, and lesson 7's stress bits calibrated here.

    Each run has its own folder (``w8a8/``, ``stress/``); a finished one is kept when the stage
    reruns after an interruption, an interrupted one resumes from its ``last.pt``. Each run's
    results carry every mAP's interval, QAT minus PTQ and FP32 minus QAT (paired) and the share
    of PTQ's loss won back (``run_qat``, from the match tables it keeps in its folder); the stage's
    ``recovered_share`` is the stress run's, named by its setting and its number of steps.
    """
    from qcourse.utils import is_owned
    from qcourse.yolo.qat import YoloQATConfig, run_qat

    c = ctx.config
    runs = {}
    for name, settings in qat_runs(c).items():
        folder = ctx.folder / name
        done = folder / "results.json"
        if done.exists() and not is_owned(done):
            raise ValueError(f"{done} was changed after qcourse wrote it (or qcourse did not write it), so that QAT "
                             "run cannot be kept; move it away (or restore it) and rerun: the run then resumes")
        if done.is_file():  # run_qat writes it last: that run finished
            runs[name] = json.loads(done.read_text())
            ctx.log(f"{name}: finished earlier, kept")
            continue
        eight_bit = (settings["w_bits"], settings["a_bits"]) == (8, 8)
        ctx.log(f"{name}: QAT W{settings['w_bits']}A{settings['a_bits']}, {settings['epochs']} epochs x "
                f"{settings['iters_per_epoch']} steps")
        runs[name] = run_qat(YoloQATConfig(**settings, weights=c.weights,
                                           calibrated=_recipe_checkpoint(ctx) if eight_bit else None,
                                           coco=c.coco, img_size=c.img_size, calib_batches=c.calib_batches,
                                           eval_batches=c.eval_batches, device=c.device, out=folder, resume=True,
                                           seed=c.seed, progress=c.progress, log=ctx.log))
    return {"runs": runs, "recovered_share": _qat_share(runs, "stress"), "bootstrap": dict(BOOTSTRAP)}


def _qat_share(runs: Dict[str, dict], name: str) -> dict:
    """``{"run", "setting", "share", "interval", "steps"}``: the share of PTQ's loss run ``name`` won back.

    ``setting`` is named as :class:`qcourse.yolo.ptq.Setting` names it (``run_qat`` quantizes the
    weights per channel); ``share`` and ``interval`` are None, with ``reason``, where PTQ's loss
    there is within noise.
    """
    from qcourse.yolo.ptq import Setting

    res, s = runs[name], runs[name]["settings"]
    found = res.get("recovered_share")
    out = {"run": name, "setting": Setting(w_bits=s["w_bits"], per_channel=True, a_bits=s["a_bits"]).name,
           "share": found["share"] if found else None, "interval": found["interval"] if found else None,
           "steps": s["epochs"] * s["iters_per_epoch"]}
    if not found:
        out["reason"] = res.get("recovered_share_reason")
    return out


def export(ctx: StageContext) -> dict:
    """FP32, PTQ (the recipe's checkpoint) and QAT (W8A8 best) as ONNX, Q/DQ checked against TensorRT's rules."""
    import torch

    from qcourse import ptq as ptq_rules
    from qcourse.export import export_onnx
    from qcourse.yolo.ptq import load_float_model, load_quantized

    c = ctx.config
    fp32 = load_float_model(c.weights)
    img_size = _img_size(c, fp32)
    sources = {"fp32": c.weights or "embedded default", "ptq_int8": _recipe_checkpoint(ctx),
               "qat_int8": ctx.folder_of("qat") / "w8a8" / "best.pt"}
    example = torch.zeros(1, 3, img_size, img_size)
    paths = {}
    for name, source in sources.items():
        model = fp32 if name == "fp32" else load_quantized(source)
        paths[name] = export_onnx(model.eval(), example, ctx.folder / f"{name}.onnx")
        ctx.log(f"exported {source} to {paths[name]}")
    problems = {name: ptq_rules.check_qdq_placement(p) for name, p in paths.items() if name != "fp32"}
    return {"img_size": img_size, "files": {name: p.name for name, p in paths.items()},
            "sources": {name: str(s) for name, s in sources.items()}, "graphs": ptq_rules.compare_graphs(paths),
            "placement_problems": {name: len(p) for name, p in problems.items()}}


def _engine_specs(device: str):
    """``(label, ONNX file, backend, precision, engine file)`` of the engines to compare, the reference first.

    TensorRT's (FP16 as the reference, as NVIDIA compares) with ``--device cuda`` where TensorRT is
    installed; ONNX Runtime's on the CPU otherwise.
    """
    from qcourse.engines import available_backends

    if device.startswith("cuda") and available_backends()["tensorrt"][0]:
        return [("TRT fp16", "fp32.onnx", "tensorrt", "fp16", "trt_fp16.engine"),
                ("TRT int8 PTQ", "ptq_int8.onnx", "tensorrt", "int8", "trt_int8_ptq.engine"),
                ("TRT int8 QAT", "qat_int8.onnx", "tensorrt", "int8", "trt_int8_qat.engine")]
    return [("ORT fp32", "fp32.onnx", "onnxruntime", "fp32", "ort_fp32.onnx"),
            ("ORT int8 PTQ", "ptq_int8.onnx", "onnxruntime", "int8", "ort_int8_ptq.onnx"),
            ("ORT int8 QAT", "qat_int8.onnx", "onnxruntime", "int8", "ort_int8_qat.onnx")]


def engines(ctx: StageContext) -> dict:
    """Lesson 8: build an engine from each exported file, time it at :data:`BENCH_BATCHES`, score its detections.

    Each engine's mAP gets its interval and paired differences: ``vs_fp32_model``, the engine
    minus the PyTorch FP32 model (the PTQ stage's :data:`FP32_TABLE`), and for the other engines
    ``vs_reference``, the engine minus the reference engine; the match tables are kept as
    ``<engine file stem>.npz``.
    """
    import torch

    from qcourse.engines import build_engine
    from qcourse.engines.bench import benchmark, machine_line
    from qcourse.yolo.engines import evaluate_engine
    from qcourse.yolo.intervals import load_table, save_table

    c = ctx.config
    fp32_table = load_table(ctx.folder_of("ptq") / FP32_TABLE)  # the PyTorch FP32 model's, on the same images
    threads = torch.get_num_threads()
    exported = ctx.folder_of("export")
    built, described = {}, {}
    root, train, val = _data(c)
    calib = None  # train images for the Convs before the float head (lesson 8), loaded once
    for label, source, backend, precision, file in _engine_specs(c.device):
        calibration = None
        if backend == "onnxruntime" and precision == "int8":
            if calib is None:
                from qcourse.engines.base import onnx_input_shape
                from qcourse.export import load_onnx
                from qcourse.yolo.engines import calibration_batches

                size = onnx_input_shape(load_onnx(exported / source))[2]
                calib = calibration_batches(img_size=size, batches=c.calib_batches, root=root, split=train)
            calibration = calib
        built[label] = build_engine(exported / source, ctx.folder / file, backend=backend, precision=precision,
                                    threads=threads, calibration=calibration,
                                    device=c.device if backend == "tensorrt" else None)
        described[label] = {"file": file, "source": source, "backend": backend, "precision": precision,
                            **{k: v for k, v in getattr(built[label], "info", {}).items() if k != "source"}}
        ctx.log(f"built {built[label].describe()}")
    shape = next(iter(built.values())).image_shape
    timing = benchmark(built, BENCH_BATCHES, c.bench_iterations, warmup=min(3, c.bench_iterations), shape=shape)
    maps = {}
    for label, engine in built.items():
        r = evaluate_engine(engine, root=root, split=val, max_batches=c.eval_batches, matches=True)
        maps[label] = {**_row(r), "matches": f"{Path(described[label]['file']).stem}.npz"}
        save_table(ctx.folder / maps[label]["matches"], r["matches"])
    res = {"machine": machine_line() + f", {threads} threads", "threads": threads, "batches": list(BENCH_BATCHES),
           "iterations": c.bench_iterations, "reference": next(iter(built)), "engines": described, "timing": timing,
           "map": maps}
    return engine_intervals(res, ctx.folder, fp32_table, ctx.log)


def engine_intervals(res: dict, folder: Path, fp32_table, log: Callable[[str], None] = lambda line: None) -> dict:
    """Add to the engines' results (their match tables in ``folder``) the intervals :func:`engines` records.

    Each engine's row gets ``interval``, ``vs_fp32_model`` (the engine minus the FP32 model of
    ``fp32_table``, paired) and, but the reference, ``vs_reference``; the results ``fp32_model``
    and ``bootstrap``.
    """
    fp32_model = _resampled(fp32_table)
    scores = {label: _resampled(Path(folder) / row["matches"]) for label, row in res["map"].items()}
    for label, row in res["map"].items():
        row["interval"], row["vs_fp32_model"] = _interval(scores[label]), _paired(scores[label], fp32_model)
        if label != res["reference"]:
            row["vs_reference"] = _paired(scores[label], scores[res["reference"]])
        log(f"{label}: mAP@0.5:0.95 {row['map']:.4f} [{row['interval'][0]:.4f}, {row['interval'][1]:.4f}]")
    res["fp32_model"] = {"map": round(fp32_model.value, 4), "interval": _interval(fp32_model),
                         "matches": f"ptq/{FP32_TABLE}"}
    res["bootstrap"] = dict(BOOTSTRAP)
    return res
