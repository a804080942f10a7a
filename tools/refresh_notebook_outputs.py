"""Execute lesson notebooks and keep only the outputs that nbval compares.

nbval (``--nbval-lax``) compares the stored output of cells marked ``# NBVAL_CHECK_OUTPUT``
and skips a cell whose stored ``execution_count`` is empty, so those cells must keep their
text output in git. Every other cell is saved stripped, which keeps the notebooks small.

    python tools/refresh_notebook_outputs.py notebooks/03_tensor_quantizer.ipynb [...]
"""
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MARK = "NBVAL_CHECK_OUTPUT"


def refresh(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    os.environ["QCOURSE_NO_BROWSER"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    kept = 0
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if MARK in cell.source:
            count += 1
            cell.execution_count = count
            cell.outputs = [o for o in cell.outputs if o.output_type == "stream"
                            or (o.output_type in ("execute_result", "display_data") and "text/plain" in o.get("data", {}))]
            for o in cell.outputs:
                if "data" in o:
                    o["data"] = {"text/plain": o["data"]["text/plain"]}
                    o["metadata"] = {}
                if o.output_type == "execute_result":
                    o["execution_count"] = count
            kept += 1
        else:
            cell.execution_count = None
            cell.outputs = []
    nbformat.write(nb, path)
    return kept


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: kept the output of {refresh(Path(arg))} checked cells")
