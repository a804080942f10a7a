"""The TensorRT backend without a GPU, and the engine interface's outputs by name.

Oracles: the API surface recorded from the real bindings wheels of each supported TensorRT
version (tests/data/tensorrt_api_*.json, tools/record_tensorrt_api.py) behind a strict fake
module (tests/fake_tensorrt.py); a real engine inspector report from NVIDIA's
trt-engine-explorer, read by hand; the PyTorch model an ONNX file came from; ONNX Runtime
running the float32 graph. The tests at the end need TensorRT and a CUDA GPU and skip without.
"""
import collections
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fake_tensorrt import API_FILES, DATA, FakeEnumValue, install
from qcourse import export, workflow
from qcourse.engines import BackendUnavailable, EngineError, build_engine, load_engine, trt
from qcourse.engines.fp16 import to_fp16

VERSIONS = [f.name[len("tensorrt_api_"):-len(".json")] for f in API_FILES]
REPORT = DATA / "trex_resnet_qat_a100.graph.json"


class TwoHeads(nn.Module):
    """Two outputs of different shapes (like YOLOv7's predictions and raw maps), an upsample
    (Resize with float32-only scales) and a float head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(8, 4, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        a = self.act(self.c1(x))
        b = self.up(self.act(self.c2(a)))
        return self.head(a + b).flatten(2), b


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    d = tmp_path_factory.mktemp("trt")
    example = torch.zeros(1, 3, 16, 16)
    calib = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    fq = workflow.quantized_copy(model, calib, ignore=["head"])
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    return {"fp32": export.export_onnx(model, example, d / "fp32.onnx"),
            "qdq": export.export_onnx(fq, example, d / "qdq.onnx"), "x": x.numpy(), "ref": ref, "dir": d}


# ------------------------------------------------------------------ outputs by name (ONNX Runtime)
def test_engine_returns_the_output_asked_for_by_name(onnx_files, tmp_path):
    engine = build_engine(onnx_files["fp32"], tmp_path / "e.onnx", precision="fp32", threads=1)
    assert engine.output_names == ("output0", "output1")
    x, (ref0, ref1) = onnx_files["x"], onnx_files["ref"]
    got = engine.run(x, ["output1"])  # not the first output ORT lists
    assert list(got) == ["output1"]
    np.testing.assert_allclose(got["output1"], ref1, rtol=1e-4, atol=1e-5)
    both = engine.run(x, ["output1", "output0"])
    np.testing.assert_allclose(both["output0"], ref0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(both["output1"], ref1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(engine(x, "output1"), ref1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(engine(x), ref0, rtol=1e-4, atol=1e-5)  # default: the graph's first
    assert set(engine.run(x)) == {"output0", "output1"}
    with pytest.raises(EngineError, match=r"no output 'boxes'; its outputs are \['output0', 'output1'\]"):
        engine.run(x, ["boxes"])
    with pytest.raises(EngineError, match="run on the CPU, got device 'cuda:1'"):
        load_engine(tmp_path / "e.onnx", device="cuda:1")


# ------------------------------------------------------------------ FP16 graph
def test_fp16_copy_keeps_float32_io_and_matches_the_float_graph(onnx_files):
    import onnxruntime as ort

    model = onnx.load(onnx_files["fp32"])
    half = to_fp16(model)
    T = onnx.TensorProto
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [T.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [T.FLOAT, T.FLOAT]
    assert [o.name for o in half.graph.output] == ["output0", "output1"]
    resize = next(n for n in half.graph.node if n.op_type == "Resize")
    consts = {i.name: i.data_type for i in half.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t.data_type for n in half.graph.node if n.op_type == "Constant"})
    assert consts[resize.input[2]] == T.FLOAT  # ONNX types Resize's scales as float32 only
    weights = [i for i in half.graph.initializer if i.name.endswith("weight")]
    assert weights and all(i.data_type == T.FLOAT16 for i in weights)
    assert model.graph.initializer[0].data_type == T.FLOAT  # the input model is left as it was
    x = onnx_files["x"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, atol=5e-3 * np.abs(r).max())
        assert not np.array_equal(g, r)  # it did run in FP16


def test_fp16_copy_refuses_what_fp16_cannot_hold(onnx_files):
    model = onnx.load(onnx_files["fp32"])
    w = next(i for i in model.graph.initializer if i.name.endswith("weight"))
    big = onnx.numpy_helper.to_array(w).copy()
    big.flat[0] = 1e6
    w.CopyFrom(onnx.numpy_helper.from_array(big, w.name))
    with pytest.raises(EngineError, match=rf"weight '{w.name}' holds 1e\+06, beyond FP16's range"):
        to_fp16(model)
    with pytest.raises(EngineError, match="QuantizeLinear"):
        to_fp16(onnx.load(onnx_files["qdq"]))


# ------------------------------------------------------------------ the layer report, on a real one
def test_layer_report_of_a_real_inspector_json():
    text = REPORT.read_text()
    rows = trt.parse_layer_report(text)
    layers = json.loads(text)["Layers"]
    assert len(rows) == len(layers) == 37
    # the six format strings of this report, read by hand
    by_hand = {"Four wide channel vectorized row major Int8 format": "int8",
               "Thirty-two wide channel vectorized row major Int8 format": "int8",
               "Thirty-two wide channel vectorized row major FP16 format": "fp16",
               "Two wide channel vectorized row major FP16 format": "fp16",
               "Row major linear FP32": "fp32"}
    want = [by_hand[layer["Outputs"][0]["Format/Datatype"]] for layer in layers]
    assert [r["precision"] for r in rows] == want
    assert collections.Counter(want) == {"int8": 19, "fp16": 14, "fp32": 4}
    named = {r["name"]: r for r in rows}
    assert named["conv1.weight + QuantizeLinear_7 + Conv_9"]["precision"] == "fp32"
    assert named["layer1.0.conv1.weight + QuantizeLinear_20 + Conv_22"]["precision"] == "int8"
    assert named["layer1.0.conv2.weight + QuantizeLinear_32 + Conv_34 + Add_36 + Relu_37"]["precision"] == "fp16"
    # LayerType "Reformat" holds 12 rows: 10 stand-alone QuantizeLinear layers (Origin QDQ) and
    # the 2 reformats TensorRT inserted (Origin REFORMAT); a NoOp named "Reformatting ..." is none
    assert sum(r["type"] == "Reformat" for r in rows) == 12
    assert [r["name"] for r in rows if r["reformat"]] == [
        "Reformatting CopyNode for Output Tensor 0 to MaxPool_12",
        "Reformatting CopyNode for Input Tensor 0 to GlobalAveragePool_246"]
    q = [r["name"] for r in rows if r["origin"] == "QDQ"]
    assert len(q) == 10 and all(n.startswith("QuantizeLinear_") for n in q)
    assert rows[1]["tactic"] == layers[1]["TacticName"]


# ------------------------------------------------------------------ the strict fake itself
@pytest.mark.parametrize("version", VERSIONS)
def test_the_fake_rejects_what_the_real_api_lacks(monkeypatch, version):
    fake, world = install(monkeypatch, DATA / f"tensorrt_api_{version}.json")
    major = int(version.split(".")[0])
    if major >= 11:  # removed in 11, the cause of the AttributeError this backend had
        with pytest.raises(AttributeError, match="BuilderFlag has no attribute 'FP16'"):
            fake.BuilderFlag.FP16
        with pytest.raises(AttributeError, match="BuilderFlag has no attribute 'INT8'"):
            fake.BuilderFlag.INT8
    else:
        assert isinstance(fake.BuilderFlag.FP16, FakeEnumValue)
    with pytest.raises(AttributeError, match="has no attribute 'Bulider'"):
        fake.Bulider
    builder = fake.Builder(fake.Logger(fake.Logger.WARNING))
    config = builder.create_builder_config()
    with pytest.raises(TypeError, match="unknown or repeated keyword"):
        config.set_timing_cache(config.create_timing_cache(b""), ignore=False)
    with pytest.raises(TypeError, match="wrong type"):
        config.set_memory_pool_limit(fake.ProfilingVerbosity.DETAILED, 1)  # the wrong enum
    with pytest.raises(AttributeError, match="has no attribute 'max_workspace_size'"):
        config.max_workspace_size = 1 << 30  # TensorRT 8's, gone in 10
    with pytest.raises(AttributeError, match="has no attribute 'execute_async_v2'"):
        builder.create_network(0).execute_async_v2


# ------------------------------------------------------------------ the backend against each version
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("version", VERSIONS)
def test_build_load_run_report_against_the_recorded_api(monkeypatch, onnx_files, tmp_path, version, precision):
    fake, world = install(monkeypatch, DATA / f"tensorrt_api_{version}.json", inspector_json=REPORT.read_text())
    src = onnx_files["qdq" if precision == "int8" else "fp32"]
    out = tmp_path / f"{precision}.engine"
    engine = build_engine(src, out, backend="tensorrt", precision=precision, batch=(1, 2, 4), device="cuda:1")
    # strongly typed, no weakly typed precision flags; TF32 off
    assert world.network_flags == 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert world.flags_set == [] and world.flags_cleared == ["TF32"]
    initializers = {i.data_type for i in world.parsed.graph.initializer if i.name.endswith("weight")}
    if precision == "fp16":
        assert initializers == {onnx.TensorProto.FLOAT16}
        assert [i.type.tensor_type.elem_type for i in world.parsed.graph.input] == [onnx.TensorProto.FLOAT]
    else:  # the file as exported
        assert world.parsed.SerializeToString() == onnx.load(src).SerializeToString()
    # the device asked for was current while the builder and runtime were made
    assert world.active_devices == [("builder", 1), ("runtime", 1)]
    assert engine.device.index == 1 and "cuda:1" in engine.describe()
    record = json.loads((tmp_path / f"{precision}.engine.json").read_text())
    assert record["outputs"] == ["output0", "output1"] and record["tensorrt"] == version
    assert record["batch"] == [1, 2, 4] and record["image_shape"] == [3, 16, 16] and record["tf32"] is False
    assert (tmp_path / f"{precision}.cache").read_bytes() == b"cache:+timed"

    # outputs by name: the fake engine lists them in reverse and fills output k with k + 1
    again = load_engine(out, device=1)
    x = onnx_files["x"]
    assert again.output_names == ("output0", "output1")
    pred = again(x)
    assert pred.shape == (3, 4, 256) and np.all(pred == 1)
    only = again.run(x, ["output1"])
    assert list(only) == ["output1"] and only["output1"].shape == (3, 8, 16, 16) and np.all(only["output1"] == 2)
    run = world.executions[-1]
    assert run["stream"] != 0 and set(run["addresses"]) == {"input", "output0", "output1"}
    with pytest.raises(EngineError, match="batch sizes 1..4, got 5"):
        again(np.zeros((5, 3, 16, 16), np.float32))

    rows = again.layer_report()
    assert len(rows) == 37 and sum(r["reformat"] for r in rows) == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_builder_nullptr_names_driver_gpu_and_library(monkeypatch, onnx_files, tmp_path, version):
    fake, world = install(monkeypatch, DATA / f"tensorrt_api_{version}.json")
    world.builder_fails = True
    with pytest.raises(BackendUnavailable, match=r"could not create its builder on cuda:0 .*factory function returned "
                                                 r"nullptr.*NVIDIA driver .*GPU .*TensorRT libraries"):
        trt.build(onnx_files["fp32"], tmp_path / "x.engine", "fp32")
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize("version", VERSIONS[-1:])
def test_rejected_timing_cache_is_reported_and_replaced(monkeypatch, onnx_files, tmp_path, version):
    fake, world = install(monkeypatch, DATA / f"tensorrt_api_{version}.json")
    cache = tmp_path / "trt.cache"
    trt.build(onnx_files["fp32"], tmp_path / "a.engine", "fp32", timing_cache=cache)
    assert cache.read_bytes() == b"cache:+timed"
    world.reject_cache = True  # e.g. the cache came from another GPU
    with pytest.warns(UserWarning, match=r"TensorRT rejected the timing cache .*trt.cache \(made on another GPU"):
        trt.build(onnx_files["fp32"], tmp_path / "b.engine", "fp32", timing_cache=cache)
    assert cache.read_bytes() == b"cache:+timed"  # this build's, not the rejected one's
    world.reject_cache = False
    cache.write_bytes(b"\x00garbage")  # unreadable; changed by hand, so qcourse leaves it alone after
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trt.build(onnx_files["fp32"], tmp_path / "c.engine", "fp32", timing_cache=cache)
    messages = [str(w.message) for w in caught]
    assert any("rejected the timing cache" in m and "(corrupt)" in m for m in messages), messages
    assert (tmp_path / "c.engine").is_file()


@pytest.mark.parametrize("version", VERSIONS[-1:])
def test_plan_and_record_are_written_together(monkeypatch, onnx_files, tmp_path, version):
    fake, world = install(monkeypatch, DATA / f"tensorrt_api_{version}.json")
    out = tmp_path / "e.engine"
    trt.build(onnx_files["fp32"], out, "fp32")
    record = json.loads((tmp_path / "e.engine.json").read_text())
    from qcourse.utils import file_sha256
    assert record["sha256"] == file_sha256(out)
    # a plan its record does not describe (an interrupted rebuild, a copy by hand) is refused
    out.write_bytes(out.read_bytes() + b" ")
    with pytest.raises(EngineError, match="does not match its record"):
        load_engine(out)
    # a build that fails writes neither
    monkeypatch.setattr(world, "Builder__build_serialized_network", lambda *a: None)
    with pytest.raises(EngineError, match="could not build"):
        trt.build(onnx_files["fp32"], tmp_path / "f.engine", "fp32")
    assert not (tmp_path / "f.engine").exists() and not (tmp_path / "f.engine.json").exists()
    # an older record without output names
    del record["outputs"]
    (tmp_path / "old.engine").write_bytes(b"plan")
    (tmp_path / "old.engine.json").write_text(json.dumps(record))
    with pytest.raises(EngineError, match="lacks outputs"):
        load_engine(tmp_path / "old.engine")


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.1", "12.0.0"])
def test_unsupported_versions_are_refused(monkeypatch, onnx_files, tmp_path, version):
    install(monkeypatch, API_FILES[-1], version=version)
    with pytest.raises(BackendUnavailable, match=rf"TensorRT {version} found; this backend supports TensorRT "
                                                 r"10.x and 11.x"):
        trt.build(onnx_files["fp32"], tmp_path / "x.engine", "fp32")
    ok, why = trt.available()
    assert not ok and "supports TensorRT 10.x and 11.x" in why


def test_pyproject_pins_the_supported_majors():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("tensorrt = "))
    assert "cuda-python" not in line
    low, high = re.search(r'"tensorrt>=([\d.]+),<(\d+)"', line).groups()
    assert int(low.split(".")[0]) == trt.SUPPORTED_MAJORS[0] and int(high) == trt.SUPPORTED_MAJORS[-1] + 1
    assert {int(v.split(".")[0]) for v in VERSIONS} == set(trt.SUPPORTED_MAJORS)


# ------------------------------------------------------------------ on a GPU with TensorRT
HAS_TRT, TRT_WHY = trt.available()
gpu = pytest.mark.skipif(not HAS_TRT, reason=f"needs TensorRT and a CUDA GPU: {TRT_WHY}")


@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_float_engines_match_pytorch(onnx_files, tmp_path, precision):  # pragma: no cover - needs a GPU
    engine = build_engine(onnx_files["fp32"], tmp_path / f"{precision}.engine", backend="tensorrt",
                          precision=precision, batch=(1, 3, 4))
    x, (ref0, ref1) = onnx_files["x"], onnx_files["ref"]
    tol = 1e-4 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(engine(x), ref0, atol=tol * np.abs(ref0).max())
    np.testing.assert_allclose(engine.run(x, ["output1"])["output1"], ref1, atol=tol * np.abs(ref1).max())
    assert engine.device.stream_handle != 0
    rows = engine.layer_report()
    assert rows and all(r["precision"] in ("fp32", "fp16", "int8", "") for r in rows)
    if precision == "fp16":
        assert any(r["precision"] == "fp16" for r in rows)


@gpu
def test_gpu_int8_engine_runs_int8_layers(onnx_files, tmp_path):  # pragma: no cover - needs a GPU
    import onnxruntime as ort

    engine = build_engine(onnx_files["qdq"], tmp_path / "int8.engine", backend="tensorrt", precision="int8",
                          batch=(1, 3, 4))
    x = onnx_files["x"]
    ref = ort.InferenceSession(str(onnx_files["qdq"]), providers=["CPUExecutionProvider"]).run(["output0"],
                                                                                              {"input": x})[0]
    np.testing.assert_allclose(engine(x), ref, atol=0.05 * np.abs(ref).max())
    assert any(r["precision"] == "int8" for r in engine.layer_report())


@gpu
def test_gpu_device_index_is_used(onnx_files, tmp_path):  # pragma: no cover - needs a GPU
    last = torch.cuda.device_count() - 1
    engine = build_engine(onnx_files["fp32"], tmp_path / "d.engine", backend="tensorrt", precision="fp32",
                          batch=(1, 3, 4), device=f"cuda:{last}")
    assert engine.device.index == last and engine(onnx_files["x"]).shape == onnx_files["ref"][0].shape
    with pytest.raises(EngineError, match="CUDA device"):
        load_engine(tmp_path / "d.engine", device=f"cuda:{last + 1}")
