"""The course's report: ``OUT/report.md``, a self-contained ``OUT/report.html`` and ``OUT/results.json``.

:func:`write_report` takes what :func:`qcourse.course.run.run_course` collected (the settings,
the machine, each stage's status, time and results) and writes

* ``results.json`` — all of it, as data;
* ``plots/*.png`` — the lessons' own figures (:mod:`qcourse.course.plots`) of this run;
* ``report.md`` and ``report.html`` — the same document (built once as a list of blocks, then
  rendered twice): the machine and versions, the stages and their times, mAP per variant,
  the sensitivity top-10, latency / throughput / mAP per engine, the figures, and the course's
  and NVIDIA's published figures beside the measured ones. The HTML page inlines its CSS and
  its figures (base64 PNG), so it is one file to open or send.

Each mAP the stages measured shows its 95 % bootstrap interval over the images, each
comparison its paired interval (:mod:`qcourse.yolo.intervals`; the stages compute them from
their match tables), and each published claim with a measured counterpart a verdict
(:func:`claims`, also in ``results.json``): reproduced, not reproduced, or within noise.

The table builders (:func:`map_table`, :func:`sensitivity_table`, :func:`engine_table`, ...)
return ``(header, rows)`` of formatted strings; both renderings use them.
"""
from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from qcourse.utils import atomic_write, check_writable

__all__ = ["PUBLISHED", "write_report", "report_paths", "save_figure", "machine_info", "report_blocks", "to_markdown",
           "to_html", "stage_table", "map_table", "sensitivity_table", "engine_table", "engine_map_table",
           "published_table", "claims", "notebook_table", "effects_table", "summary"]

Table = Tuple[List[str], List[List[str]]]

#: figures published by the course (the seeds' blog notes and video) and by NVIDIA, copied as
#: they were published: YOLOv7 on COCO val2017 at 640 px, not measured by this run
PUBLISHED = {
    "yolov7_fp32": {"value": "mAP@0.5:0.95 0.512, mAP@0.5 0.697", "source": "YOLOv7 (WongKinYiu/yolov7), yolov7.pt"},
    "ptq_histogram_loss": {"value": "about 0.003 mAP lost", "source": "the course, histogram-calibrated PTQ",
                           "diff": 0.003},  # FP32 minus histogram PTQ
    "ptq_max": {"value": "mAP 0.444 (vs histogram about 0.509: max loses about 6.5 points more)",
                "source": "the course, max calibration", "diff": 0.065},  # histogram PTQ minus max
    "tied_groups": {"value": "20 tied groups", "source": "the course, NVIDIA's placement rules on yolov7.pt"},
    "trt": {"source": "NVIDIA-AI-IOT/yolo_deepstream yolov7_qat, Orin-X, 640 px",
            "rows": [("TensorRT FP16", 0.5124, 140),
                     ("TensorRT INT8, implicit PTQ (TensorRT's built-in EntropyCalibratorV2, no Q/DQ)", 0.4573, 207),
                     ("TensorRT INT8, QAT (explicit Q/DQ)", 0.5113, 207)]},
    "pytorch": {"source": "NVIDIA-AI-IOT/yolo_deepstream yolov7_qat, PyTorch fake quantization, 640 px",
                "rows": [("PyTorch FP16", 0.5120), ("PyTorch PTQ INT8, histogram (MSE) calibration", 0.5100),
                         ("PyTorch QAT INT8, histogram (MSE) calibration", 0.5111)]},
    "placement_qat_fps": {"value": "QAT engine 180 -> 207 fps", "source": "NVIDIA yolov7_qat, Q/DQ placement rules"},
}
_NOT_MEASURED = "published, not measured here"


# ----------------------------------------------------------------------------- machine
def machine_info(device: str = "cpu") -> Dict[str, str]:
    """The machine and the versions that made the numbers."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    from qcourse import __version__
    from qcourse.engines import available_backends
    from qcourse.engines.bench import machine_line

    info = {"machine": machine_line(), "platform": platform.platform(), "python": platform.python_version(),
            "qcourse": __version__, "torch": torch.__version__, "torch threads": str(torch.get_num_threads()),
            "numpy": numpy.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(torch.device(device))
    usable, why = available_backends()["tensorrt"]
    info["TensorRT"] = why  # a version, or why it is not usable here
    return info


# ----------------------------------------------------------------------------- tables
def _f4(x) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def _map_cell(row: Optional[dict]) -> str:
    """``0.6974 [0.6807, 0.7181]``: a mAP and its 95 % interval (the value alone where it has none)."""
    if not row or row.get("map") is None:
        return "-"
    iv = row.get("interval")
    return _f4(row["map"]) + ("" if iv is None else f" [{iv[0]:.4f}, {iv[1]:.4f}]")


def _reading(interval: Sequence[float]) -> str:
    """What a difference's interval says: "higher" or "lower" where it excludes 0, else "within noise"."""
    from qcourse.yolo.intervals import verdict

    return {"reproduced": "higher", "not reproduced": "lower", "within noise": "within noise"}[verdict(1.0, interval)]


