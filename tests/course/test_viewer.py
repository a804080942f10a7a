"""Tests of qcourse.course.viewer.show_netron (lessons 1 and 3): the printed line where no browser is
attached (for real: pytest is such a place), the embedded view with netron.start stubbed, and a
real netron server whose page the IFrame points at."""
import sys
import urllib.request

import pytest

from qcourse.course import viewer


@pytest.fixture
def model_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, TensorProto

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture
def interactive(monkeypatch):
    """Pretend to be an interactive Jupyter kernel outside CI and pytest.

    Returns a function to call inside the test body: pytest sets PYTEST_CURRENT_TEST again
    after the fixtures have run, so it can only be removed from there.
    """
    def pretend():
        for var in ("CI", "PYTEST_CURRENT_TEST", "QCOURSE_NO_BROWSER"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(viewer, "_in_jupyter_kernel", lambda: True)

    return pretend


def _forbid_start(monkeypatch):
    netron = pytest.importorskip("netron")

    def boom(*a, **k):
        raise AssertionError("netron.start must not be called without a browser")

    monkeypatch.setattr(netron, "start", boom)


# ------------------------------------------------------------------ no browser: the printed line
def test_under_pytest_prints_how_to_open_and_returns_none(model_file, monkeypatch, capsys):
    _forbid_start(monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QCOURSE_NO_BROWSER", raising=False)
    assert "PYTEST_CURRENT_TEST" in __import__("os").environ   # the real condition, not faked
    assert viewer.show_netron(model_file) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "skipped" in out and "no browser attached" in out and "pytest" in out
    assert f"netron {model_file}" in out and "https://netron.app" in out


@pytest.mark.parametrize("env,reason", [({"CI": "true"}, "CI"), ({"QCOURSE_NO_BROWSER": "1"}, "QCOURSE_NO_BROWSER")])
def test_ci_and_opt_out_skip_even_in_a_kernel(model_file, monkeypatch, capsys, interactive, env, reason):
    interactive()
    _forbid_start(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert viewer.no_browser_reason() is not None and reason in viewer.no_browser_reason()
    assert viewer.show_netron(model_file) is None
    assert reason in capsys.readouterr().out


def test_ci_false_does_not_count_as_ci(monkeypatch, interactive):
    interactive()
    monkeypatch.setenv("CI", "false")
    assert viewer.no_browser_reason() is None


def test_plain_python_is_not_interactive(model_file, monkeypatch, capsys):
    _forbid_start(monkeypatch)
    for var in ("CI", "PYTEST_CURRENT_TEST", "QCOURSE_NO_BROWSER"):
        monkeypatch.delenv(var, raising=False)
    assert viewer.no_browser_reason() == "not running in a Jupyter kernel"
    assert viewer.show_netron(model_file) is None
    assert "Jupyter kernel" in capsys.readouterr().out


# ------------------------------------------------------------------ interactive: the IFrame
def test_interactive_starts_netron_without_browser_and_returns_iframe(model_file, monkeypatch, interactive):
    interactive()
    netron = pytest.importorskip("netron")
    calls = []

    def fake_start(file=None, address=None, browse=True):
        calls.append((file, address, browse))
        return ("localhost", 20123)

    monkeypatch.setattr(netron, "start", fake_start)
    frame = viewer.show_netron(model_file, port=20123, height=450)
    assert calls == [(str(model_file), ("localhost", 20123), False)]
    from IPython.display import IFrame

    assert isinstance(frame, IFrame)
    assert frame.src == "http://localhost:20123" and frame.height == 450 and frame.width == "100%"


def test_interactive_port_none_lets_netron_choose(model_file, monkeypatch, interactive):
    interactive()
    netron = pytest.importorskip("netron")
    monkeypatch.setattr(netron, "start", lambda file=None, address=None, browse=True: ("localhost", 8081))
    assert viewer.show_netron(model_file).src == "http://localhost:8081"


def test_forced_on_with_qcourse_no_browser_0(model_file, monkeypatch):
    netron = pytest.importorskip("netron")
    monkeypatch.setenv("QCOURSE_NO_BROWSER", "0")
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(viewer, "_in_jupyter_kernel", lambda: True)
    calls = []

    def fake_start(file=None, address=None, browse=True):
        calls.append((file, address, browse))
        return ("localhost", 9)

    monkeypatch.setattr(netron, "start", fake_start)
    frame = viewer.show_netron(model_file)
    from IPython.display import IFrame

    # CI=1 and pytest are overridden: the server starts (never a browser) and the IFrame shows it
    assert calls == [(str(model_file), ("localhost", None), False)]
    assert isinstance(frame, IFrame) and frame.src == "http://localhost:9" and frame.height == 600


def test_server_failure_prints_instead_of_raising(model_file, monkeypatch, capsys, interactive):
    interactive()
    netron = pytest.importorskip("netron")

    def taken(*a, **k):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(netron, "start", taken)
    assert viewer.show_netron(model_file, port=8080) is None
    out = capsys.readouterr().out
    assert "could not start" in out and "Address already in use" in out and "https://netron.app" in out


def test_netron_missing_prints_install_hint(model_file, monkeypatch, capsys, interactive):
    interactive()
    monkeypatch.setitem(sys.modules, "netron", None)       # import netron -> ImportError
    assert viewer.show_netron(model_file) is None
    assert "pip install netron" in capsys.readouterr().out


def test_real_netron_server_serves_the_iframe_url(model_file, interactive):
    """The interactive branch end to end: a real server thread, its page fetched over HTTP."""
    interactive()
    netron = pytest.importorskip("netron")
    frame = viewer.show_netron(model_file, port=0)
    from IPython.display import IFrame

    assert isinstance(frame, IFrame) and frame.src.startswith("http://localhost:")
    port = int(frame.src.rsplit(":", 1)[1])
    try:
        assert port > 0 and netron.status(port)
        with urllib.request.urlopen(frame.src + "/", timeout=10) as r:
            assert r.status == 200 and b"netron" in r.read().lower()
    finally:
        netron.stop(port)


# ------------------------------------------------------------------ bad input
def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        viewer.show_netron(tmp_path / "nope.onnx")


@pytest.mark.parametrize("kw,msg", [({"port": -1}, "port"), ({"port": 70000}, "port"), ({"port": "80"}, "port"),
                                    ({"height": 0}, "height"), ({"height": 2.5}, "height")])
def test_bad_port_or_height(model_file, kw, msg):
    with pytest.raises(ValueError, match=msg):
        viewer.show_netron(model_file, **kw)


def test_in_jupyter_kernel_false_here():
    # pytest runs no ipykernel: the real check answers False
    assert viewer._in_jupyter_kernel() is False
