"""Engines of the YOLOv7-tiny default: the ORT INT8 engine's detections against the PyTorch
fake-quant model it was exported from, the FP32 engine against PyTorch, and the
``qcourse build`` / ``qcourse bench`` commands end to end."""
import json

import numpy as np
import onnx
import pytest
import torch

from qcourse.course.cli import main
from qcourse.engines import build_engine, load_engine, to_ort_int8
from qcourse.yolo.engines import calibration_batches, evaluate_engine, export_default_onnx


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    d = tmp_path_factory.mktemp("yolo_engines")
    files = export_default_onnx(d, calib_batches=4)
    fp32, fq = files["models"]
    return {"dir": d, **files, "fp32_model": fp32, "fq_model": fq,
            "int8": build_engine(files["qdq"], d / "int8.onnx", precision="int8", threads=1,
                                 calibration=calibration_batches(batches=2)),
            "fp32e": build_engine(files["fp32"], d / "fp32e.onnx", precision="fp32", threads=1)}


def test_int8_engine_rewrites_all_but_the_head(default):
    # 58 Convs: the 3 head convs are float (ignored); the 3 that feed them have no scale to
    # reuse, so their outputs are calibrated (on training images) and they run INT8 too
    info = default["int8"].info
    assert (info["convs"], info["float_convs"], info["calibrated_convs"]) == (55, 3, 3)
    assert sorted(info["output_amax"]) == [f"/model.{i}/conv/Conv_output_0" for i in (74, 75, 76)]
    # without calibration images they stay float: the fake-quant model, exactly
    _, plain = to_ort_int8(onnx.load(default["qdq"]))
    assert (plain["convs"], plain["float_convs"], plain["calibrated_convs"]) == (52, 6, 0)


def test_exact_steps_leave_the_yolo_graph_identical(default):
    import onnxruntime as ort

    from qcourse.engines.ort import session_options

    qdq = onnx.load(default["qdq"])
    exact, _ = to_ort_int8(qdq, exact_only=True)
    x = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)

    def run(model, level):
        so = session_options(1)
        so.graph_optimization_level = level
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"input": x})

    # as written (ORT's reference kernels), bit for bit. Optimized, ORT pre-packs the float
    # Convs that read a constant weight and sums in another order: float32 rounding, which
    # a later Q can turn into one code (every Conv is float here, exact_only stops short)
    for a, b in zip(run(qdq, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                    run(exact, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        np.testing.assert_array_equal(a, b)


def test_fp32_engine_equals_pytorch(default):
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        ref = default["fp32_model"](x)[0].numpy()
    # float32 kernels sum in another order: boxes in pixels agree to ~1e-3 px
    np.testing.assert_allclose(default["fp32e"](x), ref, rtol=1e-4, atol=2e-3)


def test_int8_engine_map_matches_fake_quant(default):
    # Each quantized Conv's output is rounded once more than in the fake-quant model (ORT's
    # QLinearConv needs it): exact for outputs >= 0, one code off at most for negative ones.
    # With lesson 5's placement rules no Concat re-quantizes. The three Convs before the head
    # are rounded at a calibrated scale (entropy), the one real extra rounding. On the 250
    # val images the engine scored 0.6943 against the fake-quant model's 0.6946; the bound
    # is 0.3 points.
    fq = evaluate_engine(default["fq_model"])["map"]
    int8 = evaluate_engine(default["int8"])["map"]
    assert abs(int8 - fq) <= 0.003, (int8, fq)
    assert int8 > 0.68  # far from quantize_static's 0.0


def test_build_and_bench_commands(default, tmp_path, capsys):
    out = tmp_path / "e.onnx"
    assert main(["build", "--onnx", str(default["qdq"]), "--precision", "int8", "--out", str(out)]) == 0
    assert "55 Convs run integer kernels, 3 float (3 with outputs calibrated by entropy)" in capsys.readouterr().out
    plain = tmp_path / "plain.onnx"
    assert main(["build", "--onnx", str(default["qdq"]), "--output-calib", "none", "--out", str(plain)]) == 0
    assert "52 Convs run integer kernels, 6 float" in capsys.readouterr().out
    js = tmp_path / "bench.json"
    assert main(["bench", "--engine", str(out), "--engine", str(default["dir"] / "fp32e.onnx"), "--batch", "1", "2",
                 "--iterations", "2", "--warmup", "1", "--threads", "1", "--no-map", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert set(res["results"]) == {"e.onnx (onnxruntime int8)", "fp32e.onnx (onnxruntime fp32)"}
    assert set(res["results"]["e.onnx (onnxruntime int8)"]) == {"1", "2"}
    assert js.with_suffix(".png").stat().st_size > 1000
    assert load_engine(out).precision == "int8"


def test_command_errors_are_one_line_exit_2(default, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    cases = [
        (["bench", "--engine", str(bad)], "not a valid ONNX model"),
        (["build", "--onnx", str(default["fp32"]), "--out", str(tmp_path / "x.onnx")], "no QuantizeLinear"),
        (["build", "--onnx", str(default["fp32"]), "--precision", "fp16", "--out", str(tmp_path / "x.onnx")],
         "no FP16 convolutions"),
        (["build", "--onnx", str(default["qdq"]), "--out", str(tmp_path / "x.engine")], "ends in .onnx"),
        (["build", "--onnx", str(tmp_path / "none.onnx")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # the default model is exported next to --out: a user's fp32.onnx there is refused, untouched
    mine = tmp_path / "user" / "fp32.onnx"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own model")
    assert main(["build", "--out", str(mine.parent / "int8.onnx")]) == 2
    assert "exists and was not written by qcourse" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's own model" and not (mine.parent / "int8.onnx").exists()

