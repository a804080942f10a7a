"""The commands never lose a user's file, and a disk that refuses a write is a one-line user error.

qcourse replaces and deletes only the files it wrote (qcourse.utils: each folder's
``.qcourse-files.json``); a file of the same name that it did not write is refused before any
work, with one line naming it. A full, read-only or impossible ``--out`` (a path under a regular
file fails even for root) prints one line naming the path and the fix, and exits 2.

Slow work is replaced by stubs: the checks must come before it.
"""
import errno
import json
import os
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qcourse.course import cli, run as course
from qcourse.export import export_onnx
from qcourse.utils import OWNED_LIST, atomic_write, is_owned, remove_owned_tree

from cli_helpers import error_line as one_line, run_cli


def user_file(path: Path, text: str = "the user's own file") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refuse(*a, **k):
    raise AssertionError("the command started working instead of refusing")


@pytest.fixture
def tiny_onnx(tmp_path):
    """A float ONNX of one conv on 3x8x8 images (dynamic batch), exported by qcourse."""
    torch.manual_seed(0)
    return export_onnx(torch.nn.Conv2d(3, 4, 3, padding=1).eval(), torch.zeros(1, 3, 8, 8),
                       tmp_path / "src" / "tiny.onnx")


def _graph(tmp_path, name, nodes, inputs, opsets):
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [value(i) for i in inputs], [value("y")]),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    onnx.save(model, str(tmp_path / name))
    return tmp_path / name


# ------------------------------------------------------------------ how a folder is emptied
def test_remove_owned_tree_keeps_what_qcourse_did_not_write(tmp_path):
    def ours(path, text="qcourse's"):
        with atomic_write(path) as tmp:
            tmp.write_text(text)

    root = tmp_path / "stage"
    ours(root / "results.json")
    ours(root / "w8a8" / "last.pt")
    ours(root / "only_ours" / "a.json")
    ours(root / "moved.onnx")
    (root / "moved.onnx").rename(tmp_path / "moved.onnx")  # listed, but gone: its entry is dropped
    ours(root / "edited.json")
    (root / "edited.json").write_text("edited by hand")
    user_file(root / "w8a8" / "notes.md")
    assert not remove_owned_tree(root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        OWNED_LIST, "edited.json", "w8a8", "w8a8/notes.md"]
    assert json.loads((root / OWNED_LIST).read_text())["files"].keys() == {"edited.json"}
    (root / "edited.json").unlink()
    assert remove_owned_tree(root) is False and sorted(p.name for p in root.iterdir()) == ["w8a8"]
    (root / "w8a8" / "notes.md").unlink()
    assert remove_owned_tree(root) and not root.exists()


# ------------------------------------------------------------------ build
def test_build_refuses_a_users_engine_file_before_exporting(tmp_path, monkeypatch, capsys):
    from qcourse.yolo import engines

    monkeypatch.setattr(engines, "export_default_onnx", refuse)
    mine = user_file(tmp_path / "keep.onnx")
    code, out, err = run_cli(["build", "--out", mine], capsys)
    line = one_line(err)
    assert code == 2 and str(mine) in line and "not written by qcourse" in line
    assert mine.read_text() == "the user's own file"


def test_build_refuses_a_users_export_beside_out(tmp_path, monkeypatch, capsys):
    from qcourse.yolo import engines

    monkeypatch.setattr(engines, "export_default_onnx", refuse)
    mine = user_file(tmp_path / "qdq.onnx")
    code, out, err = run_cli(["build", "--out", tmp_path / "int8.onnx"], capsys)
    assert code == 2 and str(mine) in one_line(err) and mine.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"]


def test_build_into_a_folder_is_one_line_naming_it(tmp_path, tiny_onnx, capsys):
    folder = tmp_path / "engines.onnx"
    folder.mkdir()
    code, out, err = run_cli(["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", folder], capsys)
    line = one_line(err)
    assert code == 2 and f"--out {folder} is a folder" in line and str(folder / "onnxruntime_fp32.onnx") in line
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("kind", ["two inputs", "custom op domain"])
def test_failed_build_keeps_the_engine_it_would_replace(tmp_path, tiny_onnx, kind, capsys):
    keep = tmp_path / "keep.onnx"
    code, out, err = run_cli(["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", keep], capsys)
    assert code == 0 and is_owned(keep), err
    before = keep.read_bytes()
    if kind == "two inputs":
        bad = _graph(tmp_path, "two.onnx", [helper.make_node("Add", ["a", "b"], ["y"])], ["a", "b"], [("", 13)])
        words = "has 2 inputs"
    else:
        bad = _graph(tmp_path, "custom.onnx", [helper.make_node("Foo", ["x"], ["y"], domain="my.ops")], ["x"],
                     [("", 13), ("my.ops", 1)])
        words = "ONNX Runtime cannot load"
    code, out, err = run_cli(["build", "--onnx", bad, "--precision", "fp32", "--out", keep], capsys)
    assert keep.read_bytes() == before  # validated first, written last
    line = one_line(err)
    assert code == 2 and words in line and str(bad) in line  # the file at fault
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != OWNED_LIST) == []


