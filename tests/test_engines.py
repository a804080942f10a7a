"""qcourse.engines on a small CNN: the ORT INT8 rewrite, the engine interface, the TensorRT parts
that need no GPU. The oracles: the graph before each rewrite (run by ONNX Runtime), ORT with
its graph optimizations off (the float reference kernels of the same graph), numpy."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qcourse import export, workflow
from qcourse.engines import (BackendUnavailable, EngineError, available_backends, build_engine, load_engine,
                             strip_qdq, to_ort_int8)
from qcourse.engines import bench, trt
from qcourse.engines.ort_int8 import calibrate_outputs, calibration_targets
from qcourse.engines.ort import session_options


class Block(nn.Module):
    """The YOLOv7 patterns the rewrite handles: Conv -> LeakyReLU feeding a Conv and a Concat
    with different scales, MaxPool, nearest upsampling, a float head conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.c4 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        a = self.act(self.c1(x))
        b = self.act(self.c2(a))
        c = self.act(self.c3(torch.cat([a, b], 1)))
        d = self.up(self.pool(c))
        e = self.act(self.c4(torch.cat([d, c], 1)))
        return self.head(e)


def _session(model, optimize=True, threads=1):
    so = session_options(threads)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, optimize=True):
    return _session(model, optimize).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Float and Q/DQ ONNX of a calibrated Block, the fake-quant model and test images."""
    torch.manual_seed(0)
    fp32 = Block().eval()
    calib = [torch.rand(4, 3, 16, 16) for _ in range(4)]
    fq = workflow.quantized_copy(fp32, calib, ignore=["head"])
    d = tmp_path_factory.mktemp("engines")
    example = torch.zeros(1, 3, 16, 16)
    x = torch.rand(6, 3, 16, 16)
    return {"fp32": export.export_onnx(fp32, example, d / "fp32.onnx"),
            "qdq": export.export_onnx(fq, example, d / "qdq.onnx"), "fq": fq, "dir": d,
            "x": x.numpy(), "fq_out": fq(x).detach().numpy()}


def test_exact_rewrites_keep_outputs_identical(tiny):
    # casts, weight folding, uint8 shift, activation-output Q/DQ, merged Qs, Concat split,
    # float weights of the float Convs: exact by design. Run as written (ORT's reference
    # kernels) the graphs agree bit for bit; with ORT's optimizations a float Conv reading a
    # constant weight is pre-packed and sums in another order: float32 rounding, which a
    # later Q may turn into one code on other inputs.
    qdq = onnx.load(tiny["qdq"])
    for weight_dtype in ("uint8", "int8"):
        exact, info = to_ort_int8(qdq, exact_only=True, weight_dtype=weight_dtype)
        assert info["convs"] == 0 and info["weight_dtype"] == weight_dtype
        np.testing.assert_array_equal(_run(exact, tiny["x"], optimize=False), _run(qdq, tiny["x"], optimize=False))


def test_strip_qdq_gives_back_the_float_model(tiny):
    stripped = strip_qdq(onnx.load(tiny["qdq"]))
    assert not any(n.op_type.endswith("QuantizeLinear") for n in stripped.graph.node)
    np.testing.assert_array_equal(_run(stripped, tiny["x"]), _run(onnx.load(tiny["fp32"]), tiny["x"]))


def test_int8_graph_runs_integer_kernels(tiny, tmp_path):
    model, info = to_ort_int8(onnx.load(tiny["qdq"]), weight_dtype="uint8")
    # c1..c3 integer; c4 feeds the float head, whose input must stay unrounded: float too
    assert info == {"convs": 3, "float_convs": 2, "calibrated_convs": 0, "weight_dtype": "uint8"}
    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 3 and "QLinearLeakyRelu" in ops and "QLinearConcat" in ops


def test_integer_kernels_agree_with_the_reference_kernels(tiny):
    # the same rewritten graph, ORT's integer kernels vs its float reference kernels (no
    # fusion): they differ only where requantization rounds a tie the other way (float32
    # multiplier vs float division), i.e. by at most one output code of the last layer
    # uint8 weights: kernels that never saturate (int8 weights may, on CPUs without VNNI)
    model, _ = to_ort_int8(onnx.load(tiny["qdq"]), weight_dtype="uint8")
    fast, ref = _run(model, tiny["x"]), _run(model, tiny["x"], optimize=False)
    scale = max(q["scale"].max() for q in export.list_qdq_nodes(tiny["qdq"]) if q["axis"] is None)
    head_gain = np.abs(onnx.numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "head.weight"))).sum(1).max()
    assert np.abs(fast - ref).max() <= 2 * scale * head_gain


def test_int8_engine_close_to_fake_quant(tiny):
    # Not exact: each Conv output is quantized once more (QLinearConv needs it) at the next
    # layer's scale: exact for outputs >= 0, one code off at most after LeakyReLU's slope for
    # negative ones, and the Concat that re-quantizes from its input's scale rounds twice.
    # Tolerance: 3 codes of the largest activation scale, carried through the float head.
    model, _ = to_ort_int8(onnx.load(tiny["qdq"]))
    out = _run(model, tiny["x"])
    scale = max(q["scale"].max() for q in export.list_qdq_nodes(tiny["qdq"]) if q["axis"] is None)
    head = tiny["fq"].head.weight.detach().abs().sum((1, 2, 3)).max().item()
    err = np.abs(out - tiny["fq_out"])
    assert err.max() <= 3 * scale * head
    assert err.mean() <= 0.5 * scale * head  # most outputs far closer than the bound
    assert np.corrcoef(out.ravel(), tiny["fq_out"].ravel())[0, 1] > 0.99


def _c4_outputs(tiny, batches):
    # the oracle: c4's output in the PyTorch fake-quant model, read with a forward hook
    seen = []
    hook = tiny["fq"].c4.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for x in batches:
            tiny["fq"](x)
    hook.remove()
    return torch.cat(seen)


def test_calibrated_outputs_of_the_convs_feeding_the_float_head(tiny):
    qdq = onnx.load(tiny["qdq"])
    targets = calibration_targets(qdq)
    assert len(targets) == 1 and targets[0].startswith("/c4/")  # c4 -> LeakyReLU -> float head
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    ref = _c4_outputs(tiny, batches)
    amax = calibrate_outputs(qdq, targets, batches, method="max")
    # ORT's float Conv vs PyTorch's: the same max up to float32 summation order
    assert amax[targets[0]] == pytest.approx(ref.abs().max().item(), rel=1e-5)
    entropy = calibrate_outputs(qdq, targets, batches)[targets[0]]
    assert 0 < entropy <= amax[targets[0]]

    model, info = to_ort_int8(qdq, weight_dtype="uint8", output_amax=amax)
    assert (info["convs"], info["float_convs"], info["calibrated_convs"]) == (4, 1, 1)
    so = session_options(1)
    so.optimized_model_filepath = str(tiny["dir"] / "calibrated_opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 4 and ops.count("Conv") + ops.count("FusedConv") == 1
    # one more rounding than test_int8_engine_close_to_fake_quant allows for: half a step
    # of c4's output scale (amax / 127) before LeakyReLU (slope <= 1) and the head
    out = _run(model, tiny["x"])
    scale = max(q["scale"].max() for q in export.list_qdq_nodes(tiny["qdq"]) if q["axis"] is None)
    head = tiny["fq"].head.weight.detach().abs().sum((1, 2, 3)).max().item()
    bound = (3 * scale + 0.5 * amax[targets[0]] / 127) * head
    assert np.abs(out - tiny["fq_out"]).max() <= bound


def test_calibration_errors_name_the_value(tiny):
    qdq = onnx.load(tiny["qdq"])
    target = calibration_targets(qdq)[0]
    with pytest.raises(ValueError, match="exact_only=True cannot take it"):
        to_ort_int8(qdq, exact_only=True, output_amax={target: 1.0})
    with pytest.raises(EngineError, match="'/c1/Conv_output_0', which is not the output of a quantized Conv"):
        to_ort_int8(qdq, output_amax={"/c1/Conv_output_0": 1.0})
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            to_ort_int8(qdq, output_amax={target: bad})
    with pytest.raises(EngineError, match="no calibration batches"):
        calibrate_outputs(qdq, [target], [])
    with pytest.raises(ValueError, match="calibration method must be one of"):
        calibrate_outputs(qdq, [target], [tiny["x"]], method="minmax")
    with pytest.raises(EngineError, match="no tensor 'nope'"):
        calibrate_outputs(qdq, ["nope"], [tiny["x"]])


def test_build_and_load_onnxruntime_engines(tiny):
    d = tiny["dir"]
    e8 = build_engine(tiny["qdq"], d / "int8.onnx", precision="int8", threads=1)
    e32 = build_engine(tiny["qdq"], d / "fp32e.onnx", precision="fp32", threads=1)
    assert (e8.backend, e8.precision, e32.precision) == ("onnxruntime", "int8", "fp32")
    again = load_engine(d / "int8.onnx", threads=1)
    assert again.precision == "int8" and again.info["convs"] == 3
    np.testing.assert_array_equal(again(tiny["x"]), e8(torch.from_numpy(tiny["x"])))
    np.testing.assert_array_equal(e32(tiny["x"]), _run(onnx.load(tiny["fp32"]), tiny["x"]))
    # a plain ONNX file (no qcourse record) loads too
    assert load_engine(tiny["fp32"], threads=1).precision == "fp32"


def test_engine_errors_name_the_problem(tiny, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_engine(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_engine(bad)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        build_engine(bad, tmp_path / "x.onnx")
    with pytest.raises(EngineError, match="no QuantizeLinear"):
        build_engine(tiny["fp32"], tmp_path / "x.onnx", precision="int8")
    with pytest.raises(EngineError, match="no FP16 convolutions"):
        build_engine(tiny["fp32"], tmp_path / "x.onnx", precision="fp16")
    with pytest.raises(EngineError, match="precision must be one of"):
        build_engine(tiny["fp32"], tmp_path / "x.onnx", precision="int4")
    with pytest.raises(EngineError, match="ends in .engine"):
        build_engine(tiny["qdq"], tmp_path / "x.onnx", backend="tensorrt")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(EngineError, match="cannot tell the backend"):
        load_engine(tmp_path / "model.txt")
    engine = load_engine(tiny["fp32"], threads=1)
    with pytest.raises(EngineError, match="input height 16, got 32"):
        engine(np.zeros((1, 3, 32, 16), np.float32))
    with pytest.raises(EngineError, match=r"batch of images \(B, C, H, W\)"):
        engine(np.zeros((3, 16, 16), np.float32))


def test_fixed_batch_engine_refuses_other_batches(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    path = export.export_onnx(model, torch.zeros(2, 3, 8, 8), tmp_path / "fixed.onnx", dynamic_batch=False)
    engine = load_engine(path, threads=1)
    assert engine.batch_range == (2, 2)
    assert engine(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 4, 6, 6)
    with pytest.raises(EngineError, match=r"batch sizes 2\.\.2, got 3; rebuild"):
        engine(np.zeros((3, 3, 8, 8), np.float32))


def test_weight_dtype_checked():
    with pytest.raises(ValueError, match="weight_dtype must be 'auto', 'uint8' or 'int8', got 'int4'"):
        to_ort_int8(onnx.ModelProto(), weight_dtype="int4")


# ------------------------------------------------------------------ TensorRT without a GPU
HAS_TRT, TRT_WHY = trt.available()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is usable here: the unavailable-backend error cannot happen")
def test_tensorrt_unavailable_is_a_clear_error(tiny, tmp_path):
    usable, why = available_backends()["tensorrt"]
    assert not usable and "--backend onnxruntime" in why
    with pytest.raises(BackendUnavailable, match="--backend onnxruntime"):
        build_engine(tiny["qdq"], tmp_path / "x.engine", backend="tensorrt", precision="int8")
    (tmp_path / "y.engine").write_bytes(b"plan")
    (tmp_path / "y.engine.json").write_text(json.dumps({"tensorrt": "10.0"}))
    with pytest.raises(BackendUnavailable):
        load_engine(tmp_path / "y.engine")


def test_tensorrt_checks_its_arguments_before_the_gpu(tiny, tmp_path):
    # these run before tensorrt is imported, so they hold on every machine
    with pytest.raises(EngineError, match="no Q/DQ nodes; TensorRT 10 builds INT8 from explicit Q/DQ"):
        trt.build(tiny["fp32"], tmp_path / "x.engine", "int8")
    with pytest.raises(EngineError, match="always runs in INT8"):
        trt.build(tiny["qdq"], tmp_path / "x.engine", "fp16")
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        trt.build(tmp_path / "none.onnx", tmp_path / "x.engine", "fp16")
    (tmp_path / "z.engine").write_bytes(b"plan")
    with pytest.raises(EngineError, match="engine.json is missing"):
        trt._read_record(tmp_path / "z.engine")


def test_profile_shapes():
    assert trt.profile_shapes((3, 640, 640), (1, 8, 32)) == ((1, 3, 640, 640), (8, 3, 640, 640), (32, 3, 640, 640))
    for bad in ((8, 1, 32), (0, 1, 2), (1, 2)):
        with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
            trt.profile_shapes((3, 640, 640), bad)
    with pytest.raises(EngineError, match=r"\(C, H, W\)"):
        trt.profile_shapes((640, 640), (1, 1, 1))


def test_parse_layer_report():
    # the shape of TensorRT 10's inspector JSON with ProfilingVerbosity.DETAILED
    report = {"Layers": [
        {"Name": "model.0.conv + model.0.act", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "input", "Format/Datatype": "Int8 NC/32HW32"}],
         "Outputs": [{"Name": "t0", "Format/Datatype": "Int8 NC/32HW32"}], "TacticName": "sm80_xmma"},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to model.77", "LayerType": "Reformat",
         "Outputs": [{"Name": "t1", "Format/Datatype": "Half Row major linear FP16 format"}]},
        {"Name": "model.77.m.0", "LayerType": "CaskConvolution",
         "Outputs": [{"Name": "t2", "Format/Datatype": "Float NCHW"}]},
    ], "Bindings": ["input", "output0"]}
    rows = trt.parse_layer_report(json.dumps(report))
    assert [r["precision"] for r in rows] == ["int8", "fp16", "fp32"]
    assert [r["reformat"] for r in rows] == [False, True, False]
    assert rows[0]["tactic"] == "sm80_xmma"
    with pytest.raises(EngineError, match="ProfilingVerbosity.DETAILED"):
        trt.parse_layer_report(json.dumps({"Layers": ["model.0.conv"]}))
    with pytest.raises(EngineError, match="not JSON"):
        trt.parse_layer_report("{")
    with pytest.raises(EngineError, match="no 'Layers' list"):
        trt.parse_layer_report("{}")


@pytest.mark.skipif(not HAS_TRT, reason=f"TensorRT backend not testable here: {TRT_WHY}")
def test_tensorrt_int8_engine_matches_onnxruntime(tiny, tmp_path):  # pragma: no cover - needs a GPU
    engine = build_engine(tiny["qdq"], tmp_path / "int8.engine", backend="tensorrt", precision="int8",
                          batch=(1, 4, 8))
    assert engine.batch_range == (1, 8)
    again = load_engine(tmp_path / "int8.engine")
    out = again(tiny["x"])
    ref = _run(onnx.load(tiny["qdq"]), tiny["x"])
    scale = max(q["scale"].max() for q in export.list_qdq_nodes(tiny["qdq"]) if q["axis"] is None)
    assert np.abs(out - ref).max() <= 3 * scale * tiny["fq"].head.weight.abs().sum((1, 2, 3)).max().item()
    rows = again.layer_report()
    assert any(r["precision"] == "int8" for r in rows)
    with pytest.raises(EngineError, match="batch sizes 1..8, got 9"):
        again(np.zeros((9, 3, 16, 16), np.float32))


# ------------------------------------------------------------------ timing
def test_summarize_matches_numpy():
    times = np.array([0.010, 0.012, 0.011, 0.030, 0.013])
    s = bench.summarize(times, batch=8)
    assert s["latency_ms_median"] == pytest.approx(12.0)
    assert s["latency_ms_p90"] == pytest.approx(np.percentile(times * 1e3, 90))
    assert s["latency_ms_p99"] == pytest.approx(np.percentile(times * 1e3, 99))
    assert (s["latency_ms_min"], s["latency_ms_max"]) == (pytest.approx(10.0), pytest.approx(30.0))
    assert s["throughput_img_s"] == pytest.approx(8 / 0.012)


def test_benchmark_times_every_engine_at_every_batch():
    calls = []
    res = bench.benchmark({"a": lambda x: calls.append(("a", len(x))), "b": lambda x: calls.append(("b", len(x)))},
                          batches=(1, 2), iterations=4, warmup=1, shape=(3, 4, 4), rounds=2)
    assert set(res) == {"a", "b"} and set(res["a"]) == {1, 2}
    assert res["a"][2]["iterations"] == 4
    assert calls.count(("a", 2)) == 1 + 4 + 1  # warm-up, timed calls, one warm-up per later round
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        bench.time_calls(lambda: None, 0)
