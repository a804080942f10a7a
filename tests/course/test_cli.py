"""Tests of the ``qcourse`` command (qcourse.course.cli) and of how ``qcourse course`` runs the notebooks.

The contract: a user error prints ONE line ``qcourse: error: ...`` naming the bad value and
the fix, with no traceback, and exits 2 (Ctrl-C: one line, 130; a failing notebook: one
line, 1); ``--debug``/``QCOURSE_DEBUG=1`` keep the traceback. Commands are called
in-process through ``main(argv)``; the slow entry points they would reach are replaced by
stubs that fail the test, so a value refused too late shows up as a failure, not a long run.
Training through the command is tested in test_train.py (it needs a dataset).
"""
import argparse
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient.exceptions import CellExecutionError, DeadKernelError

import qcourse
from qcourse.course import cli, run as course
from qcourse.utils import OWNED_LIST, atomic_write, is_owned

from cli_helpers import one_line, run_cli


@pytest.fixture
def no_work(monkeypatch):
    """Every slow entry point a command reaches fails the test: errors must come before them."""
    from qcourse.yolo import models
    from qcourse.yolo import datasets, train

    def refuse(*a, **k):
        raise AssertionError("the command started working instead of refusing its arguments")

    for owner, name in ((course, "run_demo"), (course, "run_notebooks"), (train, "train"),
                        (datasets, "ensure_default_dataset"), (models, "load_checkpoint")):
        monkeypatch.setattr(owner, name, refuse)


# ------------------------------------------------------------------ no command, --version, help
def test_bare_qcourse_prints_help_and_exits_2(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2
    assert err.startswith("usage: qcourse") and "train" in err and "eval" in err


def test_version(capsys):
    code, out, err = run_cli(["--version"], capsys)
    assert code == 0 and out == f"qcourse {qcourse.__version__}\n"


def _real_command(*args):
    return subprocess.run([sys.executable, "-m", "qcourse", *args], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])


