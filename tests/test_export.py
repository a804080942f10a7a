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
    # one quantizer used twice: the exporter folds its scale once and copies it with Identity
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
