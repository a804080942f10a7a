"""The course end to end, from the command line: ``qcourse course`` reproduces the course's results.

:func:`run_course` runs the course in stages, each cached in its own folder under ``OUT``:

======================  =====================================================================
``demo``                :func:`run_demo`: a digits CNN quantized, calibrated with every method,
                        exported to Q/DQ ONNX and checked in ONNX Runtime (lessons 1-4)
``baseline`` ...        the YOLOv7 stages of lessons 5-8 (:mod:`qcourse.course.stages`)
``engines``
``notebooks``           every lesson notebook executed with nbclient (:func:`run_notebooks`)
                        and rendered to HTML
======================  =====================================================================

A stage counts as done when ``OUT/<stage>/results.json`` (written last, atomically) records
the fingerprint of the stage's inputs: its settings, the model and data, the stages it needs
and qcourse's code; one changed since qcourse wrote it is refused, not read. A rerun skips done
stages; ``fresh`` redoes them, ``only`` / ``skip`` choose stages. The run replaces and deletes
only the files qcourse wrote (:func:`qcourse.utils.atomic_write`,
:func:`qcourse.utils.remove_owned_tree`): a user's file in ``OUT`` is never lost. Ctrl-C stops
the running stage (:class:`CourseInterrupted`) and keeps the finished ones. Then
:func:`qcourse.course.report.write_report` writes ``OUT/report.md``, ``OUT/report.html`` and
``OUT/results.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from qcourse import __version__
from qcourse.course import stages
from qcourse.course.stages import CourseConfig, StageContext
from qcourse.utils import atomic_write, check_writable, file_sha256, is_owned, remove_owned, remove_owned_tree

__all__ = ["run_demo", "run_notebooks", "find_notebooks", "render_html", "NotebookFailed", "NotebooksInterrupted",
           "Stage", "STAGES", "STAGE_NAMES", "CourseConfig", "CourseInterrupted", "run_course"]


def run_demo(out_dir: Path, seed: int = 0, echo=print) -> Dict[str, float]:
    """Train the digits CNN, quantize it four ways, export the best to ONNX, check ORT.

    Returns ``{row name: test accuracy}`` and writes ``digits_int8.onnx`` into ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an 8x8-pixel CNN gains nothing from more threads
    try:
        return _demo(out_dir, seed, echo)
    finally:
        torch.set_num_threads(threads)


def _demo(out_dir: Path, seed: int, echo) -> Dict[str, float]:
    import onnxruntime as ort

    from qcourse import workflow
    from qcourse.course import digits
    from qcourse.engines.ort import session_options
    from qcourse.export import export_onnx, list_qdq_nodes

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, data = digits.train_digits_cnn(seed=seed)
    echo(f"trained the digits CNN in {time.perf_counter() - t0:.1f} s")
    results = {"fp32": digits.accuracy(model, data.x_test, data.y_test)}
    calib_batches = digits.batches(data.x_calib, batch_size=64)

    models = {}
    for method in ("max", "entropy", "mse", "percentile"):
        models[method] = workflow.quantized_copy(model, calib_batches, method=method)
        results[f"int8 {method}"] = digits.accuracy(models[method], data.x_test, data.y_test)

    best = max(("max", "entropy", "mse", "percentile"), key=lambda m: results[f"int8 {m}"])
    path = export_onnx(models[best], data.x_test[:1], out_dir / "digits_int8.onnx")
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    onnx_out = sess.run(None, {name: data.x_test.numpy()})[0]
    with torch.no_grad():
        torch_out = models[best](data.x_test).numpy()
    results["int8 onnxruntime"] = float((onnx_out.argmax(1) == data.y_test.numpy()).mean())
    max_diff = float(np.abs(onnx_out - torch_out).max())

    echo("")
    echo(f"digits CNN, test accuracy (scikit-learn digits, {len(data.x_test)} test images)")
    for k, v in results.items():
        echo(f"  {k:18s} {v * 100:6.2f} %")
    echo(f"exported the {best}-calibrated model with {len(list_qdq_nodes(path))} Q/DQ pairs to {path}")
    echo(f"ONNX Runtime vs PyTorch fake quantization: max |logit diff| = {max_diff:.2e}, "
         f"same predictions: {bool((onnx_out.argmax(1) == torch_out.argmax(1)).all())}")
    echo("  (each quantizer rounds exactly like QuantizeLinear; ONNX Runtime's integer convolutions sum in "
         "another order, so an activation that lands within float error of a rounding tie can move one step)")
    return results