# ------------------------------------------------------------------ bench
def _engine(tmp_path, tiny_onnx, capsys) -> Path:
    engine = tmp_path / "engines" / "fp32.onnx"
    assert run_cli(["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", engine], capsys)[0] == 0
    return engine


BENCH = ["--no-map", "--batch", "1", "--iterations", "1", "--warmup", "0", "--threads", "1"]


def test_bench_refuses_to_replace_a_users_chart(tmp_path, tiny_onnx, monkeypatch, capsys):
    from qcourse.engines import bench

    engine = _engine(tmp_path, tiny_onnx, capsys)
    monkeypatch.setattr(bench, "benchmark", refuse)
    png = user_file(tmp_path / "d" / "plot.png", "the user's chart")
    code, out, err = run_cli(["bench", "--engine", engine, *BENCH, "--json", tmp_path / "d" / "plot.json"], capsys)
    line = one_line(err)
    assert code == 2 and str(png) in line and "not written by qcourse" in line
    assert png.read_text() == "the user's chart" and not (tmp_path / "d" / "plot.json").exists()


def test_bench_writes_both_files_as_qcourse_s_and_refuses_a_png_json(tmp_path, tiny_onnx, capsys):
    engine = _engine(tmp_path, tiny_onnx, capsys)
    target = tmp_path / "d" / "plot.json"
    code, out, err = run_cli(["bench", "--engine", engine, *BENCH, "--json", target], capsys)
    assert code == 0, err
    assert is_owned(target) and is_owned(target.with_suffix(".png"))
    assert json.loads(target.read_text())["results"]
    code, out, err = run_cli(["bench", "--engine", engine, *BENCH, "--json", tmp_path / "d" / "plot.png"], capsys)
    assert code == 2 and "pass a path ending in .json" in one_line(err)


# ------------------------------------------------------------------ a disk that refuses
def test_out_under_a_regular_file_is_one_line_in_every_command(tmp_path, tiny_onnx, monkeypatch, capsys):
    from qcourse.yolo import ptq as yptq
    from qcourse.yolo import sensitivity as ys

    monkeypatch.setattr(yptq, "_prepare", refuse)
    monkeypatch.setattr(ys, "prepare", refuse)
    monkeypatch.setattr(course, "run_demo", refuse)
    engine = _engine(tmp_path, tiny_onnx, capsys)
    blocker = user_file(tmp_path / "a_file")
    cases = [
        ["ptq", "--out", blocker / "ptq"],
        ["sensitivity", "--out", blocker / "sens"],
        ["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", blocker / "x.onnx"],
        ["bench", "--engine", engine, *BENCH, "--json", blocker / "b.json"],
        ["course", "--only", "demo", "--out", blocker / "course"],
    ]
    for argv in cases:
        code, out, err = run_cli(argv, capsys)
        line = one_line(err)
        assert code == 2 and str(blocker) in line, (argv, line)
        assert ("not a directory" in line and "a part of the path is a file, not a folder" in line) or \
            ("file exists" in line and "is in the way" in line), line  # mkdir -p meets the file itself
    assert blocker.read_text() == "the user's own file"


def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() or fsync() raise it: no file named


def test_a_full_disk_is_one_line_naming_out_and_the_fix(tmp_path, tiny_onnx, monkeypatch, capsys):
    from qcourse.yolo import ptq as yptq

    engine = _engine(tmp_path, tiny_onnx, capsys)
    monkeypatch.setattr(os, "fsync", _disk_full)  # every file qcourse writes is fsync'ed before its rename
    monkeypatch.setattr(yptq, "_prepare", _disk_full)
    cases = [
        (["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", tmp_path / "full" / "x.onnx"], "--out"),
        (["bench", "--engine", engine, *BENCH, "--json", tmp_path / "full" / "b.json"], "--json"),
        (["ptq", "--out", tmp_path / "full" / "ptq"], "--out"),
    ]
    for argv, option in cases:
        code, out, err = run_cli(argv, capsys)
        line = one_line(err)
        assert code == 2, (argv, err)
        assert line == f"qcourse: error: no space left on device: {argv[-1]} ({option}); free space or pick " \
                       "another --out", line
    assert not (tmp_path / "full" / "x.onnx").exists()