def _diff_cell(d: Optional[dict]) -> str:
    """``-0.35 [-0.80, +0.10] within noise``: a paired difference in points of mAP, its interval and what
    the interval says."""
    if not d:
        return "-"
    lo, hi = d["interval"]
    return f"{100 * d['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] {_reading(d['interval'])}"


def _results(data: dict, stage: str) -> Optional[dict]:
    return (data["stages"].get(stage) or {}).get("results")


def stage_table(data: dict) -> Table:
    """One row per stage: what it does, its status in this run, how long it took when it ran."""
    rows = []
    for name, st in data["stages"].items():
        took = "-" if st["seconds"] is None else f"{st['seconds']:.1f}"
        rows.append([name, st["title"], st["status"], took, st["finished"] or "-"])
    return ["stage", "what", "this run", "seconds (when it ran)", "finished"], rows


def _stage_total(data: dict) -> float:
    return sum(st["seconds"] or 0.0 for st in data["stages"].values())


def map_table(data: dict) -> Table:
    """mAP per variant: FP32, PTQ per method, QAT, and the re-quantized top-k models (on the scan subset)."""
    rows: List[List[str]] = []
    base = _results(data, "baseline")
    fp32 = base["fp32"]["map"] if base else None

    def add(variant, row, stage, ref=fp32, images=None):
        if row.get("vs_fp32"):
            delta = _diff_cell(row["vs_fp32"])
        else:
            delta = "-" if ref is None else f"{100 * (row['map'] - ref):+.2f}"
        rows.append([variant, _map_cell(row), _f4(row.get("map50")), delta,
                     str(images if images is not None else row.get("images", "-")), stage])

    if base:
        add("FP32", base["fp32"], "baseline")
    ptq = _results(data, "ptq")
    if ptq:
        for method, row in ptq["int8"].items():
            add(f"PTQ INT8, {method} calibration", row, "ptq")
        stress = ptq.get("stress") or {}
        for method, row in (stress.get("methods") or {}).items():
            add(f"PTQ {_setting_name(stress.get('setting')).split(',')[0]} (stress setting), {method} calibration",
                row, "ptq")
    qat = _results(data, "qat")
    if qat:
        images = base["fp32"]["images"] if base else None  # run_qat evaluates the same batches of 32
        for res in qat["runs"].values():
            for row in res["table"][1:]:
                kind, bits = row["model"].split()
                steps = f"{len(res['history'])} epoch(s) x {res['settings']['iters_per_epoch']} steps"
                label = (f"PTQ {bits}, {res['settings']['method']} calibration (QAT's start)" if kind == "ptq" else
                         f"QAT {bits}, best of {steps}")
                add(label, row, "qat", images=images)
    sens = _results(data, "sensitivity")
    if sens:
        ref = sens["fp32"]["map"]
        add("FP32 (scan subset)", {"map": ref}, "sensitivity", ref=ref, images=sens["images"])
        for row in sens["map_vs_k"]:
            what = "INT8 (scan subset)" if row["k"] == 0 else f"INT8, top-{row['k']} layers in float"
            add(f"{what}: {row['int8_layers']} INT8 layers", row, "sensitivity", ref=ref, images=sens["images"])
    return ["variant", "mAP@0.5:0.95 [95% interval]", "mAP@0.5", "vs FP32 (points) [95% paired interval]",
            "val images", "stage"], rows


def sensitivity_table(data: dict, top: int = 10) -> Table:
    """The top-``top`` layers: mAP with the layer in float, the drop it explains, the SQNR proxy; and the course's."""
    from qcourse.yolo.sensitivity import PUBLISHED_YOLOV7_TOP10

    sens = _results(data, "sensitivity")
    rows = []
    for i, row in enumerate(sens["top"][:top]):
        sqnr = "-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
        course = PUBLISHED_YOLOV7_TOP10[i] if i < len(PUBLISHED_YOLOV7_TOP10) else "-"
        rows.append([str(row["rank"]), row["layer"], _f4(row["map"]), f"{row['drop']:+.4f}", sqnr, course])
    return ["rank", "layer", "mAP with it in float", "drop", "SQNR dB (proxy)",
            f"course's YOLOv7/COCO ({_NOT_MEASURED})"], rows