def find_notebooks(directory: Optional[Path] = None) -> List[Path]:
    """The lesson notebooks ``NN_*.ipynb`` in order (default: ``./notebooks``)."""
    directory = Path(directory) if directory else Path.cwd() / "notebooks"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))


#: where the kernels' own messages go (``out_dir/kernel.log``), not mixed into the course's output
KERNEL_LOG = "kernel.log"


class NotebookFailed(RuntimeError):
    """A lesson notebook raised in one of its cells (its executed copy up to there is kept)."""


class NotebooksInterrupted(KeyboardInterrupt):
    """Ctrl-C while the lesson notebooks ran: which one was running and which had finished."""

    def __init__(self, running: str, finished: List[str]):
        self.running, self.finished = running, finished
        numbers = ", ".join(name.split("_", 1)[0] for name in finished) or "none"
        super().__init__(f"interrupted during {running}; finished: {numbers}")


def run_notebooks(paths: List[Path], out_dir: Path, timeout: int = 600, echo=print) -> List[dict]:
    """Execute each notebook top to bottom (nbclient), saving the executed copy in ``out_dir``.

    A file under a notebook's own name in ``out_dir`` is always a complete run: each one is
    written to a hidden temporary name and renamed into place only when every cell ran.
    The kernels' own messages (ipykernel's warnings, a crash) go to ``out_dir/kernel.log``.
    Stops at the first failing notebook with :class:`NotebookFailed` (naming it and its
    failing cell; the executed copy up to the error is kept as ``NAME.failed.ipynb``), and
    turns Ctrl-C into :class:`NotebooksInterrupted` (which one was running, which finished).
    """
    out_dir = Path(out_dir)
    check_writable(out_dir / KERNEL_LOG, *(f for p in paths for f in notebook_files(p, out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    env_backup = os.environ.get("MPLBACKEND")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        for path in paths:
            t0 = time.perf_counter()
            echo(f"running {path.name} ...")
            try:
                _run_one(path, out_dir, timeout)
            except KeyboardInterrupt:
                raise NotebooksInterrupted(path.name, [r["notebook"] for r in rows]) from None
            dt = time.perf_counter() - t0
            rows.append({"notebook": path.name, "seconds": dt})
            echo(f"  ok in {dt:.0f} s -> {out_dir / path.name}")
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
    return rows


def notebook_files(path: Path, out_dir: Path) -> List[Path]:
    """The files running the notebook ``path`` may write into ``out_dir``: its executed copy, the copy
    of a failed run, its HTML page."""
    out_dir = Path(out_dir)
    return [out_dir / path.name, out_dir / f"{path.stem}.failed.ipynb", out_dir / f"{path.stem}.html"]


def _run_one(path: Path, out_dir: Path, timeout: int):
    """Execute one notebook into ``out_dir / path.name``, atomically (see :func:`run_notebooks`)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from nbformat.warnings import MissingIDFieldWarning

    with warnings.catch_warnings():  # a notebook saved without cell ids gets them here, silently
        warnings.simplefilter("ignore", MissingIDFieldWarning)
        nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    log_path = out_dir / KERNEL_LOG
    earlier = log_path.read_text(errors="replace") if is_owned(log_path) else ""
    error = None
    with atomic_write(log_path, suffix=".log") as tmp, open(tmp, "w") as kernel_log:
        kernel_log.write(f"{earlier}== {path.name}\n")  # the kernel's own warnings, off the terminal
        kernel_log.flush()
        try:
            client.execute(stderr=kernel_log)
        except BaseException as e:  # the log is kept either way: it may say why
            error = e
    if error is not None:
        if isinstance(error, KeyboardInterrupt) or _was_ctrl_c(client, error):
            raise KeyboardInterrupt from None
        if isinstance(error, (CellExecutionError, CellTimeoutError, DeadKernelError)):
            _raise_failed(error, nb, path, out_dir, timeout)
        raise error
    with atomic_write(out_dir / path.name, suffix=".ipynb") as tmp:
        nbformat.write(nb, str(tmp))
    remove_owned(out_dir / f"{path.stem}.failed.ipynb")  # from an earlier run


def _was_ctrl_c(client, e: BaseException) -> bool:
    """Whether the error ``client.execute()`` raised is really Ctrl-C.

    nbclient catches SIGINT itself while a notebook runs: its handler shuts the kernel down
    (leaving ``_async_cleanup_kernel_future`` on the client), and what comes out is then "kernel
    died", a cancelled wait or an error in its own cleanup, not KeyboardInterrupt. A kernel
    interrupted on its own reports KeyboardInterrupt as the cell's error.
    """
    return (getattr(client, "_async_cleanup_kernel_future", None) is not None
            or getattr(e, "ename", None) == "KeyboardInterrupt")


def _raise_failed(e: Exception, nb, path: Path, out_dir: Path, timeout: int):
    """Keep the partly executed copy as ``NAME.failed.ipynb``; raise the one-line NotebookFailed."""
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    if isinstance(e, CellExecutionError):
        why = f"{e.ename}: {e.evalue}"
    elif isinstance(e, CellTimeoutError):
        why = f"no answer within {timeout} s (a slow machine may need a longer --timeout)"
    else:
        why = f"the kernel died (out of memory? see {out_dir / KERNEL_LOG})"
    failed = out_dir / f"{path.stem}.failed.ipynb"
    with atomic_write(failed, suffix=".ipynb") as tmp:
        nbformat.write(nb, str(tmp))
    raise NotebookFailed(f"{path.name} failed in {_failed_cell(nb)}: {why}; its executed copy up to "
                         f"there is {failed}") from e


def _failed_cell(nb) -> str:
    """``"code cell K"`` (1-based) for the first code cell with an error output, else ``"a cell"``."""
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for k, cell in enumerate(code_cells, 1):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return f"code cell {k}"
    return "a cell"


def render_html(notebook: Path, html: Path) -> Path:
    """An executed notebook as one HTML page (nbconvert; figures are embedded), written atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_write(html, suffix=".html") as tmp:
        tmp.write_text(body, encoding="utf-8")
    return Path(html)


# ----------------------------------------------------------------------------- the course run: stages
@dataclass(frozen=True)
class Stage:
    """One step of :func:`run_course`: ``run(ctx) -> results``, cached in ``OUT/<name>/results.json``.

    ``inputs(config, notebooks)``: the settings its results depend on; ``model``: whether the
    model and data (weights, COCO, image size, device) are inputs too; ``needs``: the stages
    whose results it reads; ``summary(results)``: its progress line. Its folder is emptied (of
    qcourse's files) before it runs, except that a ``resumable`` stage keeps the files of an
    interrupted run with the same inputs (a sensitivity scan, a QAT run resume from them), and a ``keep_files`` stage
    keeps them even when the inputs change (the notebooks stage re-executes only changed notebooks).
    """

    name: str
    title: str
    run: Callable[[StageContext], dict]
    summary: Callable[[dict], str]
    inputs: Callable[[CourseConfig, List[Path]], dict]
    needs: Tuple[str, ...] = ()
    model: bool = True
    resumable: bool = False
    keep_files: bool = False


class CourseInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: which stage, what it had done, and which stages are kept."""

    def __init__(self, stage: str, detail: str, kept: List[str]):
        self.stage, self.kept = stage, kept
        where = f"interrupted in stage {stage}" + (f" ({detail})" if detail else "")
        super().__init__(f"{where}; finished stages are kept ({', '.join(kept) or 'none yet'}): rerun the same "
                         "command to continue")


def _demo_stage(ctx: StageContext) -> dict:
    return {"accuracy": run_demo(ctx.folder, seed=ctx.config.seed, echo=ctx.log), "onnx": "digits_int8.onnx"}


#: code that draws or parses, not what the stages compute: editing it keeps the cached stages
_PRESENTATION = ("course/cli.py", "course/report.py", "course/viewer.py", "course/plots/")


def _code_hash() -> str:
    """A hash of qcourse's source (what the stages compute with), so new code reruns the stages."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package).as_posix()
        if not rel.startswith(_PRESENTATION):
            digest.update(rel.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def _notebooks_stage(ctx: StageContext) -> dict:
    """Execute each lesson notebook and render it to HTML; one unchanged since an earlier run is kept.

    ``.notebooks.json`` in the stage folder records each finished notebook with its own
    fingerprint (its file and qcourse's code), so an interrupted or failed run resumes with
    the notebook it stopped at.
    """
    config = ctx.config
    ledger_path = ctx.folder / ".notebooks.json"
    ledger = _read_json(ledger_path) or {}
    code, rows = ctx.inputs["code"], []
    paths = find_notebooks(config.notebooks)
    check_writable(ledger_path, ctx.folder / KERNEL_LOG, *(f for p in paths for f in notebook_files(p, ctx.folder)))
    for path in paths:
        fp = hashlib.sha256(path.read_bytes() + code.encode()).hexdigest()[:16]
        row = ledger.get(path.name)
        if (row and row.get("fingerprint") == fp and is_owned(ctx.folder / path.name)
                and is_owned(ctx.folder / str(row.get("html")))):
            config.echo(f"  {path.name}: unchanged since it ran in {row['seconds']:.0f} s, kept")
            row = {**row, "status": "kept"}
        else:
            try:
                ran = run_notebooks([path], ctx.folder, timeout=config.timeout, echo=config.echo)[0]
            except NotebooksInterrupted:  # the notebooks finished before this one count too
                raise NotebooksInterrupted(path.name, [r["notebook"] for r in rows]) from None
            html = render_html(ctx.folder / path.name, ctx.folder / f"{path.stem}.html")
            row = {"notebook": path.name, "seconds": round(ran["seconds"], 1), "html": html.name, "fingerprint": fp}
            ledger[path.name] = row
            _write_json(ledger_path, ledger)
            row = {**row, "status": "ran"}
        rows.append(row)
    return {"notebooks": [{k: v for k, v in r.items() if k != "fingerprint"} for r in rows]}


def _read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or not one (a damaged file counts as absent)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------ one progress line per stage
def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _summary_demo(r: dict) -> str:
    acc = r["accuracy"]
    int8 = [v for k, v in acc.items() if k.startswith("int8 ") and k != "int8 onnxruntime"]
    return (f"digits CNN accuracy: FP32 {_pct(acc['fp32'])}, INT8 {_pct(min(int8))}-{_pct(max(int8))}, "
            f"ONNX Runtime {_pct(acc['int8 onnxruntime'])}")


def _summary_ptq(r: dict) -> str:
    line = (f"mAP FP32 {r['fp32']['map']:.4f}; INT8 " +
            ", ".join(f"{m} {row['map']:.4f}" for m, row in r["int8"].items()))
    gap = r.get("method_gap")
    if gap:
        lo, hi = gap["interval"]
        line += (f"; at {gap['setting']['name'] if isinstance(gap['setting'], dict) else gap['setting']} "
                 f"{gap['best_method']} minus max {gap['gap']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    return line


def _summary_sensitivity(r: dict) -> str:
    # "most sensitive" only where the ranking passed every test (qcourse.yolo.sensitivity.CRITERIA)
    top = ", ".join(row["layer"] for row in r["top"][:3])
    ks = ", ".join(f"k={row['k']} {row['map']:.4f}" for row in r["map_vs_k"])
    sh, topk = r["split_half_rho"], r["topk"]
    rho = "n/a" if sh["rho"] is None else f"{sh['rho']:.2f}"
    share = "n/a" if topk["recovered_share"] is None else f"{topk['recovered_share']:.2f}"
    title = "most sensitive" if r["holds"] else "ranked first (criteria not all met)"
    return (f"{r['setting']['name']}: loss {r['loss']['diff']:+.4f} [{r['loss']['interval'][0]:+.4f}, "
            f"{r['loss']['interval'][1]:+.4f}]; {r['layers_scanned']} layers on {r['images']} images; {title}: {top}; "
            f"split-half rho {rho}; top-{topk['k']} share {share}; top-k in float: {ks}")


def _summary_qat(r: dict) -> str:
    parts = []
    for res in r["runs"].values():
        ptq_row, qat_row = res["table"][1], res["table"][2]
        parts.append(f"{qat_row['model'].split()[-1]}: PTQ {ptq_row['map']:.4f} -> QAT {qat_row['map']:.4f}")
    share = r.get("recovered_share") or {}
    if share.get("share") is not None:
        lo, hi = share["interval"]
        parts.append(f"{share['run']} won back {share['share']:.2f} [{lo:.2f}, {hi:.2f}] of PTQ's loss")
    return "; ".join(parts)


def _summary_export(r: dict) -> str:
    pairs = ", ".join(f"{r['files'][n]} ({g['qdq_pairs']} Q/DQ)" for n, g in r["graphs"].items())
    return f"{pairs}; placement problems: {sum(r['placement_problems'].values())}"


def _summary_engines(r: dict) -> str:
    big = str(max(r["batches"]))
    base = r["timing"][r["reference"]][big]["throughput_img_s"]
    speeds = [f"{name} {t[big]['throughput_img_s'] / base:.2f}x (mAP {r['map'][name]['map']:.4f})"
              for name, t in r["timing"].items()]
    return f"batch {big}: " + ", ".join(speeds)


def _summary_notebooks(r: dict) -> str:
    return f"{len(r['notebooks'])} notebooks executed and rendered to HTML"


def _inputs(*names: str) -> Callable[[CourseConfig, List[Path]], dict]:
    """``inputs()`` of a stage whose results depend on these settings."""
    return lambda config, notebooks: {n: getattr(config, n) for n in names}


STAGES: Tuple[Stage, ...] = (
    Stage("demo", "the core demo: a digits CNN quantized four ways, exported, checked in ONNX Runtime",
          _demo_stage, _summary_demo, _inputs("seed"), model=False),
    Stage("baseline", "FP32 mAP of the YOLOv7 model", stages.baseline,
          lambda r: f"FP32 mAP {r['fp32']['map']:.4f} on {r['fp32']['images']} images", _inputs("eval_batches")),
    Stage("ptq", "PTQ with each calibration method (lesson 5)", stages.ptq, _summary_ptq,
          _inputs("eval_batches", "calib_batches")),
    Stage("sensitivity", "sensitivity scan at lesson 6's stress setting, top-k layers in float, the ranking tested "
          "(lesson 6)", stages.sensitivity, _summary_sensitivity,
          lambda c, nb: {"scan_batches": c.scan_batches, "scan_layers": c.scan_layers, "ks": stages.SENSITIVITY_KS,
                         "calib_batches": c.calib_batches, "seed": c.seed, "setting": "W8pcA4 entropy",
                         "bootstrap": stages.BOOTSTRAP},
          resumable=True),
    Stage("qat", "QAT at W8A8 and at lesson 7's stress setting (lesson 7)", stages.qat, _summary_qat,
          lambda c, nb: {"runs": stages.qat_runs(c), "eval_batches": c.eval_batches,
                         "calib_batches": c.calib_batches, "seed": c.seed}, needs=("ptq",), resumable=True),
    Stage("export", "ONNX export of the FP32, PTQ and QAT models", stages.export, _summary_export,
          _inputs(), needs=("ptq", "qat")),
    Stage("engines", "ONNX Runtime engines: latency, throughput and mAP (lesson 8)", stages.engines,
          _summary_engines,
          lambda c, nb: {"bench_iterations": c.bench_iterations, "eval_batches": c.eval_batches,
                         "batches": stages.BENCH_BATCHES, "threads": torch.get_num_threads()},
          needs=("export",)),
    Stage("notebooks", "every lesson notebook executed and rendered to HTML", _notebooks_stage, _summary_notebooks,
          lambda c, nb: {"notebooks": {p.name: file_sha256(p) for p in nb}}, model=False, keep_files=True),
)
STAGE_NAMES = stages.STAGE_NAMES  # the command's --help reads them there, without importing torch


# ------------------------------------------------------------------ the run
def _selected(config: CourseConfig, notebooks: List[Path]) -> List[str]:
    """The stages to run, in order; refuses unknown names before anything runs."""
    for name in ([config.only] if config.only else []) + list(config.skip):
        if name not in STAGE_NAMES:
            raise ValueError(f"there is no stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
    if config.only and config.skip:
        raise ValueError(f"pass --only or --skip, not both (got --only {config.only} and --skip "
                         f"{' '.join(config.skip)})")
    chosen = [config.only] if config.only else [n for n in STAGE_NAMES if n not in config.skip]
    if config.notebooks and not notebooks:  # asked for by name: a wrong folder, not "skip the notebooks"
        raise FileNotFoundError(f"no lesson notebooks (NN_*.ipynb) in {config.notebooks}; pass the course's "
                                "notebooks/ folder to --notebooks")
    if "notebooks" in chosen and not notebooks:
        config.echo("no lesson notebooks found in ./notebooks: run this from the course's repository root (or pass "
                    "--notebooks DIR); the notebooks stage is left out")
        chosen.remove("notebooks")
    return chosen


def _fingerprints(config: CourseConfig, notebooks: List[Path]) -> Tuple[Dict[str, str], Dict[str, dict]]:
    """``({stage: fingerprint}, {stage: its inputs})``: a stage's inputs include the fingerprints it needs."""
    base = {"qcourse": __version__, "code": _code_hash()}
    model = stages.model_inputs(config)
    fps, inputs = {}, {}
    for st in STAGES:
        d = {"stage": st.name, **base, **json.loads(json.dumps(st.inputs(config, notebooks), default=str))}
        if st.model:
            d["model"] = model
        d["needs"] = {n: fps[n] for n in st.needs}
        inputs[st.name] = d
        fps[st.name] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    return fps, inputs


def _is_done(record: Optional[dict], fingerprint: str) -> bool:
    return bool(record) and (record.get("course_stage") or {}).get("fingerprint") == fingerprint


#: the files :func:`_run_stage` writes into every stage's folder
_STAGE_FILES = ("results.json", ".inputs.json", "log.txt")


def _check_records(done: set, out: Path) -> None:
    """The results of a done stage are read as they are: its results.json must be qcourse's, unchanged."""
    for name in STAGE_NAMES:
        path = out / name / "results.json"
        if name in done and not is_owned(path):
            raise ValueError(f"{path} was changed after qcourse wrote it (or qcourse did not write it), so stage "
                             f"{name}'s results cannot be used; move it away (or restore it) and rerun: the stage "
                             f"then runs again (alone with --only {name})")


def _check_needs(chosen: List[str], done: set, out: Path) -> None:
    for st in STAGES:
        if st.name not in chosen:
            continue
        for need in st.needs:
            if need not in chosen and need not in done:
                raise ValueError(f"stage {st.name} needs the results of stage {need}, and {out / need} holds none "
                                 f"made with these settings; run {need} too (e.g. `qcourse course --only {need}` "
                                 "first, or drop --only/--skip)")


#: marks a folder as made by qcourse course (written, so listed as qcourse's, by :func:`_claim`)
_MARKER = ".qcourse-course"


def _claim(out: Path) -> None:
    """Make sure ``out`` is ours to write: new, empty, or made by this command (its marker unchanged).

    Even then the course replaces and deletes only the files qcourse wrote (:mod:`qcourse.utils`):
    a user's file put into a stage folder is left where it is.
    """
    if is_owned(out / _MARKER):
        return
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a folder")
    foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if foreign:
        raise FileExistsError(f"--out {out} holds files that `qcourse course` did not write "
                              f"({', '.join(foreign[:3])}); pass a new or empty folder (or one this command made) "
                              "to --out")
    with atomic_write(out / _MARKER) as tmp:
        tmp.write_text("made by `qcourse course`: it replaces and deletes only the files it wrote here\n")


def _prepare_folder(folder: Path, fingerprint: str, fresh: bool, st: Stage) -> None:
    """Empty the stage's folder, unless its files can be resumed from (see :class:`Stage`).

    Emptying deletes only qcourse's own unchanged files (:func:`qcourse.utils.remove_owned_tree`).
    """
    same = (_read_json(folder / ".inputs.json") or {}).get("fingerprint") == fingerprint
    keep = st.keep_files or (st.resumable and same)
    if folder.exists() and (fresh or not keep):
        remove_owned_tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_owned(folder / "results.json")  # from now on the folder's files are in the making
    _write_json(folder / ".inputs.json", {"fingerprint": fingerprint})


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _run_stage(st: Stage, config: CourseConfig, fp: str, inputs: dict, records: Dict[str, dict], step: str) -> dict:
    """Run one stage in its folder; its ``results.json`` (results + ``course_stage``) is written last."""
    folder = Path(config.out) / st.name
    _prepare_folder(folder, fp, config.fresh, st)
    config.echo(f"{step} {st.name}: {st.title} ...")
    t0 = time.perf_counter()
    log_path = folder / "log.txt"  # the package's own messages: kept, off the terminal
    lines = [log_path.read_text(errors="replace")] if is_owned(log_path) else []
    try:
        results = st.run(StageContext(config, folder, {n: records[n] for n in st.needs},
                                      lambda line: lines.append(f"{line}\n"), inputs))
    finally:
        with atomic_write(log_path, suffix=".txt") as tmp:
            tmp.write_text("".join(lines))
    seconds = time.perf_counter() - t0
    record = json.loads(json.dumps(results))  # what the file will hold (int keys become strings, tuples lists)
    record["course_stage"] = {"name": st.name, "fingerprint": fp, "inputs": inputs, "seconds": round(seconds, 1),
                              "finished": datetime.now().isoformat(timespec="seconds")}
    _write_json(folder / "results.json", record)
    config.echo(f"{' ' * len(step)} done in {_duration(seconds)}: {st.summary(record)}")
    return record


def _interrupted(st: Stage, e: KeyboardInterrupt, kept: List[str]) -> CourseInterrupted:
    if isinstance(e, NotebooksInterrupted):
        numbers = ", ".join(n.split("_", 1)[0] for n in e.finished) or "none"
        detail = f"during {e.running}; notebooks finished: {numbers}"
    else:
        detail = str(e)
    return CourseInterrupted(st.name, detail, kept)


def run_course(config: CourseConfig) -> dict:
    """Run the course's stages (cached in ``config.out``), then write the report; returns ``results.json``'s data.

    Errors in the settings (an unknown stage, a stage whose inputs are missing, weights that do
    not fit the data, a foreign ``--out``) are raised before any stage runs. A stage that fails
    leaves the stages before it done; the report is written from them and the error re-raised.
    """
    from qcourse.course import report

    t0 = time.perf_counter()
    out = Path(config.out)
    notebooks = find_notebooks(config.notebooks)
    chosen = _selected(config, notebooks)
    fps, inputs = _fingerprints(config, notebooks)
    records = {st.name: _read_json(out / st.name / "results.json") for st in STAGES}
    done = {n for n, r in records.items() if _is_done(r, fps[n])}
    _check_records(done, out)
    _check_needs(chosen, done, out)
    todo = [n for n in chosen if config.fresh or n not in done]
    _claim(out)
    # a file of the names the run writes that qcourse did not write: refused before any stage runs
    check_writable(*report.report_paths(out), *(out / n / f for n in todo for f in _STAGE_FILES))
    if (config.weights or config.coco) and set(chosen) - {"demo", "notebooks"}:
        stages.check_model_fits_data(config)
    status = {n: ("cached" if n in done else "not run") for n in STAGE_NAMES}
    for st in STAGES:
        if st.name not in chosen:
            continue
        if st.name not in todo:
            config.echo(f"[done] {st.name}: done earlier with the same inputs (in "
                        f"{_duration(records[st.name]['course_stage']['seconds'])}), skipped")
            continue
        try:
            records[st.name] = _run_stage(st, config, fps[st.name], inputs[st.name], records,
                                          f"[{todo.index(st.name) + 1}/{len(todo)}]")
        except KeyboardInterrupt as e:
            raise _interrupted(st, e, [n for n in STAGE_NAMES if n in done]) from None
        except Exception:
            status[st.name] = "failed"
            with contextlib.suppress(Exception):  # the report of the finished stages; the stage's error matters
                report.write_report(out, _collect(config, fps, records, done, status, t0))
            raise
        done.add(st.name)
        status[st.name] = "ran"
    data = _collect(config, fps, records, done, status, t0)
    files = report.write_report(out, data)
    _print_summary(config, data, files)
    return data


def _collect(config: CourseConfig, fps, records, done: set, status: Dict[str, str], t0: float) -> dict:
    """``results.json``'s content: settings, machine, and each stage's status, time and results."""
    from qcourse.course.report import machine_info

    by_stage = {}
    for st in STAGES:
        rec = records.get(st.name) if st.name in done else None
        meta = (rec or {}).get("course_stage", {})
        by_stage[st.name] = {"title": st.title, "status": status[st.name], "seconds": meta.get("seconds"),
                             "finished": meta.get("finished"), "fingerprint": fps[st.name],
                             "results": {k: v for k, v in rec.items() if k != "course_stage"} if rec else None}
    return {"qcourse": __version__, "generated": datetime.now().isoformat(timespec="seconds"),
            "settings": config.settings(), "machine": machine_info(config.device),
            "seconds_this_run": round(time.perf_counter() - t0, 1), "stages": by_stage}


def _print_summary(config: CourseConfig, data: dict, files: Dict[str, Path]) -> None:
    echo = config.echo
    echo(f"\n{'stage':12s} {'status':8s} {'time':>8s}")
    for name, st in data["stages"].items():
        took = "-" if st["seconds"] is None else _duration(st["seconds"])
        echo(f"{name:12s} {st['status']:8s} {took:>8s}")
    echo(f"this run took {_duration(data['seconds_this_run'])}; report: {files['md']} and {files['html']}; "
         f"results: {files['json']}")