def test_a_read_only_disk_names_the_file_not_its_temporary_copy(tmp_path, tiny_onnx, monkeypatch, capsys):
    import tempfile

    def read_only(*a, dir=None, prefix="", **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}k3j_x9qa.onnx"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    target = tmp_path / "ro" / "x.onnx"
    code, out, err = run_cli(["build", "--onnx", tiny_onnx, "--precision", "fp32", "--out", target], capsys)
    assert code == 2
    assert one_line(err) == (f"qcourse: error: read-only file system: {target}; pick a location you may write "
                             "(e.g. another --out)")


# ------------------------------------------------------------------ the course run
def _stub_demo(monkeypatch, calls=None):
    def demo(out_dir, seed=0, echo=print):
        if calls is not None:
            calls.append(out_dir)
        with atomic_write(Path(out_dir) / "digits_int8.onnx") as tmp:
            tmp.write_bytes(b"an export")
        return {"fp32": 0.97, "int8 max": 0.96, "int8 onnxruntime": 0.96}

    monkeypatch.setattr(course, "run_demo", demo)


def test_course_never_takes_a_folder_holding_a_users_files(tmp_path, monkeypatch, capsys):
    _stub_demo(monkeypatch)
    out = tmp_path / "X"
    data, notes = user_file(out / "demo" / "mydata.txt"), user_file(out / "demo" / "notes.md")
    code, _, err = run_cli(["course", "--out", out, "--only", "demo"], capsys)
    line = one_line(err)
    assert code == 2 and "--out" in line and "pass a new or empty folder" in line
    assert data.read_text() == notes.read_text() == "the user's own file"
    assert sorted(p.name for p in out.rglob("*")) == ["demo", "mydata.txt", "notes.md"]


def test_course_fresh_deletes_only_its_own_files(tmp_path, monkeypatch, capsys):
    calls = []
    _stub_demo(monkeypatch, calls)
    out = tmp_path / "X"
    assert run_cli(["course", "--out", out, "--only", "demo"], capsys)[0] == 0
    data = user_file(out / "demo" / "mydata.txt")
    assert run_cli(["course", "--out", out, "--only", "demo", "--fresh"], capsys)[0] == 0
    assert len(calls) == 2 and data.read_text() == "the user's own file"
    for name in ("digits_int8.onnx", "results.json", "log.txt", ".inputs.json"):
        assert is_owned(out / "demo" / name), name
    for name in ("results.json", "report.md", "report.html", ".qcourse-course"):
        assert is_owned(out / name), name


def test_course_refuses_a_users_file_of_a_stage_s_name_before_running(tmp_path, monkeypatch, capsys):
    calls = []
    _stub_demo(monkeypatch, calls)
    out = tmp_path / "X"
    assert run_cli(["course", "--out", out, "--only", "demo"], capsys)[0] == 0
    report = user_file(out / "report.md", "the user's report")
    code, _, err = run_cli(["course", "--out", out, "--only", "demo", "--fresh"], capsys)
    assert code == 2 and str(report) in one_line(err) and len(calls) == 1
    assert report.read_text() == "the user's report"


def test_an_edited_stage_result_is_one_line_and_the_report_is_kept(tmp_path, monkeypatch, capsys):
    calls = []
    _stub_demo(monkeypatch, calls)
    out = tmp_path / "X"
    assert run_cli(["course", "--out", out, "--only", "demo"], capsys)[0] == 0
    stage = out / "demo" / "results.json"
    record = json.loads(stage.read_text())
    del record["accuracy"]  # edited by hand, fingerprint kept
    stage.write_text(json.dumps(record, indent=1))
    top = {name: (out / name).read_bytes() for name in ("results.json", "report.md", "report.html")}
    code, _, err = run_cli(["course", "--out", out, "--only", "demo"], capsys)
    line = one_line(err)
    assert code == 2 and str(stage) in line and "move it away" in line and "--only demo" in line
    assert {name: (out / name).read_bytes() for name in top} == top and len(calls) == 1


def test_course_qat_stage_refuses_an_edited_finished_run(tmp_path, monkeypatch):
    from qcourse.course import stages
    from qcourse.yolo import qat

    monkeypatch.setattr(qat, "run_qat", refuse)
    folder = tmp_path / "qat"
    with atomic_write(folder / "w8a8" / "results.json") as tmp:
        tmp.write_text(json.dumps({"table": []}))
    (folder / "w8a8" / "results.json").write_text(json.dumps({"edited": True}))
    ctx = stages.StageContext(stages.CourseConfig(out=tmp_path), folder, {}, lambda line: None)
    with pytest.raises(ValueError, match=r"w8a8/results\.json was changed after qcourse wrote it.*move it away"):
        stages.qat(ctx)