def engine_table(data: dict) -> Table:
    """Per engine and batch: latency percentiles, throughput, speed against the reference engine, mAP."""
    eng = _results(data, "engines")
    rows = []
    for name, per_batch in eng["timing"].items():
        for b, t in per_batch.items():
            base = eng["timing"][eng["reference"]].get(b)
            speed = "-" if base is None else f"{t['throughput_img_s'] / base['throughput_img_s']:.2f}x"
            m = eng["map"][name]
            rows.append([name, b, f"{t['latency_ms_median']:.2f}", f"{t['latency_ms_p90']:.2f}",
                         f"{t['latency_ms_p99']:.2f}", f"{t['throughput_img_s']:.1f}", speed, _map_cell(m),
                         str(m["images"])])
    return ["engine", "batch", "latency ms (median)", "p90", "p99", "images/s", f"vs {eng['reference']}",
            "mAP@0.5:0.95 [95% interval]", "val images"], rows


def engine_map_table(data: dict) -> Table:
    """Per engine: its mAP, and its paired differences to the PyTorch FP32 model and to the reference engine."""
    eng = _results(data, "engines")
    ref = eng["reference"]
    rows = [[name, _map_cell(m), _diff_cell(m.get("vs_fp32_model")),
             "(the reference)" if name == ref else _diff_cell(m.get("vs_reference"))] for name, m in eng["map"].items()]
    return ["engine", "mAP@0.5:0.95 [95% interval]", "minus the PyTorch FP32 model (points) [95% paired interval]",
            f"minus {ref} (points) [95% paired interval]"], rows


def _setting_name(setting) -> str:
    """A stage's recorded setting (a :class:`~qcourse.yolo.ptq.Setting` as a dict, or its name) as ``W8pcA6``."""
    if isinstance(setting, dict):
        method = f", {setting['method']}" if setting.get("method") else ""
        return f"{setting.get('name', '?')}{method}"
    return str(setting or "-")


def _share_cell(share: Optional[dict]) -> str:
    """``0.62 [0.55, 0.70]``: a recovered share and its interval (or why there is none)."""
    if not share or share.get("share") is None:
        return "-" if not share else f"none: {share.get('reason') or 'no significant loss to win back'}"
    iv = share.get("interval")
    return f"{share['share']:.2f}" + ("" if not iv else f" [{iv[0]:.2f}, {iv[1]:.2f}]")


