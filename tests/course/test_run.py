"""Tests of ``qcourse course`` as the course's "reproduce the results" command (qcourse.course.run,
.stages, .report), on a tiny slice that runs every stage in seconds: a narrow YOLOv7-tiny (a
quarter of the channels) trained for a few steps on 32 synthetic images in COCO layout, one
evaluation batch, one calibration batch, three layers scanned, one QAT step, one trivial notebook.

The command runs through ``cli.main`` as a user runs it. The numbers in the report are checked
against the stages' own results.json files; skipping is checked on the files themselves (a
skipped stage leaves its results.json untouched), never on timing.
"""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from qcourse.course import cli, run as course

ROOT = Path(__file__).resolve().parents[2]
YOLO_STAGES = ("baseline", "ptq", "sensitivity", "qat", "export", "engines")


def _train_narrow_model(coco: Path):
    """YOLOv7-tiny at a quarter width, 24 Adam steps on the training images: a model whose mAP is
    small but not zero, so the report's numbers differ from row to row."""
    from qcourse.yolo.datasets import create_dataloader
    from qcourse.yolo.loss import YoloLoss
    from qcourse.yolo.models import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config("yolov7-tiny", 6)
    cfg["width_multiple"] = 0.25
    model = build_model(cfg)
    loader = create_dataloader(coco, "train2017", img_size=64, batch_size=8, shuffle=True)
    loss = YoloLoss(model, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for images, targets, *_ in loader:
            value = loss(model(images), targets)[0]
            opt.zero_grad()
            value.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{"args": the course's options for the tiny slice, "coco", "weights", "notebooks"}``."""
    from qcourse.yolo.datasets import make_synthetic_coco
    from qcourse.yolo.models import save_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    coco = root / "coco"
    make_synthetic_coco(coco, n_train=32, n_val=16, img_size=64, progress=False, workers=1)
    for split in ("train", "val"):  # COCO's own split names, as --coco expects them
        (coco / "images" / split).rename(coco / "images" / f"{split}2017")
        (coco / "annotations" / f"instances_{split}.json").rename(coco / "annotations" / f"instances_{split}2017.json")
    weights = save_checkpoint(_train_narrow_model(coco), root / "narrow.pt", img_size=64)
    notebooks = root / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A lesson"),
                                         nbformat.v4.new_code_cell("x = 6 * 7\nprint(x)")])
    nbformat.write(nb, notebooks / "01_tiny.ipynb")
    args = ["--weights", weights, "--coco", coco, "--eval-batches", "1", "--calib-batches", "1",
            "--scan-batches", "1", "--scan-layers", "3", "--qat-epochs", "1", "--qat-iters", "1",
            "--bench-iterations", "2", "--notebooks", notebooks]
    return {"args": [str(a) for a in args], "coco": coco, "weights": weights, "notebooks": notebooks}


def course_cli(out: Path, tiny: dict, *extra):
    """``(exit status, stdout, stderr)`` of ``qcourse course`` on the tiny slice, run in-process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["course", "--out", str(out), *tiny["args"], *map(str, extra)])
    return code, stdout.getvalue(), stderr.getvalue()


def snapshot(out: Path) -> dict:
    """``{stage: (mtime_ns, bytes)}`` of each stage's results.json that exists."""
    files = {name: out / name / "results.json" for name in course.STAGE_NAMES}
    return {name: (f.stat().st_mtime_ns, f.read_bytes()) for name, f in files.items() if f.is_file()}


