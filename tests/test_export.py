"""Q/DQ export: ONNX Runtime on the exported graph is the oracle."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qcourse import nn as quant_nn
from qcourse import quant_modules, workflow
from qcourse.export import export_onnx, list_qdq_nodes, load_onnx
from qcourse.tensor_quant import QuantDescriptor


def run_ort(path, *inputs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


class One(nn.Module):
    def __init__(self, desc):
        super().__init__()
        self.q = quant_nn.TensorQuantizer(desc)

    def forward(self, x):
        return self.q(x)


@pytest.mark.parametrize("desc", [
    QuantDescriptor(amax=2.0),
    QuantDescriptor(amax=2.0, narrow_range=True),
    QuantDescriptor(amax=3.0, unsigned=True),
    QuantDescriptor(amax=[0.5, 1.0, 2.0, 4.0], axis=1),
    QuantDescriptor(amax=[0.5, 1.0, 2.0, 4.0], axis=1, narrow_range=True),
], ids=["per-tensor", "narrow", "unsigned", "per-channel", "per-channel-narrow"])
def test_single_quantizer_exact(tmp_path, desc):
    m = One(desc)
    if desc.axis is not None:
        m.q.amax = torch.tensor(desc.amax).view(1, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g) * 3
    # put values exactly on rounding ties and at the clipping edges as well
    x.view(-1)[:8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 127.5, -128.5, -127.5, 126.5]) * (2.0 / 127)
    if desc.unsigned:
        x = x.abs()
    path = export_onnx(m, x[:1], tmp_path / "one.onnx")
    ours = m(x)
    (theirs,) = run_ort(path, x)  # batch 2 through a graph exported with batch 1
    np.testing.assert_array_equal(ours.numpy(), theirs)
    rows = list_qdq_nodes(path)
    assert len(rows) == 1
    zp = rows[0]["zero_point"]
    assert zp.dtype == (np.uint8 if desc.unsigned else np.int8) and not zp.any()
    bound = 255 if desc.unsigned else 127
    np.testing.assert_array_equal(rows[0]["scale"], (np.asarray(desc.amax, np.float32) / np.float32(bound)))
    if desc.axis is not None:
        assert rows[0]["axis"] == 1 and rows[0]["scale"].shape == (4,)
    else:  # per-tensor scale and zero point are scalars, as TensorRT's parser expects
        assert rows[0]["scale"].shape == () and zp.shape == ()


def test_minus_128_code_agrees(tmp_path):
    # not narrow: -amax - step must survive as the -128 code in both worlds
    m = One(QuantDescriptor(amax=1.27))
    x = torch.tensor([[-1.28, -1.275, -5.0, 1.28, 5.0]])
    (theirs,) = run_ort(export_onnx(m, x, tmp_path / "m.onnx"), x)
    np.testing.assert_array_equal(m(x).numpy(), theirs)
    assert float(m(x)[0, 0]) == pytest.approx(-1.28)
    # narrow: both clamp at -127
    n = One(QuantDescriptor(amax=1.27, narrow_range=True))
    (theirs,) = run_ort(export_onnx(n, x, tmp_path / "n.onnx"), x)
    np.testing.assert_array_equal(n(x).numpy(), theirs)
    assert float(n(x)[0, 0]) == pytest.approx(-1.27)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_small_cnn_matches_ort(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    quant_modules.replace_modules(model)
    loader = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    workflow.calibrate_model(model, loader, progress=False)
    x = torch.randn(5, 3, 16, 16)
    path = export_onnx(model, x[:2], tmp_path / "cnn.onnx")
    (theirs,) = run_ort(path, x)
    with torch.no_grad():
        ours = model(x).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    graph = load_onnx(path).graph
    ops = [n.op_type for n in graph.node]
    # input + weight quantizer for 3 convs and the linear, input for the pool
    assert ops.count("QuantizeLinear") == 9 and ops.count("DequantizeLinear") == 9
    rows = list_qdq_nodes(path)
    axes = sorted(r["axis"] for r in rows if r["axis"] is not None)
    assert axes == [0, 0, 0, 1]  # conv, conv, linear weights on axis 0; conv-transpose on 1
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx.load(str(path)).opset_import[0].version == 13
    # and the quantized model really differs from float
    with torch.no_grad(), workflow.disable_quantization(model):
        assert not np.allclose(model(x).numpy(), ours, atol=1e-6)


def test_float_model_exports_without_qdq(tmp_path):
    path = export_onnx(SmallCNN().eval(), torch.randn(1, 3, 8, 8), tmp_path / "f.onnx", dynamic_batch=False)
    assert not list_qdq_nodes(path)


def test_export_errors(tmp_path):
    with pytest.raises(RuntimeError, match="no amax"):
        export_onnx(One(QuantDescriptor()), torch.randn(1, 4), tmp_path / "a.onnx")
    with pytest.raises(RuntimeError, match="num_bits=4"):
        export_onnx(One(QuantDescriptor(num_bits=4, amax=1.0)), torch.randn(1, 4), tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(One(QuantDescriptor(amax=1.0)), torch.randn(1, 4), tmp_path / "c.onnx", opset=10)
    assert not list(tmp_path.glob("*.onnx"))  # nothing half-written left behind


def test_corrupt_onnx_is_reported(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        list_qdq_nodes(bad)
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        load_onnx(tmp_path / "missing.onnx")


def test_shared_quantizer_scale_is_listed_for_every_use(tmp_path):
    # one quantizer used twice: each of its two Q/DQ pairs reads its own copy of the scale
    add = quant_nn.QuantAdd(QuantDescriptor(amax=2.54))
    a, b = torch.randn(2, 8), torch.randn(2, 8) * 3
    path = export_onnx(add, (a, b), tmp_path / "add.onnx")
    rows = list_qdq_nodes(path)
    assert len(rows) == 2
    for r in rows:
        np.testing.assert_array_equal(r["scale"], np.float32(2.54) / np.float32(127))
    np.testing.assert_array_equal(add(a, b).numpy(), run_ort(path, a, b)[0])


def test_fp8_quantizer_exports_at_opset_19_only(tmp_path):
    m = One(QuantDescriptor(num_bits=(4, 3), amax=2.0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="opset >= 19"):
        export_onnx(m, x, tmp_path / "fp8_13.onnx")
    path = export_onnx(m, x, tmp_path / "fp8.onnx", opset=19)
    (theirs,) = run_ort(path, x)
    np.testing.assert_array_equal(m(x).numpy(), theirs)   # ONNX Runtime's float8 Q/DQ is the oracle


# ----------------------------------------------------------------------------- the tidy pass
def _digits_cnn():
    from qcourse.course.digits import DigitsCNN, load_digits

    torch.manual_seed(0)
    m = DigitsCNN().eval()
    quant_modules.replace_modules(m)
    data = load_digits()
    workflow.calibrate_model(m, [data.x_calib[i:i + 64] for i in range(0, 256, 64)], progress=False)
    return m, (data.x_test[:1],), (data.x_test[:37],)


def _shared_add():
    torch.manual_seed(1)
    add = quant_nn.QuantAdd(QuantDescriptor(amax=2.54))
    a, b = torch.randn(2, 8), torch.randn(2, 8) * 3
    return add, (a[:1], b[:1]), (a, b)


def _per_channel():
    m = One(QuantDescriptor(amax=[0.5, 1.0, 2.0, 4.0], axis=1, narrow_range=True))
    m.q.amax = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * 3
    return m, (x[:1],), (x,)


@pytest.mark.parametrize("make", [_digits_cnn, _shared_add, _per_channel], ids=["digits", "shared-add", "per-channel"])
def test_every_qdq_node_reads_its_own_constants_and_outputs_stay_bit_identical(tmp_path, make):
    from qdq_graph import (assert_bit_identical, assert_same_quantizers, assert_tidy, qdq_structure,
                           run_reference, untidied_export)

    model, example, inputs = make()
    raw = untidied_export(model, example, tmp_path / "raw.onnx")
    tidy = export_onnx(model, example, tmp_path / "tidy.onnx")
    before, after = qdq_structure(raw), qdq_structure(tidy)
    # the exporter's own graph: each Q shares its scale and zero point with its DQ (a shared
    # quantizer's folded scale even reaches one pair through an Identity)
    assert before["shared"] == 2 * before["qdq"] > 0 and before["not_initializer"] > 0
    assert_tidy(tidy)
    assert after["qdq"] == before["qdq"] and after["identities"] == 0
    assert_same_quantizers(raw, tidy)
    feeds = [x.numpy() for x in inputs]
    assert_bit_identical(run_reference(raw, *feeds), run_reference(tidy, *feeds))


def test_shared_quantizers_identity_is_gone(tmp_path):
    from qdq_graph import qdq_structure, untidied_export

    add, example, _ = _shared_add()
    # one quantizer on both inputs: the exporter folds its scale once and copies it (Identity) to the second pair
    assert qdq_structure(untidied_export(add, example, tmp_path / "raw.onnx"))["identity"] == 2
    assert qdq_structure(export_onnx(add, example, tmp_path / "tidy.onnx"))["identity"] == 0


def test_tidy_pass_is_idempotent(tmp_path):
    from qcourse.export import tidy_qdq_graph

    model, example, _ = _digits_cnn()
    tidy = onnx.load(str(export_onnx(model, example, tmp_path / "tidy.onnx")))
    again = onnx.ModelProto.FromString(tidy.SerializeToString())
    assert tidy_qdq_graph(again) == {"qdq_constants": 0, "casts": 0, "nodes_removed": 0}
    assert again.SerializeToString() == tidy.SerializeToString()


def _cast_graph():
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=f, name="noop_of_input"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Cast", ["b"], ["y"], to=f, name="noop_to_output"),
        helper.make_node("Cast", ["b"], ["z"], to=TensorProto.INT32, name="changes_type"),
        helper.make_node("Cast", ["x"], ["w"], to=f, name="input_to_output"),
        helper.make_node("Cast", ["z"], ["v"], to=TensorProto.INT32, name="noop_of_int"),
    ]
    graph = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", f, ["n", 3])],
                              [helper.make_tensor_value_info("y", f, ["n", 3]),
                               helper.make_tensor_value_info("v", TensorProto.INT32, ["n", 3]),
                               helper.make_tensor_value_info("w", f, ["n", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_noop_casts_go_and_type_changes_stay():
    from qcourse.export import remove_noop_casts
    from qdq_graph import assert_bit_identical, qdq_structure, run_reference

    model = _cast_graph()
    before = onnx.ModelProto.FromString(model.SerializeToString())
    assert qdq_structure(before)["noop_casts"] == 4
    assert remove_noop_casts(model) == 3
    onnx.checker.check_model(model, full_check=True)
    # the type change stays, and the copy of a graph input to a graph output (no node can write "w")
    assert sorted(n.name for n in model.graph.node if n.op_type == "Cast") == ["changes_type", "input_to_output"]
    assert [o.name for o in model.graph.output] == ["y", "v", "w"]
    x = np.array([[-1.5, 0.0, 2.25]] * 2, np.float32)
    assert_bit_identical(run_reference(before, x), run_reference(model, x))
