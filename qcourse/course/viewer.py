"""Lessons 1 and 3 — look at an ONNX graph in netron, from a notebook or from a terminal.

:func:`show_netron` serves a model file with `netron <https://github.com/lutzroeder/netron>`_
and returns an ``IFrame`` that embeds the viewer in the notebook — but only where a
browser is plausibly attached: an interactive Jupyter kernel, outside CI and outside
pytest/nbval. Everywhere else it prints one line saying how to open the file instead
(``netron model.onnx`` in a terminal, or https://netron.app and drop the file on the
page) and returns ``None``. It never opens a browser itself, never waits for one, and
never blocks: the netron server runs in a daemon thread.

Set ``QCOURSE_NO_BROWSER=1`` to force the printed line (e.g. a notebook executed by a
script), or ``QCOURSE_NO_BROWSER=0`` to allow the embedded view even under CI/pytest.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["show_netron", "no_browser_reason", "NETRON_WEB"]

#: The web version of netron: drop a model file on the page, nothing is uploaded.
NETRON_WEB = "https://netron.app"

_FALSE = ("", "0", "false", "no", "off")


def _in_jupyter_kernel() -> bool:
    """True inside a Jupyter (ipykernel) kernel, False in plain Python or a terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def no_browser_reason() -> Optional[str]:
    """Why no embedded viewer will be shown, or ``None`` when a browser is plausibly there.

    Checked in order: ``QCOURSE_NO_BROWSER`` (``1`` forces the printed line, ``0`` allows
    the embedded view whatever follows), ``CI``, pytest/nbval (``PYTEST_CURRENT_TEST``,
    which a kernel started by nbval inherits), and whether this is a Jupyter kernel at all.
    """
    flag = os.environ.get("QCOURSE_NO_BROWSER")
    if flag is not None and flag.strip().lower() not in _FALSE:
        return "QCOURSE_NO_BROWSER is set"
    forced = flag is not None and flag.strip() == "0"
    if not forced:
        if os.environ.get("CI", "").strip().lower() not in _FALSE:
            return "running under CI"
        if "PYTEST_CURRENT_TEST" in os.environ:
            return "running under pytest/nbval"
    if not _in_jupyter_kernel():
        return "not running in a Jupyter kernel"
    return None


def _how_to_open(path: Path, reason: str) -> str:
    return (f"netron: embedded view skipped ({reason}; no browser attached). To look at the graph, "
            f"run `netron {path}` in a terminal, or open {NETRON_WEB} and drop the file on the page.")


def show_netron(path: Union[str, os.PathLike], port: Optional[int] = None, height: int = 600):
    """Show the model file ``path`` in netron, embedded in the notebook when a browser is there.

    Args:
        path: a model file netron can read (``.onnx``, ``.pt``, ...).
        port: local port for the netron server (``None`` lets netron choose a free one).
        height: height of the embedded view in pixels.

    Returns:
        An ``IPython.display.IFrame`` pointing at ``http://localhost:<port>`` (display it as
        a cell's last value), or ``None`` after printing how to open the file — when no
        browser is attached (CI, pytest/nbval, plain Python), when netron is not installed,
        or when its server cannot start (e.g. the port is taken).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; export one first "
                                "(e.g. qcourse.export.export_onnx(model, example, path))")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ValueError(f"port must be None or an int in 0..65535, got {port!r}")
    if isinstance(height, bool) or not isinstance(height, int) or height <= 0:
        raise ValueError(f"height must be a positive int (pixels), got {height!r}")

    reason = no_browser_reason()
    if reason is not None:
        print(_how_to_open(path, reason))
        return None
    try:
        import netron
    except ImportError:
        print(_how_to_open(path, "netron is not installed: pip install netron"))
        return None
    try:
        address = netron.start(str(path), address=("localhost", port), browse=False)
    except OSError as e:   # port taken, no network stack, ...
        print(_how_to_open(path, f"the netron server could not start: {e}"))
        return None
    host, bound = address
    from IPython.display import IFrame

    print(f"netron is serving {path.name} at http://{host}:{bound} (stop it with netron.stop({bound}))")
    return IFrame(f"http://{host}:{bound}", width="100%", height=height)
