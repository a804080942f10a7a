"""The course end to end: the core demo and the lesson notebooks, run from the command line.

``qcourse course`` runs :func:`run_demo` (a digits CNN quantized, calibrated with every
method, exported to Q/DQ ONNX and checked in ONNX Runtime) and then executes every lesson
notebook in order with nbclient, saving the executed copies.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["run_demo", "run_notebooks", "find_notebooks", "NotebookFailed", "NotebooksInterrupted"]


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
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


def _run_one(path: Path, out_dir: Path, timeout: int):
    """Execute one notebook into ``out_dir / path.name``, atomically (see :func:`run_notebooks`)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        with open(out_dir / KERNEL_LOG, "a") as kernel_log:  # the kernel's own warnings, off the terminal
            kernel_log.write(f"== {path.name}\n")
            kernel_log.flush()
            client.execute(stderr=kernel_log)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or _was_ctrl_c(client, e):
            raise KeyboardInterrupt from None
        if isinstance(e, (CellExecutionError, CellTimeoutError, DeadKernelError)):
            _raise_failed(e, nb, path, out_dir, timeout)
        raise
    tmp = out_dir / f".{path.name}.tmp"  # same folder: os.replace is then a rename, never a copy
    try:
        nbformat.write(nb, tmp)
        os.replace(tmp, out_dir / path.name)
        (out_dir / f"{path.stem}.failed.ipynb").unlink(missing_ok=True)  # from an earlier run
    finally:
        tmp.unlink(missing_ok=True)


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
    nbformat.write(nb, failed)
    raise NotebookFailed(f"{path.name} failed in {_failed_cell(nb)}: {why}; its executed copy up to "
                         f"there is {failed}") from e


def _failed_cell(nb) -> str:
    """``"code cell K"`` (1-based) for the first code cell with an error output, else ``"a cell"``."""
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for k, cell in enumerate(code_cells, 1):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return f"code cell {k}"
    return "a cell"
