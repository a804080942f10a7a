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

__all__ = ["run_demo", "run_notebooks", "find_notebooks"]


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

    from qcourse import digits, quant_modules, workflow
    from qcourse.export import export_onnx, list_qdq_nodes
    from qcourse.tensor_quant import QuantDescriptor

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, data = digits.train_digits_cnn(seed=seed)
    echo(f"trained the digits CNN in {time.perf_counter() - t0:.1f} s")
    results = {"fp32": digits.accuracy(model, data.x_test, data.y_test)}
    calib_batches = digits.batches(data.x_calib, batch_size=64)

    def quantized(method: str):
        import copy

        qm = copy.deepcopy(model)
        desc = QuantDescriptor(calib_method="max" if method == "max" else "histogram")
        quant_modules.replace_modules(qm, quant_desc_input=desc)
        workflow.calibrate_model(qm, calib_batches, method=method, progress=False)
        return qm.eval()

    models = {}
    for method in ("max", "entropy", "mse", "percentile"):
        models[method] = quantized(method)
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


def run_notebooks(paths: List[Path], out_dir: Path, timeout: int = 600, echo=print) -> List[dict]:
    """Execute each notebook top to bottom (nbclient), saving the executed copy in ``out_dir``.

    Stops at the first failing notebook and raises with its name and the failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    env_backup = os.environ.get("MPLBACKEND")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            t0 = time.perf_counter()
            echo(f"running {path.name} ...")
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent)}})
            try:
                client.execute()
            finally:
                nbformat.write(nb, out_dir / path.name)
            dt = time.perf_counter() - t0
            rows.append({"notebook": path.name, "seconds": dt})
            echo(f"  ok in {dt:.0f} s -> {out_dir / path.name}")
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
    return rows