def stage_results(out: Path, name: str) -> dict:
    return json.loads((out / name / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The course on the tiny slice twice: first Ctrl-C in the QAT stage, then to the end."""
    from qcourse.yolo import qat

    out = tmp_path_factory.mktemp("course") / "out"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qat, "run_qat", ctrl_c)
        first = course_cli(out, tiny)
    after_first = snapshot(out)
    second = course_cli(out, tiny)
    return {"out": out, "first": first, "after_first": after_first, "second": second,
            "after_second": snapshot(out)}


# ------------------------------------------------------------------ reading the report back
def md_tables(text: str) -> dict:
    """``{section heading: [row cells, ...]}`` of every table in a markdown report (header row excluded)."""
    tables, heading, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if rows is None:
                rows = tables.setdefault(heading, [])
                continue  # the header
            if set("".join(cells)) <= {"-"}:
                continue  # the rule under the header
            rows.append(cells)
        else:
            rows = None
    return tables


def f4(x) -> str:
    return f"{x:.4f}"


def with_interval(row: dict) -> str:
    """A mAP as the report prints it: ``0.6974 [0.6807, 0.7181]``."""
    return f"{row['map']:.4f} [{row['interval'][0]:.4f}, {row['interval'][1]:.4f}]"


def points(d: dict) -> str:
    """A paired difference as the report prints it, in points, with its interval and what that says."""
    lo, hi = d["interval"]
    word = "within noise" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
    return f"{100 * d['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] {word}"


# ------------------------------------------------------------------ the tests
def test_interrupted_stage_keeps_the_finished_ones(runs):
    code, out, err = runs["first"]
    assert code == 130 and "Traceback" not in err
    line = err.strip()
    assert line.startswith("qcourse: interrupted in stage qat") and "rerun the same command" in line
    assert "(demo, baseline, ptq, sensitivity)" in line
    assert sorted(runs["after_first"]) == sorted(["demo", "baseline", "ptq", "sensitivity"])
    # the rerun reused them as they were and ran the rest
    for name in ("demo", "baseline", "ptq", "sensitivity"):
        assert runs["after_second"][name] == runs["after_first"][name], name
        assert f"[done] {name}: done earlier with the same inputs" in runs["second"][1]
    assert set(runs["after_second"]) == set(course.STAGE_NAMES)


def test_second_run_completes_and_reports(runs):
    code, out, err = runs["second"]
    assert code == 0, err
    assert err == ""  # no warnings, no progress bars off a terminal
    for name in ("qat", "export", "engines", "notebooks"):
        assert re.search(rf"^\[\d/4\] {name}: ", out, re.M), name
        assert re.search(r"^ +done in \d+", out, re.M)
    for f in ("report.md", "report.html", "results.json", "plots/map.png", "plots/sensitivity.png",
              "plots/engines.png", "notebooks/01_tiny.ipynb", "notebooks/01_tiny.html"):
        assert (runs["out"] / f).is_file(), f


def test_report_tables_hold_the_stage_results(runs):
    out = runs["out"]
    tables = md_tables((out / "report.md").read_text())
    rows = {r[0]: r for r in tables["mAP per variant"]}
    base = stage_results(out, "baseline")["fp32"]
    assert rows["FP32"][1:5] == [with_interval(base), f4(base["map50"]), "+0.00", str(base["images"])]
    ptq = stage_results(out, "ptq")
    assert set(ptq["int8"]) == {"max", "entropy", "mse", "percentile"}
    for method, r in ptq["int8"].items():
        row = rows[f"PTQ INT8, {method} calibration"]
        assert row[1:5] == [with_interval(r), f4(r["map50"]), points(r["vs_fp32"]), str(r["images"])]
    qat = stage_results(out, "qat")["runs"]
    for res in qat.values():
        bits = res["table"][2]["model"].split()[1]
        assert rows[f"PTQ {bits}, mse calibration (QAT's start)"][1:4] == [
            with_interval(res["table"][1]), f4(res["table"][1]["map50"]), points(res["table"][1]["vs_fp32"])]
        qat_row = next(v for k, v in rows.items() if k.startswith(f"QAT {bits}, best of 1 epoch"))
        assert qat_row[1:4] == [with_interval(res["table"][2]), f4(res["table"][2]["map50"]),
                                points(res["table"][2]["vs_fp32"])]
    # W8A8 QAT starts from the PTQ stage's mse checkpoint: its PTQ row is that model, on the same images
    assert qat["w8a8"]["table"][1]["map"] == ptq["int8"]["mse"]["map"]
    sens = stage_results(out, "sensitivity")
    for r in sens["map_vs_k"]:
        label = next(k for k in rows if k.startswith("INT8") and f"{r['int8_layers']} INT8 layers" in k)
        assert rows[label][1] == with_interval(r) and rows[label][4] == str(sens["images"])

    title = next(t for t in tables if t.startswith("Sensitivity: the "))
    assert ("most sensitive layers" in title) == sens["holds"] and ("ranks first" in title) != sens["holds"]
    top = tables[title]
    assert [(r[1], r[2], r[3]) for r in top] == [(t["layer"], f4(t["map"]), f"{t['drop']:+.4f}") for t in sens["top"]]
    assert len(top) == sens["layers_scanned"] == 3

    eng = stage_results(out, "engines")
    got = {(r[0], r[1]): r for r in tables["Engines: latency, throughput and mAP"]}
    assert len(got) == 3 * 2  # ORT fp32 / int8 PTQ / int8 QAT at batch 1 and 8
    for name, per_batch in eng["timing"].items():
        for b, t in per_batch.items():
            row = got[(name, b)]
            assert row[2] == f"{t['latency_ms_median']:.2f}" and row[5] == f"{t['throughput_img_s']:.1f}"
            assert row[7] == with_interval(eng["map"][name])
    engine_maps = {r[0]: r for r in tables["Engines: mAP beside the FP32 model"]}
    for name, m in eng["map"].items():
        assert engine_maps[name][1:3] == [with_interval(m), points(m["vs_fp32_model"])]
        assert engine_maps[name][3] == ("(the reference)" if name == eng["reference"] else points(m["vs_reference"]))
    got = {r[0]: r for r in tables["Published figures beside this run's"]}
    for claim in json.loads((out / "results.json").read_text())["claims"]:
        row = next(r for r in got.values() if f"{claim['measured']:+.4f} [{claim['interval'][0]:+.4f}, " in r[3])
        assert row[4] == claim["verdict"]

    notebooks = tables["The lessons, executed"]
    assert [r[0] for r in notebooks] == ["01_tiny.ipynb"]


def test_results_json_holds_every_stage_file(runs):
    out = runs["out"]
    data = json.loads((out / "results.json").read_text())
    for name in course.STAGE_NAMES:
        own = stage_results(out, name)
        meta = own.pop("course_stage")
        st = data["stages"][name]
        assert st["results"] == own and st["seconds"] == meta["seconds"] and st["fingerprint"] == meta["fingerprint"]
    assert data["machine"]["torch"] == torch.__version__


def test_html_report_is_one_self_contained_page(runs):
    out = runs["out"]
    page = (out / "report.html").read_text()
    assert "<link" not in page and "<script" not in page and not re.search(r"src=['\"]https?:", page)
    assert page.count("src='data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) == 3
    base = stage_results(out, "baseline")["fp32"]
    assert f"<td>FP32</td><td>{with_interval(base)}</td>" in page
    assert "published, not measured here" in page
    html_nb = (out / "notebooks" / "01_tiny.html").read_text()
    assert ">A lesson<" in html_nb and "<pre>42\n</pre>" in html_nb  # its markdown and its output, rendered


def test_results_json_has_the_claims_and_their_verdicts(runs):
    from qcourse.yolo import intervals

    data = json.loads((runs["out"] / "results.json").read_text())
    ptq, eng = data["stages"]["ptq"]["results"], data["stages"]["engines"]["results"]
    claims = {c["name"].split(" (measured")[0]: c for c in data["claims"]}
    # histogram's loss, max vs histogram (W8A8 and the stress setting), PyTorch PTQ and QAT vs FP16, TensorRT QAT
    assert len(claims) == 6
    for c in data["claims"]:
        assert set(c) == {"name", "published", "measured", "interval", "verdict"}
        lo, hi = c["interval"]
        assert lo <= c["measured"] <= hi and c["verdict"] in intervals.VERDICTS
        assert c["verdict"] == intervals.verdict(c["published"], c["interval"])
    # each claim is the stage's paired difference, recomputed here from the stored tables
    folder = {"ptq": runs["out"] / "ptq", "engines": runs["out"] / "engines"}
    mse = intervals.load_table(folder["ptq"] / ptq["int8"]["mse"]["matches"])
    fp32 = intervals.load_table(folder["ptq"] / ptq["fp32"]["matches"])
    loss = intervals.paired(fp32, mse)
    c = claims["PTQ, histogram calibration loses about 0.003 mAP"]
    assert c["published"] == 0.003
    assert c["measured"] == pytest.approx(loss["diff"], abs=1e-12)
    assert c["interval"] == pytest.approx(loss["interval"], abs=1e-12)
    best = ptq["best_histogram_vs_max"]["best"]
    assert ptq["int8"][best]["map"] == max(ptq["int8"][m]["map"] for m in ("entropy", "mse", "percentile"))
    gap = intervals.paired(intervals.load_table(folder["ptq"] / ptq["int8"][best]["matches"]),
                           intervals.load_table(folder["ptq"] / ptq["int8"]["max"]["matches"]))
    c = next(v for k, v in claims.items() if k.startswith("max calibration 0.444"))
    assert (c["measured"], c["interval"]) == (gap["diff"], gap["interval"])
    qat = eng["map"]["ORT int8 QAT"]
    vs = intervals.paired(intervals.load_table(folder["engines"] / qat["matches"]),
                          intervals.load_table(folder["engines"] / eng["map"]["ORT fp32"]["matches"]))
    c = next(v for k, v in claims.items() if k.startswith("TensorRT INT8 QAT"))
    assert (c["measured"], c["interval"]) == (vs["diff"], vs["interval"])
    stress = ptq["stress"]["methods"]
    best = max((m for m in stress if m != "max"), key=lambda m: stress[m]["map"])
    gap = intervals.paired(intervals.load_table(folder["ptq"] / stress[best]["matches"]),
                           intervals.load_table(folder["ptq"] / stress["max"]["matches"]))
    c = next(v for v in data["claims"] if "stress setting W8pcA6" in v["name"])
    assert (c["measured"], c["interval"]) == (gap["diff"], gap["interval"])
    qat_dir = runs["out"] / "qat" / "w8a8"
    vs = intervals.paired(intervals.load_table(qat_dir / "qat.npz"), intervals.load_table(qat_dir / "fp32.npz"))
    c = next(v for k, v in claims.items() if k.startswith("PyTorch QAT INT8"))
    assert c["measured"] == pytest.approx(vs["diff"], abs=1e-12) and c["interval"] == pytest.approx(vs["interval"])


def test_every_measured_map_holds_its_value_in_its_interval(runs):
    """Each stored table scores the mAP pycocotools gave the stage, and its interval is the bootstrap's."""
    from qcourse.utils import is_owned
    from qcourse.yolo import intervals

    out = runs["out"]
    data = json.loads((out / "results.json").read_text())["stages"]
    base, ptq, eng = (data[s]["results"] for s in ("baseline", "ptq", "engines"))
    rows = [("baseline", base["fp32"]), ("ptq", ptq["fp32"]), *(("ptq", r) for r in ptq["int8"].values()),
            *(("engines", r) for r in eng["map"].values())]
    for stage, row in rows:
        path = out / stage / row["matches"]
        assert is_owned(path)  # written through atomic_write: a rerun may replace it
        table = intervals.load_table(path)
        assert table.n_images == row["images"]
        b = intervals.bootstrap(table, n=1000, seed=0)
        assert round(b["value"], 4) == row["map"]  # the table is the evaluation the stage reported
        assert row["interval"] == b["interval"] and b["interval"][0] <= b["value"] <= b["interval"][1]
    # the FP32 model, once in the baseline and once in the PTQ stage: the same detections on the same images
    a, b = (intervals.load_table(out / s / "fp32.npz") for s in ("baseline", "ptq"))
    assert np.array_equal(a.image_ids, b.image_ids) and intervals.score(a) == intervals.score(b)
    fp32 = intervals.load_table(out / "ptq" / "fp32.npz")
    for stage, row, key, ref in [*(("ptq", r, "vs_fp32", fp32) for r in ptq["int8"].values()),
                                 *(("engines", r, "vs_fp32_model", fp32) for r in eng["map"].values())]:
        d = intervals.paired(intervals.load_table(out / stage / row["matches"]), ref)
        assert row[key] == {"diff": d["diff"], "interval": d["interval"]}
        assert d["interval"][0] <= d["diff"] <= d["interval"][1]


def test_second_identical_run_skips_every_stage(runs, tiny):
    out = runs["out"]
    before = snapshot(out)
    code, stdout, err = course_cli(out, tiny)
    assert code == 0, err
    assert snapshot(out) == before  # no stage wrote its results again
    assert len(re.findall(r"^\[done\] \w+: done earlier with the same inputs", stdout, re.M)) == len(before) == 8


def test_only_runs_one_stage_and_fresh_redoes_it(runs, tiny):
    out = runs["out"]
    before = snapshot(out)
    code, stdout, err = course_cli(out, tiny, "--only", "baseline")
    assert code == 0 and snapshot(out) == before and "[done] baseline" in stdout and "[done] ptq" not in stdout
    code, stdout, err = course_cli(out, tiny, "--only", "baseline", "--fresh")
    assert code == 0, err
    after = snapshot(out)
    assert [n for n in before if after[n] != before[n]] == ["baseline"]
    redone, earlier = json.loads(after["baseline"][1])["fp32"], json.loads(before["baseline"][1])["fp32"]
    assert [redone[k] for k in ("map", "map50", "images")] == [earlier[k] for k in ("map", "map50", "images")]
    assert "[1/1] baseline: " in stdout


def test_no_warnings_or_engine_logs_from_a_real_process(runs, tiny, tmp_path):
    """ORT logs from C++ and the kernel's warnings bypass sys.stderr: run the engines and notebooks
    stages again in a real process, on a copy of the folder, and read its stderr."""
    out = tmp_path / "copy"
    shutil.copytree(runs["out"], out)
    for stage in ("engines", "notebooks"):
        r = subprocess.run([sys.executable, "-m", "qcourse", "course", "--out", str(out), *tiny["args"], "--fresh",
                            "--only", stage], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", r.stderr
        assert f"[1/1] {stage}: " in r.stdout


# ------------------------------------------------------------------ refused before any stage runs
def one_line_error(code, err) -> str:
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcourse: error: "), err
    return lines[0]


@pytest.mark.parametrize("extra,words", [
    (["--only", "qat"], ["stage qat needs", "stage ptq", "--only ptq"]),
    (["--only", "export", "--skip", "demo"], ["--only or --skip, not both"]),
    (["--only", "nope"], ["--only", "'nope'", "baseline"]),
    (["--skip", "qat"], ["stage export needs", "stage qat"]),
])
def test_bad_choices_are_one_line_before_any_work(tiny, tmp_path, extra, words):
    code, out, err = course_cli(tmp_path / "out", tiny, *extra)
    line = one_line_error(code, err)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "out" / "demo").exists()


def test_foreign_out_folder_is_refused(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    line = one_line_error(*course_cli(tmp_path / "mine", tiny, "--only", "demo")[::2])
    assert "--out" in line and "thesis.tex" in line and "pass a new or empty folder" in line
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_weights_that_do_not_fit_the_data_are_refused(tiny, tmp_path):
    from qcourse.yolo.models import build_model, get_config, save_checkpoint

    cfg = get_config("yolov7-tiny", 3)
    cfg["width_multiple"] = 0.25
    three = save_checkpoint(build_model(cfg), tmp_path / "three.pt", img_size=64)
    args = [a if a != str(tiny["weights"]) else str(three) for a in tiny["args"]]
    code, out, err = course_cli(tmp_path / "out", {"args": args}, "--only", "baseline")
    line = one_line_error(code, err)
    assert "predicts 3 classes" in line and "6 categories" in line and "three.pt" in line


def test_fingerprints_follow_the_inputs(tiny):
    """A setting changes the fingerprint of the stages that use it and of every stage after them."""
    from qcourse.course.stages import CourseConfig

    notebooks = course.find_notebooks(tiny["notebooks"])
    base = CourseConfig(weights=tiny["weights"], coco=tiny["coco"], notebooks=tiny["notebooks"])
    fps, _ = course._fingerprints(base, notebooks)
    assert course._fingerprints(base, notebooks)[0] == fps  # deterministic

    def changed(**kw):
        other = course._fingerprints(CourseConfig(**{**base.__dict__, **kw}), notebooks)[0]
        return [n for n in course.STAGE_NAMES if other[n] != fps[n]]

    assert changed(calib_batches=2) == ["ptq", "sensitivity", "qat", "export", "engines"]
    assert changed(scan_batches=3) == ["sensitivity"]
    assert changed(qat_iters=3) == ["qat", "export", "engines"]
    assert changed(seed=1) == ["demo", "sensitivity", "qat", "export", "engines"]  # the scan's random draws
    assert changed(bench_iterations=3) == ["engines"]
    assert changed(device="cuda:0") == list(YOLO_STAGES)
    assert changed(timeout=5, fresh=True, only="demo") == []  # how to run, not what is computed


def test_engines_are_tensorrt_on_a_gpu_with_tensorrt_else_onnxruntime(monkeypatch):
    from qcourse import engines
    from qcourse.course import stages

    monkeypatch.setattr(engines, "available_backends", lambda: {"onnxruntime": (True, "1"), "tensorrt": (True, "10")})
    assert [s[0] for s in stages._engine_specs("cuda:0")] == ["TRT fp16", "TRT int8 PTQ", "TRT int8 QAT"]
    assert [s[0] for s in stages._engine_specs("cpu")] == ["ORT fp32", "ORT int8 PTQ", "ORT int8 QAT"]
    monkeypatch.setattr(engines, "available_backends", lambda: {"onnxruntime": (True, "1"), "tensorrt": (False, "no")})
    assert stages._engine_specs("cuda")[0][2:4] == ("onnxruntime", "fp32")


@pytest.mark.parametrize("kind,same,fresh,kept", [
    ("plain", True, False, False),        # e.g. ptq: an interrupted run's leftovers never pile up
    ("resumable", True, False, True),     # sensitivity, qat: resume the interrupted run with the same inputs
    ("resumable", False, False, False),   # ... but never one made with other inputs
    ("resumable", True, True, False),     # --fresh starts over
    ("keep_files", False, False, True),   # notebooks: each notebook has its own fingerprint
    ("keep_files", True, True, False),
])
def test_stage_folder_is_emptied_unless_it_can_resume(tmp_path, kind, same, fresh, kept):
    from qcourse.utils import atomic_write

    folder = tmp_path / "stage"
    for name, text in ((".inputs.json", json.dumps({"fingerprint": "abc"})), ("partial.bin", "work before Ctrl-C"),
                       ("results.json", "{}"), ("w8a8/last.pt", "a run's checkpoint")):
        with atomic_write(folder / name) as tmp:  # the stage's own files, as qcourse wrote them
            tmp.write_text(text)
    (folder / "w8a8" / "mine.txt").write_text("a user's file")  # never deleted, whatever the stage does
    st = course.Stage("x", "a stage", lambda ctx: {}, str, lambda c, nb: {}, resumable=kind == "resumable",
                      keep_files=kind == "keep_files")
    course._prepare_folder(folder, "abc" if same else "def", fresh, st)
    assert (folder / "partial.bin").exists() == kept and (folder / "w8a8" / "last.pt").exists() == kept
    assert (folder / "w8a8" / "mine.txt").read_text() == "a user's file"
    assert not (folder / "results.json").exists()  # never done until the stage writes it again
    assert json.loads((folder / ".inputs.json").read_text())["fingerprint"] == ("abc" if same else "def")