def _holds(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("holds" if ok else "does not hold")


def effects_table(data: dict) -> Table:
    """The course's effects on this run's model, each with its interval and whether the issue's bar is met.

    Lesson 5: max vs the best histogram method at W8A8 and at the PTQ stage's stress setting;
    lesson 6: the stress setting's loss, the split-half stability of the ranking, the share of the
    loss the top 5 win back, top 5 vs random 5, the proxy's rank correlation; lesson 7: the share
    of PTQ's loss QAT won back, per run.
    """
    rows: List[List[str]] = []
    ptq, sens, qat = (_results(data, s) for s in ("ptq", "sensitivity", "qat"))
    if ptq and ptq.get("best_histogram_vs_max"):
        d = ptq["best_histogram_vs_max"]
        rows.append(["5", f"{d['best']} minus max calibration", "W8pcA8", _diff_cell(d), ">= 2 points, interval > 0",
                     _holds(d["diff"] >= 0.02 and d["interval"][0] > 0)])
    gap = (ptq or {}).get("method_gap")
    if gap:
        d = {"diff": gap["gap"], "interval": gap["interval"]}
        rows.append(["5", f"{gap['best_method']} minus max calibration", _setting_name(gap["setting"]), _diff_cell(d),
                     ">= 2 points, interval > 0", _holds(gap["gap"] >= 0.02 and gap["interval"][0] > 0)])
    if sens and sens.get("criteria") is not None:
        crit, where = sens["criteria"], f"{_setting_name(sens.get('setting'))}, {sens.get('images', '?')} images"
        ok = list(crit.values())
        if sens.get("loss"):
            rows.append(["6", "FP32 minus INT8 (the loss the scan explains)", where, _diff_cell(sens["loss"]),
                         ">= 3 points, interval > 0", _holds(ok[0] if ok else None)])
        split = sens.get("split_half_rho") or {}
        if split:
            spread = ""
            if split.get("median") is not None and split.get("p05_p95"):
                lo, hi = split["p05_p95"]
                spread = f" (median {split['median']:.2f}, 5-95 % {lo:.2f} to {hi:.2f} over {split['splits']} splits)"
            halves = " and ".join(str(n) for n in split.get("halves", [])) or "two halves of the"
            rho = split.get("rho")
            rows.append(["6", f"Spearman rho of the layer rankings from two disjoint halves ({halves} images)", where,
                         ("n/a" if rho is None else f"{rho:.2f}") + spread, ">= 0.7",
                         _holds(None if rho is None else rho >= 0.7)])
        topk = sens.get("topk") or {}
        if topk:
            rows.append(["6", f"share of the loss won back by the top {topk['k']} layers in float", where,
                         _share_cell({"share": topk.get("recovered_share"), "interval": topk.get("interval")}),
                         ">= 0.5", _holds(None if topk.get("recovered_share") is None
                                          else topk["recovered_share"] >= 0.5)])
            vs = topk.get("vs_random")
            if vs:
                rows.append(["6", f"top {topk['k']} minus {topk['k']} random layers in float (mean of "
                                   f"{len(vs.get('draws', [])) or '?'} draws)", where, _diff_cell(vs), "interval > 0",
                             _holds(vs["interval"][0] > 0)])
        proxy = sens.get("proxy_correlation") or {}
        if proxy.get("spearman") is not None:
            p_value = proxy.get("p_value")
            rows.append(["6", "SQNR proxy vs the scan: Spearman rho", where,
                         f"{proxy['spearman']:.2f}" + ("" if p_value is None else f" (p = {p_value:.2g})"),
                         "reported, no bar", "-"])
    for name, res in ((qat or {}).get("runs") or {}).items():
        share = res.get("recovered_share")
        if share is None and "recovered_share" not in res:
            continue
        st = res.get("settings", {})
        steps = st.get("epochs", 0) * st.get("iters_per_epoch", 0)
        setting = f"W{st.get('w_bits', '?')}pcA{st.get('a_bits', '?')}, {st.get('loss', '?')} loss, {steps} steps"
        cell = _share_cell(share if share else {"share": None, "reason": res.get("recovered_share_reason")})
        ok = None if not share or share.get("share") is None else share["share"] >= 0.7
        rows.append(["7", f"share of PTQ's loss won back by QAT ({name})", setting, cell, ">= 0.7", _holds(ok)])
    return ["lesson", "effect", "setting", "measured [95% interval]", "bar to show the effect", "reading"], rows


def summary(data: dict) -> dict:
    """``results.json``'s top-level ``ptq`` / ``sensitivity`` / ``qat`` keys: each lesson's effect, for scripts.

    ``ptq.method_gap`` (``{"setting", "best_method", "gap", "interval"}``); ``sensitivity``:
    ``split_half_rho`` (a number; ``split_half`` its details), ``topk`` (``{"k", "recovered_share",
    "interval", "vs_random": {"diff", "interval", ...}}``), ``criteria`` and ``holds``;
    ``qat.recovered_share`` (``{"run", "setting", "share", "interval", "steps"}``). A stage that did
    not run leaves its key out.
    """
    out = {}
    ptq, sens, qat = (_results(data, s) for s in ("ptq", "sensitivity", "qat"))
    if ptq and ptq.get("method_gap"):
        out["ptq"] = {"method_gap": ptq["method_gap"]}
    if sens and sens.get("split_half_rho") is not None:
        split = sens["split_half_rho"]
        out["sensitivity"] = {"setting": sens.get("setting"),
                              "split_half_rho": split["rho"] if isinstance(split, dict) else split,
                              "split_half": split, "topk": sens.get("topk"), "criteria": sens.get("criteria"),
                              "holds": sens.get("holds")}
    if qat and qat.get("recovered_share"):
        out["qat"] = {"recovered_share": qat["recovered_share"]}
    return out


def _negated(d: dict) -> dict:
    """The paired difference the other way round: b - a from a - b (the interval mirrored)."""
    lo, hi = d["interval"]
    return {"diff": -d["diff"], "interval": [-hi, -lo]}


def _qat_engine(eng: dict) -> Optional[str]:
    return next((name for name in eng["map"] if name.endswith("int8 QAT")), None)


def _claims(data: dict) -> Dict[str, dict]:
    """``{published row: claim}``: each published comparison this run measured, with its paired interval and verdict.

    A claim is ``{"name", "published", "measured", "interval", "verdict"}``: the published difference and
    this run's, in the same sign convention, the measured one's paired 95 % interval, and
    :func:`qcourse.yolo.intervals.verdict` of the two.
    """
    from qcourse.yolo.intervals import verdict

    ptq, eng = _results(data, "ptq"), _results(data, "engines")
    found: Dict[str, Tuple[str, float, dict]] = {}
    mse = ((ptq or {}).get("int8") or {}).get("mse") or {}
    if mse.get("vs_fp32"):
        found["ptq_histogram_loss"] = (
            "PTQ, histogram calibration loses about 0.003 mAP (measured: FP32 minus PTQ mse)",
            PUBLISHED["ptq_histogram_loss"]["diff"], _negated(mse["vs_fp32"]))
        (_, fp16), (_, ptq_m), _ = PUBLISHED["pytorch"]["rows"]
        found["pytorch_ptq"] = (f"PyTorch PTQ INT8 histogram/MSE {ptq_m:.4f} vs FP16 {fp16:.4f} (measured: PTQ mse "
                                "minus FP32)", round(ptq_m - fp16, 4), mse["vs_fp32"])
    best = (ptq or {}).get("best_histogram_vs_max")
    if best:
        found["ptq_max"] = ("max calibration 0.444 vs histogram about 0.509: max loses about 6.5 points more "
                            f"(measured: the best histogram method, {best['best']}, minus max)",
                            PUBLISHED["ptq_max"]["diff"], best)
    qat_runs = (_results(data, "qat") or {}).get("runs") or {}
    qat8 = (qat_runs.get("w8a8") or {}).get("table") or []
    if len(qat8) > 2 and qat8[2].get("vs_fp32"):
        (_, fp16), _, (_, qat_m) = PUBLISHED["pytorch"]["rows"]
        found["pytorch_qat"] = (f"PyTorch QAT INT8 {qat_m:.4f} vs FP16 {fp16:.4f} (measured: QAT W8A8 minus FP32)",
                                round(qat_m - fp16, 4), qat8[2]["vs_fp32"])
    gap = (ptq or {}).get("method_gap")
    if gap:
        setting = _setting_name(gap["setting"]).split(",")[0]
        found["ptq_max_stress"] = (
            f"max calibration loses about 6.5 points more than histogram (measured at the stress setting {setting}: "
            f"{gap['best_method']} minus max)", PUBLISHED["ptq_max"]["diff"],
            {"diff": gap["gap"], "interval": gap["interval"]})
    qat = _qat_engine(eng) if eng else None
    if qat and eng["map"][qat].get("vs_reference"):
        (_, fp16, _), _, (_, qat_m, _) = PUBLISHED["trt"]["rows"]
        found["trt_qat"] = (f"TensorRT INT8 QAT {qat_m:.4f} vs FP16 {fp16:.4f} (measured: {qat} minus "
                            f"{eng['reference']})", round(qat_m - fp16, 4), eng["map"][qat]["vs_reference"])
    return {key: {"name": name, "published": published, "measured": d["diff"], "interval": list(d["interval"]),
                  "verdict": verdict(published, d["interval"])}
            for key, (name, published, d) in found.items()}


def claims(data: dict) -> List[dict]:
    """The published claims this run measured: ``[{"name", "published", "measured", "interval", "verdict"}]``
    (``results.json``'s ``claims``; the others are in :func:`published_table`, without a verdict)."""
    return list(_claims(data).values())


def _measured(c: dict) -> str:
    lo, hi = c["interval"]
    return f"{c['measured']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _bootstrap_words(data: dict) -> str:
    """How the intervals were made, in words (from the settings a stage recorded)."""
    b = next((r["bootstrap"] for r in (_results(data, s) for s in ("baseline", "ptq", "engines"))
              if r and r.get("bootstrap")), None)
    if b is None:
        return ""
    return (f"In brackets: the {100 * b['level']:.0f} % bootstrap interval over the evaluated images ({b['n']} "
            f"resamples of the images, seed {b['seed']}: the same detections scored again, the model not run "
            "again). A difference's interval is paired: both models scored on the same resampled images. A "
            "difference whose interval holds 0 is within noise: these images cannot tell the two apart.")


def published_table(data: dict) -> Table:
    """The course's and NVIDIA's published figures beside what this run measured, with a verdict where it can.

    A verdict needs a measured counterpart with a paired interval (:func:`claims`); the other
    rows say why they have none.
    """
    base, ptq, sens, eng = (_results(data, s) for s in ("baseline", "ptq", "sensitivity", "engines"))
    measured_model = "embedded default" if data["settings"]["weights"] is None else data["settings"]["weights"]
    found = _claims(data)

    def claimed(key: str, what: str) -> List[str]:
        """The measured and verdict cells of the published row ``key``: ``what`` was measured, paired."""
        if key not in found:
            return ["-", "no verdict: not measured in this run"]
        return [f"{_measured(found[key])} ({what}, paired)", found[key]["verdict"]]

    rows = [["FP32 accuracy", PUBLISHED["yolov7_fp32"]["value"], PUBLISHED["yolov7_fp32"]["source"],
             f"mAP {_map_cell(base['fp32']) if base else '-'} ({measured_model})",
             "no verdict: a level, not a comparison"]]
    rows.append(["PTQ, histogram calibration", PUBLISHED["ptq_histogram_loss"]["value"],
                 PUBLISHED["ptq_histogram_loss"]["source"], *claimed("ptq_histogram_loss", "FP32 minus PTQ mse")])
    max_cells = claimed("ptq_max", f"{ptq['best_histogram_vs_max']['best']} minus max" if "ptq_max" in found else "")
    if ptq and "max" in ptq["int8"]:
        max_cells[0] = f"mAP {_map_cell(ptq['int8']['max'])}" + ("" if max_cells[0] == "-" else f"; {max_cells[0]}")
    rows.append(["PTQ, max calibration", PUBLISHED["ptq_max"]["value"], PUBLISHED["ptq_max"]["source"], *max_cells])
    if "ptq_max_stress" in found:
        gap = ptq["method_gap"]
        setting = _setting_name(gap["setting"]).split(",")[0]
        rows.append([f"PTQ, max calibration, at this run's stress setting {setting}", PUBLISHED["ptq_max"]["value"],
                     PUBLISHED["ptq_max"]["source"],
                     *claimed("ptq_max_stress", f"{gap['best_method']} minus max at {setting}")])
    rows.append(["quantizer groups tied for TensorRT", PUBLISHED["tied_groups"]["value"],
                 PUBLISHED["tied_groups"]["source"], f"{len(ptq['tied_groups'])} tied groups" if ptq else "-",
                 "no verdict: a count"])
    if sens:
        from qcourse.yolo.sensitivity import PUBLISHED_YOLOV7_TOP10

        rows.append(["the course's ten most sensitive layers", ", ".join(PUBLISHED_YOLOV7_TOP10[:5]) + ", ...",
                     "the course's video (YOLOv7, COCO)", "ranked first here: " + ", ".join(r["layer"] for r in sens["top"][:5]) + ", ...",
                     "no verdict: another model's layers"])
    torch_rows = PUBLISHED["pytorch"]
    (fp16_label, fp16), (ptq_label, ptq_m), (qat_label, qat_m) = torch_rows["rows"]
    rows.append([fp16_label, f"mAP {fp16:.4f}", torch_rows["source"], "not measured here (FP16 PyTorch)",
                 "no verdict: a level, not a comparison"])
    rows.append([ptq_label, f"mAP {ptq_m:.4f} ({ptq_m - fp16:+.4f} vs FP16)", torch_rows["source"],
                 *claimed("pytorch_ptq", "PTQ mse minus FP32")])
    rows.append([qat_label, f"mAP {qat_m:.4f} ({qat_m - fp16:+.4f} vs FP16)", torch_rows["source"],
                 *claimed("pytorch_qat", "QAT W8A8 minus FP32")])
    trt = PUBLISHED["trt"]
    (fp16_name, trt_fp16, fp16_fps), (implicit_name, implicit_m, implicit_fps), (qat_name, trt_qat, qat_fps) = \
        trt["rows"]
    rows.append([fp16_name, f"mAP {trt_fp16:.4f} at {fp16_fps} fps", trt["source"],
                 f"{eng['reference']}: mAP {_map_cell(eng['map'][eng['reference']])}" if eng else "-",
                 "no verdict: a level, not a comparison"])
    rows.append([implicit_name, f"mAP {implicit_m:.4f} at {implicit_fps} fps ({implicit_m - trt_fp16:+.4f} vs FP16)",
                 trt["source"], "not measured here: this run's INT8 PTQ engine has explicit Q/DQ (lesson 5's "
                 "calibration), not TensorRT's implicit calibration", "no verdict: no measured counterpart"])
    rows.append([qat_name, f"mAP {trt_qat:.4f} at {qat_fps} fps ({trt_qat - trt_fp16:+.4f} vs FP16)",
                 trt["source"], *claimed("trt_qat", f"{_qat_engine(eng)} minus {eng['reference']}" if eng else "")])
    speed = "-"
    if eng:
        t, ref = eng["timing"], eng["reference"]
        int8 = next(name for name in t if name.endswith("int8 PTQ"))
        big = max(t[ref], key=int)
        ratio = t[int8][big]["throughput_img_s"] / t[ref][big]["throughput_img_s"]
        speed = f"{int8} {ratio:.2f}x {ref} at batch {big} (this machine)"
    rows.append(["INT8 speed-up", f"{qat_fps / fp16_fps:.2f}x FP16 ({qat_fps} vs {fp16_fps} fps)", trt["source"], speed,
                 "no verdict: a speed on another machine"])
    rows.append(["Q/DQ placement and speed", PUBLISHED["placement_qat_fps"]["value"],
                 PUBLISHED["placement_qat_fps"]["source"], "-", "no verdict: not measured here"])
    return ["figure", _NOT_MEASURED, "source", "measured here [95% interval]", "verdict"], rows


def notebook_table(data: dict) -> Table:
    nbs = _results(data, "notebooks")
    rows = [[r["notebook"], f"{r['seconds']:.0f}", "kept from an earlier run" if r.get("status") == "kept" else "ran",
             f"[{r['html']}](notebooks/{r['html']})"] for r in nbs["notebooks"]]
    return ["notebook", "seconds (when it ran)", "in this stage", "rendered"], rows


# ----------------------------------------------------------------------------- figures
#: the figures :func:`write_report` may draw, in ``OUT/plots/``
PLOTS = ("map.png", "sensitivity.png", "engines.png")


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure as PNG through :func:`qcourse.utils.atomic_write`, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_write(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _plots(out: Path, data: dict) -> List[Tuple[Path, str]]:
    """The lessons' figures of this run, as ``(png, caption)``."""
    from qcourse.course.plots.engines import plot_engine_benchmark
    from qcourse.course.plots.ptq import plot_map_bars
    from qcourse.course.plots.sensitivity import plot_sensitivity_summary

    folder = out / "plots"
    made = []
    base, ptq, qat = (_results(data, s) for s in ("baseline", "ptq", "qat"))
    if base and (ptq or qat):
        maps = {f"PTQ {m}": r["map"] for m, r in (ptq or {}).get("int8", {}).items()}
        for res in (qat or {}).get("runs", {}).values():
            maps.update({f"{row['model'].split()[0].upper()} {row['model'].split()[1]}": row["map"]
                         for row in res["table"][1:]})
        fig = plot_map_bars(maps, base["fp32"]["map"], title="mAP@0.5:0.95 per variant (dashed: FP32)")
        made.append((save_figure(fig, folder / "map.png"),
                     "mAP per variant: PTQ with each calibration method, and QAT"))
    sens = _results(data, "sensitivity")
    scan = out / "sensitivity" / "sensitivity.json"
    if sens and scan.is_file():
        from qcourse.sensitivity import load_results

        fig = plot_sensitivity_summary(load_results(scan)["layers"], sens["map_vs_k"], sens["fp32"]["map"], top=10)
        made.append((save_figure(fig, folder / "sensitivity.png"),
                     f"Sensitivity on {sens['images']} val images: mAP recovered per layer, and mAP vs k"))
    eng = _results(data, "engines")
    if eng:
        timing = {name: {int(b): r for b, r in per.items()} for name, per in eng["timing"].items()}
        fig = plot_engine_benchmark(timing, {n: m["map"] for n, m in eng["map"].items()}, title=eng["machine"])
        made.append((save_figure(fig, folder / "engines.png"), "Engines: latency per image and mAP"))
    return made


# ----------------------------------------------------------------------------- the document
def report_blocks(data: dict, plots: Sequence[Tuple[Path, str]] = ()) -> List[tuple]:
    """The report as blocks: ``("h1"|"h2", text)``, ``("p", text)``, ``("table", header, rows)``,
    ``("list", items)``, ``("img", png path, caption)``. Text may hold `code` and [links](href)."""
    s = data["settings"]
    model = "the embedded default (YOLOv7-tiny on the synthetic shapes dataset)" if s["weights"] is None else \
        f"{s['weights']} on {s['coco'] or 'the synthetic dataset'}"
    blocks: List[tuple] = [
        ("h1", "qcourse course: the course's results, reproduced"),
        ("p", f"Generated {data['generated']} by qcourse {data['qcourse']} for {model}, device {s['device']}. "
              "Every number below was measured by this run's stages unless it is labelled "
              f"*{_NOT_MEASURED}*. All data: `results.json`."),
        ("h2", "Machine and versions"),
        ("list", [f"{k}: {v}" for k, v in data["machine"].items()]),
        ("h2", "Stages"),
        ("p", f"This run took {data['seconds_this_run']:.0f} s; the stages took {_stage_total(data):.0f} s when they "
              "ran. A stage marked *cached* was done earlier with the same inputs; its time is the time it took then."),
        ("table", *stage_table(data)),
        ("p", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in s.items())),
    ]
    demo = _results(data, "demo")
    if demo:
        blocks += [("h2", "Lessons 1-4: the digits CNN"),
                   ("table", ["model", "test accuracy"],
                    [[k, f"{100 * v:.2f} %"] for k, v in demo["accuracy"].items()])]
    header, rows = map_table(data)
    if rows:
        blocks += [("h2", "mAP per variant"),
                   ("p", "FP32, PTQ with each calibration method (lesson 5), QAT (lesson 7) on the same val images; "
                         "the sensitivity stage's re-quantized models (lesson 6) on its scan subset, beside FP32 "
                         "and INT8 on that subset. " + _bootstrap_words(data) + " Each PTQ method is paired with "
                         "the PTQ stage's own FP32 evaluation (the same model on the same images as the baseline), "
                         "each QAT row with its QAT run's FP32 evaluation, each sensitivity row with FP32 on the "
                         "scan subset."),
                   ("table", header, rows)]
    header, rows = effects_table(data)
    if rows:
        blocks += [("h2", "The course's effects on this model, with their intervals"),
                   ("p", "What lessons 5-7 teach, measured here: the calibration method (lesson 5), a few layers "
                         "that matter (lesson 6), QAT winning back what PTQ lost (lesson 7). On the embedded "
                         "default 8-bit quantization costs under a point and these effects are within noise at "
                         "W8A8, unlike the full YOLOv7 on COCO, whose SiLU activations on photos have rare, large "
                         "outliers that stretch max calibration's range; so lessons 5-7 also measure them in "
                         "*stress settings* (fewer activation or weight bits), named in the setting column. A "
                         "reading says whether the measurement meets the bar the course sets for showing the effect; "
                         "a difference whose interval holds 0 is within noise. " + _bootstrap_words(data)),
                   ("table", header, rows)]
    if _results(data, "sensitivity"):
        sens = _results(data, "sensitivity")
        rho = sens["proxy_correlation"]["spearman"]
        holds = bool(sens.get("holds"))
        title = ("Sensitivity: the most sensitive layers" if holds else
                 "Sensitivity: the layers the scan ranks first (the ranking is not stable enough to call them "
                 "the most sensitive)")
        setting = _setting_name(sens.get("setting")) if sens.get("setting") else "W8pcA8"
        blocks += [("h2", title),
                   ("p", f"{sens['layers_scanned']} layers scanned at {setting} on {sens['images']} val images, one "
                         f"layer in float at a time. The label-free SQNR proxy ranks them with Spearman rho "
                         f"{'n/a' if rho is None else f'{rho:.3f}'} against the measured drops. "
                         + ("" if holds else "The criteria of the table above do not all hold: read the order as "
                            "this run's measurement on these images, not as a property of the layers. ")
                         + "The last column is the course's ranking for the full YOLOv7 on COCO: another model and "
                         "other data."),
                   ("table", *sensitivity_table(data))]
    if _results(data, "engines"):
        eng = _results(data, "engines")
        blocks += [("h2", "Engines: latency, throughput and mAP"),
                   ("p", f"{eng['machine']}; {eng['iterations']} timed calls per engine and batch size, the "
                         "engines taking turns; mAP of each engine's own detections."),
                   ("table", *engine_table(data))]
        if all(m.get("vs_fp32_model") for m in eng["map"].values()):
            blocks += [("h2", "Engines: mAP beside the FP32 model"),
                       ("p", "Each engine's mAP beside the PyTorch FP32 model's and the reference engine's, on the "
                             "same images. " + _bootstrap_words(data)),
                       ("table", *engine_map_table(data))]
    blocks += [("h2", "Published figures beside this run's"),
               ("p", "The course's and NVIDIA's numbers are for the full YOLOv7 on COCO val2017 at 640 px "
                     "(NVIDIA's speeds on a Jetson Orin-X GPU), copied from their publications; they are "
                     f"*{_NOT_MEASURED}*. The fourth column is this run's counterpart, for its own model and machine, "
                     "and the last what its interval says of the published claim."),
               ("table", *published_table(data))]
    found = claims(data)
    if found:
        from qcourse.yolo.intervals import VERDICTS

        counts = {v: sum(c["verdict"] == v for c in found) for v in VERDICTS}
        blocks.append(("p", f"Verdicts of the {len(found)} published comparisons this run measured: "
                            + ", ".join(f"{n} {v}" for v, n in counts.items()) + ". *Reproduced*: this run's paired "
                            "95 % interval excludes 0 on the published side; *not reproduced*: it excludes 0 on the "
                            "other side; *within noise*: it holds 0. Only the direction is judged, not the size "
                            "(this run's model and images are its own); the other rows have no verdict and say "
                            "why."))
    if plots:
        blocks.append(("h2", "Figures"))
        blocks += [("img", png, caption) for png, caption in plots]
    if _results(data, "notebooks"):
        blocks += [("h2", "The lessons, executed"),
                   ("p", "Each notebook as executed by this run, rendered to HTML with its figures "
                         "(`notebooks/`, next to this report)."),
                   ("table", *notebook_table(data))]
    return blocks


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[tuple], out: Path) -> str:
    """Markdown; figures are linked relative to ``out`` (the report's folder)."""
    lines = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            header, rows = b[1], b[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({Path(os.path.relpath(b[1], out)).as_posix()})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escaped text with `code`, *emphasis* and [links](href) as HTML."""
    t = html.escape(str(text), quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', t)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", t)


def to_html(blocks: Sequence[tuple], title: str = "qcourse course report") -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                         f"<figcaption>{_inline(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _files(out: Path) -> Dict[str, Path]:
    return {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}


def report_paths(out) -> List[Path]:
    """Every file :func:`write_report` may write into ``out`` (to refuse a user's file of those names up front)."""
    out = Path(out)
    return [*_files(out).values(), *(out / "plots" / name for name in PLOTS)]


def write_report(out, data: dict) -> Dict[str, Path]:
    """Write ``results.json``, the figures, ``report.md`` and ``report.html`` into ``out``; returns their paths.

    The tables are built before anything is written, so results that do not hold what the report
    needs leave the earlier report as it was; a file of these names qcourse did not write is refused.
    """
    out = Path(out)
    files = _files(out)
    check_writable(*report_paths(out))
    data = {**data, "claims": claims(data), **summary(data)}
    report_blocks(data)  # every table, from the data alone: fails before any file is replaced
    blocks = report_blocks(data, _plots(out, data))
    markdown, page = to_markdown(blocks, out), to_html(blocks)
    with atomic_write(files["json"]) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    with atomic_write(files["md"], suffix=".md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_write(files["html"], suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return files