def test_real_command_bare_exits_2_and_version():
    bare = _real_command()
    assert bare.returncode == 2 and "usage: qcourse" in bare.stderr and "Traceback" not in bare.stderr
    version = _real_command("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"qcourse {qcourse.__version__}"


def test_real_command_user_error_is_one_line():
    r = _real_command("train", "--img-size", "0")
    assert r.returncode == 2 and r.stdout == ""
    assert "--img-size" in one_line(r.stderr)


def _subcommands():
    ap = cli._build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_explains_itself_with_its_default():
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"qcourse {name} {action.option_strings}"
            assert action.help and len(action.help) > 15, f"{where} has no help"
            if action.required:                      # nothing to fall back on: no default to show
                continue
            if action.default not in (None, False):  # a value the user would want to know
                shown = {str(action.default)}
                if isinstance(action.default, (list, tuple)):   # nargs: shown as typed, "1 8 32"
                    shown.add(" ".join(map(str, action.default)))
                assert "%(default)s" in action.help or any(v in action.help for v in shown), where
            else:
                assert "default" in action.help or action.const is True, where


# ------------------------------------------------------------------ bad values: one line, exit 2
@pytest.mark.parametrize("argv,names", [
    (["train", "--img-size", "0"], ["--img-size", "0", "32"]),
    (["train", "--img-size", "100"], ["--img-size", "100", "96"]),
    (["train", "--img-size", "big"], ["--img-size", "big"]),
    (["train", "--epochs", "0"], ["--epochs", "0", ">= 1"]),
    (["train", "--batch-size", "0"], ["--batch-size", "0", ">= 1"]),
    (["train", "--eval-every", "0"], ["--eval-every", "0", ">= 1"]),
    (["train", "--lr", "-1"], ["--lr", "-1", "> 0"]),
    (["train", "--lr", "nan"], ["--lr", "nan"]),
    (["train", "--max-minutes", "0"], ["--max-minutes", "0"]),
    (["train", "--seed", "-3"], ["--seed", "-3"]),
    (["train", "--arch", "yolov9"], ["--arch", "yolov9", "yolov7-tiny"]),
    (["train", "--data", "no/such/folder"], ["--data", "no/such/folder", "does not exist"]),
    (["train", "--init", "no/such.pt"], ["--init", "no/such.pt", "checkpoint"]),
    (["eval", "--weights", "no/such.pt"], ["--weights", "no/such.pt", "checkpoint"]),
    (["eval", "--max-batches", "0"], ["--max-batches", "0"]),
    (["eval", "--img-size", "33"], ["--img-size", "33", "32"]),
    (["eval", "--device", "tpu"], ["--device", "tpu", "cpu"]),
    (["eval", "--device", "cuda:x"], ["--device", "cuda:x", "cuda:N"]),
    (["course", "--timeout", "0"], ["--timeout", "0"]),
    (["course", "--notebooks", "no/such/folder"], ["--notebooks", "no/such/folder"]),
    (["demo", "--seed", "x"], ["--seed", "'x'"]),
])
def test_bad_value_is_one_line_naming_it(argv, names, no_work, capsys):
    code, out, err = run_cli(argv, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("qcourse: error: ")
    for n in names:
        assert n in line, f"{n!r} not in {line!r}"
    assert f"qcourse {argv[0]} --help" in line  # where to read about the option


def test_cuda_without_gpu_is_refused_before_loading(monkeypatch, no_work, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(["eval", "--device", "cuda"], capsys)
    line = one_line(err)
    assert code == 2 and "--device" in line and "cuda" in line and "pass --device cpu" in line


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch, no_work, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, out, err = run_cli(["eval", "--device", "cuda:2"], capsys)
    line = one_line(err)
    assert code == 2 and "cuda:2" in line and "2 CUDA device" in line and "cuda:1" in line


def test_unknown_option_is_one_line(no_work, capsys):
    code, out, err = run_cli(["train", "--epocs", "3"], capsys)
    assert code == 2 and "--epocs" in one_line(err)


# ------------------------------------------------------------------ errors raised by the code
def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, out, err = run_cli(["eval", "--weights", junk], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("qcourse: error: ") and str(junk) in line  # a CheckpointError


def test_debug_flag_and_env_keep_the_traceback(tmp_path, monkeypatch, capsys):
    from qcourse.yolo.models import CheckpointError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        cli.main(["--debug", "eval", "--weights", str(junk)])
    monkeypatch.setenv("QCOURSE_DEBUG", "1")
    with pytest.raises(CheckpointError):
        cli.main(["eval", "--weights", str(junk)])


def _raising(exc):
    def stub(*a, **k):
        raise exc
    return stub


@pytest.mark.parametrize("exc,words", [
    (ValueError("batch_size=64 is larger than the training set (40 images); pass at most 40"), ["batch_size=64"]),
    (FileNotFoundError(2, "No such file or directory", "runs/x/last.pt"), ["runs/x/last.pt", "check the path"]),
    (PermissionError(13, "Permission denied", "/root/runs"), ["/root/runs", "another --out"]),
    (NotADirectoryError(20, "Not a directory", "a/file/b"), ["a/file/b"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["no space left on device: runs/demo (--out)",
                                                        "free space or pick another --out"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), ["/mnt/ro/x", "pick a location you may write"]),
    (OSError(errno.EIO, "Input/output error", "/mnt/x", None, "/mnt/y"), ["/mnt/y", "check the path and the disk"]),
])
def test_user_errors_from_the_code_are_one_line(exc, words, monkeypatch, capsys):
    monkeypatch.setattr(course, "run_demo", _raising(exc))
    code, out, err = run_cli(["demo"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("qcourse: error: ")
    for w in words:
        assert w in line


def test_type_error_from_our_validation_is_one_line(monkeypatch, capsys):
    from qcourse.yolo.evaluate import evaluate

    # evaluate() refuses a loader that is not over a CocoDetection with a TypeError of its own
    monkeypatch.setattr(course, "run_demo", lambda *a, **k: evaluate(lambda x: x, [1, 2]))
    code, out, err = run_cli(["demo"], capsys)
    assert code == 2 and "create_dataloader" in one_line(err)


def test_type_error_from_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(course, "run_demo", lambda *a, **k: len(5))  # Python's own TypeError
    with pytest.raises(TypeError, match="has no len"):
        cli.main(["demo"])


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(course, "run_demo", _raising(KeyboardInterrupt()))
    code, out, err = run_cli(["demo"], capsys)
    assert code == 130 and one_line(err) == "qcourse: interrupted"


# ------------------------------------------------------------------ qcourse course: the notebooks
class FakeClient:
    """Stands in for nbclient.NotebookClient: a code cell "ok" prints, "fail" raises in the
    kernel, "ctrl-c" is Ctrl-C reaching this process, "kernel-ctrl-c" Ctrl-C reaching the
    kernel, "nbclient-ctrl-c" what nbclient does on Ctrl-C: its handler shuts the kernel down
    (and records a cleanup future), then the cell's wait ends with "kernel died"."""

    def __init__(self, nb, **kwargs):
        self.nb = nb

    def execute(self, **kwargs):
        for n, cell in enumerate(self.nb.cells, 1):
            cell.execution_count = n
            if cell.source == "ctrl-c":
                raise KeyboardInterrupt
            if cell.source == "nbclient-ctrl-c":
                self._async_cleanup_kernel_future = object()
                raise DeadKernelError("Kernel died")
            if cell.source in ("fail", "kernel-ctrl-c"):
                ename = "ValueError" if cell.source == "fail" else "KeyboardInterrupt"
                cell.outputs = [nbformat.v4.new_output("error", ename=ename, evalue="boom", traceback=[])]
                raise CellExecutionError("a long traceback", ename, "boom")
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]


@pytest.fixture
def fake_kernel(monkeypatch):
    import nbclient

    monkeypatch.setattr(nbclient, "NotebookClient", FakeClient)


def _notebooks(folder: Path, cells: dict):
    """Write notebooks ``{name: [code cell sources]}`` into ``folder``; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, sources in cells.items():
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
        nbformat.write(nb, folder / name)
    return course.find_notebooks(folder)


LESSONS = ["01_math.ipynb", "02_quant.ipynb", "03_tensor_quantizer.ipynb", "04_calib.ipynb"]


def _saved(out: Path):
    """The notebooks in ``out`` (``kernel.log`` holds the kernels' own messages, ``.qcourse-files.json``
    lists the files qcourse wrote there)."""
    return sorted(p.name for p in out.iterdir() if p.name not in (course.KERNEL_LOG, OWNED_LIST))


def _written_by_qcourse(path: Path, text: str) -> Path:
    """``path`` with ``text``, written as qcourse writes its files (an earlier run's)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


@pytest.mark.parametrize("signal", ["ctrl-c", "kernel-ctrl-c", "nbclient-ctrl-c"])
def test_interrupted_notebook_leaves_no_file_under_its_name(tmp_path, fake_kernel, signal):
    paths = _notebooks(tmp_path / "nb", dict(zip(LESSONS, [["ok"], ["ok", "ok"], ["ok", signal], ["ok"]])))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as info:
        course.run_notebooks(paths, out, echo=lambda *a: None)
    assert _saved(out) == LESSONS[:2]  # no partial copy, no temporary file
    for name in LESSONS[:2]:
        nb = nbformat.read(out / name, as_version=4)
        assert all(c.outputs[0].text == "ran\n" for c in nb.cells)  # complete runs
    assert isinstance(info.value, course.NotebooksInterrupted)
    assert str(info.value) == "interrupted during 03_tensor_quantizer.ipynb; finished: 01, 02"


def test_failed_notebook_keeps_its_copy_under_another_name(tmp_path, fake_kernel):
    paths = _notebooks(tmp_path / "nb", dict(zip(LESSONS, [["ok"], ["ok", "fail", "ok"], ["ok"]])))
    out = tmp_path / "out"
    _written_by_qcourse(out / "02_quant.failed.ipynb", "{}")  # from an earlier failure: replaced below
    with pytest.raises(course.NotebookFailed, match=r"02_quant.ipynb failed in code cell 2: ValueError: boom"):
        course.run_notebooks(paths, out, echo=lambda *a: None)
    assert _saved(out) == ["01_math.ipynb", "02_quant.failed.ipynb"]
    failed = nbformat.read(out / "02_quant.failed.ipynb", as_version=4)
    assert failed.cells[1].outputs[0].output_type == "error" and failed.cells[2].outputs == []


def test_success_replaces_an_earlier_failed_copy(tmp_path, fake_kernel):
    paths = _notebooks(tmp_path / "nb", {"01_math.ipynb": ["ok"]})
    out = tmp_path / "out"
    _written_by_qcourse(out / "01_math.failed.ipynb", "{}")
    rows = course.run_notebooks(paths, out, echo=lambda *a: None)
    assert [r["notebook"] for r in rows] == ["01_math.ipynb"]
    assert _saved(out) == ["01_math.ipynb"]
    assert is_owned(out / "01_math.ipynb") and is_owned(out / course.KERNEL_LOG)


def test_real_kernel_failure_is_reported_and_not_saved(tmp_path):
    """The same contract with a real Jupyter kernel (one short notebook)."""
    paths = _notebooks(tmp_path / "nb", {"01_fails.ipynb": ["x = 1", "raise ValueError('real boom')"]})
    out = tmp_path / "out"
    with pytest.raises(course.NotebookFailed, match="01_fails.ipynb failed in code cell 2: ValueError: real boom"):
        course.run_notebooks(paths, out, timeout=60, echo=lambda *a: None)
    assert _saved(out) == ["01_fails.failed.ipynb"]
    assert "01_fails.ipynb" in (out / course.KERNEL_LOG).read_text()  # the kernel's messages went there


def test_real_ctrl_c_while_a_cell_runs(tmp_path):
    """SIGINT to this process while a real kernel runs a cell: nbclient's own handler shuts the
    kernel down, and run_notebooks still reports an interruption, not a failure."""
    started = tmp_path / "started"
    paths = _notebooks(tmp_path / "nb", {"01_slow.ipynb": [
        f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(120)"]})

    def press_ctrl_c_once_the_cell_runs():
        for _ in range(600):
            if started.exists():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    threading.Thread(target=press_ctrl_c_once_the_cell_runs, daemon=True).start()
    out = tmp_path / "out"
    with pytest.raises(course.NotebooksInterrupted, match="interrupted during 01_slow.ipynb; finished: none"):
        course.run_notebooks(paths, out, timeout=300, echo=lambda *a: None)
    assert _saved(out) == []


def test_course_ctrl_c_says_what_finished_and_how_to_rerun(tmp_path, fake_kernel, monkeypatch, capsys):
    _notebooks(tmp_path / "nb", dict(zip(LESSONS, [["ok"], ["ok"], ["ctrl-c"], ["ok"]])))
    argv = ["course", "--out", tmp_path / "out", "--notebooks", tmp_path / "nb", "--only", "notebooks"]
    code, out, err = run_cli(argv, capsys)
    assert code == 130
    assert one_line(err) == ("qcourse: interrupted in stage notebooks (during 03_tensor_quantizer.ipynb; notebooks "
                             "finished: 01, 02); finished stages are kept (none yet): rerun the same command to "
                             "continue")
    assert not (tmp_path / "out" / "notebooks" / LESSONS[2]).exists()
    # the rerun keeps the two finished notebooks and runs the others
    _notebooks(tmp_path / "nb", {LESSONS[2]: ["ok"]})
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert [n for n in LESSONS if f"running {n}" in out] == LESSONS[2:]


def test_course_ctrl_c_in_the_demo(tmp_path, monkeypatch, no_work, capsys):
    monkeypatch.setattr(course, "run_demo", _raising(KeyboardInterrupt()))
    code, out, err = run_cli(["course", "--out", tmp_path / "out", "--only", "demo"], capsys)
    assert code == 130
    assert one_line(err) == ("qcourse: interrupted in stage demo; finished stages are kept (none yet): rerun the "
                             "same command to continue")


def test_course_fresh_notebooks_keep_a_users_files(tmp_path, fake_kernel, capsys):
    _notebooks(tmp_path / "nb", dict(zip(LESSONS[:2], [["ok"], ["ok"]])))
    argv = ["course", "--out", tmp_path / "out", "--notebooks", tmp_path / "nb", "--only", "notebooks"]
    assert run_cli(argv, capsys)[0] == 0
    executed = tmp_path / "out" / "notebooks"
    data = executed / "data.csv"
    data.write_text("a,b\n1,2\n")
    code, out, err = run_cli([*argv, "--fresh"], capsys)
    assert code == 0, err
    assert data.read_text() == "a,b\n1,2\n"  # --fresh deletes only what qcourse wrote
    assert all(f"running {n}" in out for n in LESSONS[:2])
    for name in (*LESSONS[:2], "01_math.html", course.KERNEL_LOG, "log.txt", "results.json"):
        assert is_owned(executed / name), name


def test_course_refuses_a_users_notebook_of_the_same_name_before_running(tmp_path, fake_kernel, capsys):
    _notebooks(tmp_path / "nb", dict(zip(LESSONS[:2], [["ok"], ["ok"]])))
    argv = ["course", "--out", tmp_path / "out", "--notebooks", tmp_path / "nb", "--only", "notebooks"]
    assert run_cli(argv, capsys)[0] == 0
    mine = tmp_path / "out" / "notebooks" / LESSONS[1]
    mine.write_text("my own edited copy")  # no longer the file qcourse wrote
    (tmp_path / "nb" / LESSONS[0]).write_text((tmp_path / "nb" / LESSONS[0]).read_text() + " ")  # changed: reruns
    code, out, err = run_cli(argv, capsys)
    line = one_line(err)
    assert code == 2 and str(mine) in line and "not written by qcourse" in line and "running" not in out
    assert mine.read_text() == "my own edited copy"


def test_course_failed_notebook_is_one_line_exit_1(tmp_path, fake_kernel, monkeypatch, capsys):
    _notebooks(tmp_path / "nb", dict(zip(LESSONS, [["ok"], ["fail"]])))
    code, out, err = run_cli(["course", "--out", tmp_path / "out", "--notebooks", tmp_path / "nb",
                              "--only", "notebooks"], capsys)
    line = one_line(err)
    assert code == 1 and "02_quant.ipynb failed in code cell 1: ValueError: boom" in line
    assert "02_quant.failed.ipynb" in line


def test_course_notebooks_folder_without_lessons_is_refused_before_the_demo(tmp_path, no_work, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["course", "--notebooks", tmp_path / "empty"], capsys)
    line = one_line(err)
    assert code == 2 and str(tmp_path / "empty") in line and "NN_*.ipynb" in line
