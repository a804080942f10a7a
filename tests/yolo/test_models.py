"""Tests for qcourse.yolo.models: YOLOv7 / YOLOv7-tiny structure, forward, fusing and ONNX export.

Oracles: parameter and module counts printed by the official YOLOv7 code in public training
logs, shapes derived by hand from the official configuration files, a numpy transcription
of the official box decoding, the unfused model (for fusing) and ONNX Runtime (for export).
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qcourse.yolo.models as M
from qcourse.yolo.models import (
    MP,
    SP,
    SPPCSPC,
    Concat,
    Conv,
    IDetect,
    RepConv,
    UnsupportedArchitectureError,
    build_model,
    get_config,
    identify_architecture,
    yolov7,
    yolov7_tiny,
)


@pytest.fixture(scope="module")
def v7():
    torch.manual_seed(0)
    return yolov7(nc=80)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return yolov7_tiny(nc=80)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise(model, seed=0):
    """Non-trivial BN statistics/affines and implicit vectors, so folding errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            if isinstance(m, M.ImplicitA):
                m.implicit.copy_(torch.randn(m.implicit.shape, generator=g) * 0.5)
            if isinstance(m, M.ImplicitM):
                m.implicit.copy_(1 + torch.randn(m.implicit.shape, generator=g) * 0.3)
    return model


# --------------------------------------------------------------------------------- structure


def test_yolov7_layers_and_key_types(v7):
    layers = list(v7.model)
    assert len(layers) == 106
    assert [name for name, _ in v7.model.named_children()] == [str(i) for i in range(106)]
    assert type(v7.model[105]) is IDetect
    assert all(type(v7.model[i]) is RepConv for i in (102, 103, 104))
    assert {i for i, m in enumerate(layers) if type(m) is MP} == {12, 25, 38, 76, 89}
    assert type(v7.model[51]) is SPPCSPC
    assert {i for i, m in enumerate(layers) if type(m) is nn.Upsample} == {53, 65}
    # official bookkeeping attributes
    for i, m in enumerate(layers):
        assert m.i == i
        assert m.np == n_params(m)
    assert v7.model[80].f == [-1, -3, 63] and v7.model[93].f == [-1, -3, 51]
    assert v7.model[105].f == [102, 103, 104] and v7.model[54].f == 37
    assert v7.model[37].type == "models.common.Conv"
    assert v7.model[105].type == "models.yolo.IDetect"
    assert v7.model[53].type == "torch.nn.modules.upsampling.Upsample"
    # YOLOv7 Conv activations are SiLU, BN eps/momentum as official initialize_weights
    assert all(type(m.act) is nn.SiLU for m in v7.modules() if type(m) is Conv)
    bns = [m for m in v7.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    assert not any("rbr_identity" in k for k in v7.state_dict())  # c1 != c2 at 102-104
    assert v7.arch == "yolov7" and v7.nc == 80 and len(v7.names) == 80


def test_yolov7_tiny_layers(tiny):
    layers = list(tiny.model)
    assert len(layers) == 78
    assert type(tiny.model[77]) is IDetect and tiny.model[77].f == [74, 75, 76]
    assert {i for i, m in enumerate(layers) if type(m) is MP} == {8, 15, 22}
    assert {i for i, m in enumerate(layers) if type(m) is SP} == {31, 32, 33}
    assert [m.m.kernel_size for m in layers[31:34]] == [5, 9, 13]
    assert type(tiny.model[36]) is Concat and tiny.model[36].f == [-1, -7]
    acts = [m.act for m in tiny.modules() if type(m) is Conv]
    assert len(acts) == 55  # 78 layers - 3 MP - 3 SP - 2 Upsample - 14 Concat - IDetect
    assert all(type(a) is nn.LeakyReLU and a.negative_slope == 0.1 and a.inplace for a in acts)
    assert len({id(a) for a in acts}) == len(acts)  # one module per layer, as the official eval
    assert not any(isinstance(m, RepConv) for m in tiny.modules())
    assert tiny.arch == "yolov7-tiny"


@pytest.mark.parametrize(
    "arch,nc,params,modules",
    [
        # "Model Summary: 415 layers, 37196556 parameters" (official train.py log, nc=1)
        ("yolov7", 1, 37_196_556, 415),
        # issue WongKinYiu/yolov7#504 log, Detect head, nc=80: "407 layers, 37620125 parameters";
        # the training IDetect head adds ImplicitA (256+512+1024) + ImplicitM (3*255): 2557
        ("yolov7", 80, 37_620_125 + 1792 + 765, 415),
        # issue WongKinYiu/yolov7#70 log (yolov7-tiny.yaml, nc=47): "263 layers, 6139464 parameters"
        ("yolov7-tiny", 47, 6_139_464, 263),
        # +33 classes x ((128+256+512)*3 weights + 3*3 biases + 3*3 ImplicitM) = 33 x 2706
        ("yolov7-tiny", 80, 6_139_464 + 33 * 2706, 263),
        # issue WongKinYiu/yolov7#958 log (tiny with Detect head, nc=4): "255 layers, 6022129"
        ("yolov7-tiny-deploy", 4, 6_022_129, 255),
    ],
)
def test_parameter_and_module_counts_match_official_logs(arch, nc, params, modules, v7, tiny):
    if (arch, nc) == ("yolov7", 80):
        model = v7
    elif (arch, nc) == ("yolov7-tiny", 80):
        model = tiny
    else:
        model = build_model(get_config(arch, nc))
    # the official summary line counts len(list(model.modules())) and all parameters
    assert n_params(model) == params
    assert len(list(model.modules())) == modules


def test_yolov7_without_implicit_layers_matches_detect_head_log(v7):
    # issue WongKinYiu/yolov7#504: cfg with a plain Detect head, nc=80 -> 407 modules, 37620125
    head = v7.model[105]
    implicit = list(head.ia.parameters()) + list(head.im.parameters())
    assert n_params(v7) - sum(p.numel() for p in implicit) == 37_620_125
    assert len(list(v7.modules())) - len(list(head.ia.modules())) - len(list(head.im.modules())) == 407


def test_official_key_shapes(v7, tiny):
    sd = v7.state_dict()
    expected = {  # derived by hand from cfg/training/yolov7.yaml and models/common.py
        "model.0.conv.weight": (32, 3, 3, 3),
        "model.0.bn.running_var": (32,),
        "model.11.conv.weight": (256, 256, 1, 1),  # concat of 4 x 64 channels
        "model.51.cv1.conv.weight": (512, 1024, 1, 1),
        "model.51.cv5.conv.weight": (512, 2048, 1, 1),
        "model.51.cv7.conv.weight": (512, 1024, 1, 1),
        "model.63.conv.weight": (256, 1024, 1, 1),  # 256+256+4x128 concat
        "model.102.rbr_dense.0.weight": (256, 128, 3, 3),
        "model.102.rbr_1x1.0.weight": (256, 128, 1, 1),
        "model.103.rbr_dense.1.running_mean": (512,),
        "model.104.rbr_dense.0.weight": (1024, 512, 3, 3),
        "model.105.m.0.weight": (255, 256, 1, 1),
        "model.105.m.2.weight": (255, 1024, 1, 1),
        "model.105.m.1.bias": (255,),
        "model.105.ia.1.implicit": (1, 512, 1, 1),
        "model.105.im.0.implicit": (1, 255, 1, 1),
        "model.105.anchors": (3, 3, 2),
        "model.105.anchor_grid": (3, 1, 3, 1, 1, 2),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("model.12.") for k in sd)  # MP has no parameters
    sdt = tiny.state_dict()
    assert tuple(sdt["model.77.m.0.weight"].shape) == (255, 128, 1, 1)
    assert tuple(sdt["model.76.conv.weight"].shape) == (512, 256, 3, 3)
    assert tuple(sdt["model.37.conv.weight"].shape) == (256, 512, 1, 1)
    # anchors: buffer in stride units, anchor_grid in pixels, strides from the probe
    head = v7.model[105]
    assert v7.stride.tolist() == [8.0, 16.0, 32.0]
    assert head.anchors[0].tolist() == [[1.5, 2.0], [2.375, 4.5], [5.0, 3.5]]
    assert head.anchor_grid.view(3, -1).tolist() == [
        [12, 16, 19, 36, 40, 28], [36, 75, 76, 55, 72, 146], [142, 110, 192, 243, 459, 401]]
    assert tiny.model[77].anchor_grid.view(3, -1).tolist()[0] == [10, 13, 16, 30, 33, 23]


def test_detection_bias_and_implicit_initialisation(tiny):
    head = tiny.model[77]
    for conv, s in zip(head.m, head.stride.tolist()):
        bound = 1 / math.sqrt(conv.in_channels)  # PyTorch's default bias init range
        b = conv.bias.detach().view(head.na, -1)
        obj = math.log(8 / (640 / s) ** 2)
        cls = math.log(0.6 / (80 - 0.99))
        assert torch.all((b[:, 4] - obj).abs() <= bound + 1e-6)
        assert torch.all((b[:, 5:] - cls).abs() <= bound + 1e-6)
        assert torch.all(b[:, :4].abs() <= bound + 1e-6)
    ia = torch.cat([m.implicit.flatten() for m in head.ia])
    im = torch.cat([m.implicit.flatten() for m in head.im])
    assert abs(ia.mean().item()) < 0.01 and 0.01 < ia.std().item() < 0.03
    assert abs(im.mean().item() - 1) < 0.01 and 0.01 < im.std().item() < 0.03
    # building (the stride probe) leaves BatchNorm statistics untouched
    bn = tiny.model[0].bn
    assert bn.num_batches_tracked.item() == 0 and torch.all(bn.running_var == 1)


def test_state_dict_round_trip_strict(tiny):
    torch.manual_seed(1)
    other = yolov7_tiny(nc=80)
    assert not torch.equal(other.model[0].conv.weight, tiny.model[0].conv.weight)
    x = torch.rand(1, 3, 64, 64)
    src = randomise(copy.deepcopy(tiny), seed=3).eval()
    result = other.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x)[0], src(x)[0])


# --------------------------------------------------------------------------------- forward


def test_forward_shapes_training_and_eval(tiny):
    model = copy.deepcopy(tiny).train()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)  # training mode: raw per-level outputs
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [
        (2, 3, 8, 12, 85), (2, 3, 4, 6, 85), (2, 3, 2, 3, 85)]
    model.eval()
    with torch.no_grad():
        pred, raw = model(x)
    assert tuple(pred.shape) == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 85)
    assert [tuple(r.shape) for r in raw] == [tuple(o.shape) for o in out]


def test_decode_matches_numpy_transcription_of_official_code(tiny):
    model = randomise(copy.deepcopy(tiny), seed=1).eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        pred, raw = model(x)
    head = model.model[-1]
    strides = head.stride.numpy()
    anchor_grid = head.anchor_grid.numpy()
    z = []
    for i, r in enumerate(raw):
        y = 1 / (1 + np.exp(-r.numpy().astype(np.float64)))
        bs, na, ny, nx, no = y.shape
        yv, xv = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        grid = np.stack((xv, yv), 2).reshape(1, 1, ny, nx, 2)
        y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + grid) * strides[i]
        y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchor_grid[i]
        z.append(y.reshape(bs, -1, no))
    ref = np.concatenate(z, 1)
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-5, atol=1e-4)
    # boxes really are in input pixels: centres inside a stride-padded image
    assert pred[..., 0].max() < 64 + 32 and pred[..., 1].max() < 96 + 32
    assert 0 < pred[..., 4:].min() and pred[..., 4:].max() < 1


# --------------------------------------------------------------------------------- fusing


def test_fused_equals_unfused_tiny(tiny):
    model = randomise(copy.deepcopy(tiny), seed=2).eval()
    fused = copy.deepcopy(model).fuse()
    keys = fused.state_dict().keys()
    assert not any(".bn." in k for k in keys) and "model.0.conv.bias" in keys
    assert fused.fused and not model.fused
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        p0, r0 = model(x)
        p1, r1 = fused(x)
        fused.fuse()  # idempotent
        p2, _ = fused(x)
    for a, b in zip(r0, r1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(p2, p1, rtol=0, atol=0)
    # the fold must use the running statistics: with fresh BN stats the outputs differ
    with torch.no_grad():
        assert (r0[0] - model.train()(x)[0]).abs().max() > 1e-2


def test_fused_equals_unfused_yolov7(v7):
    model = randomise(copy.deepcopy(v7), seed=4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        p0, r0 = model(x)
        fused = model.fuse()  # in place
        p1, r1 = fused(x)
    keys = fused.state_dict().keys()
    assert "model.102.rbr_reparam.weight" in keys and "model.104.rbr_reparam.bias" in keys
    assert not any("rbr_dense" in k or "rbr_1x1" in k or ".bn." in k for k in keys)
    assert fused.model[105].fused
    for a, b in zip(r0, r1):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(p1, p0, rtol=1e-3, atol=1e-2)


def test_repconv_with_identity_branch_and_groups_fuses_exactly():
    torch.manual_seed(0)
    for g in (1, 2):
        block = RepConv(8, 8, 3, 1, g=g)
        assert isinstance(block.rbr_identity, nn.BatchNorm2d)
        randomise(block, seed=g).eval()
        x = torch.randn(2, 8, 9, 7)
        with torch.no_grad():
            y0 = block(x)
            block.fuse_repvgg_block()
            y1 = block(x)
        assert block.rbr_identity is None and "rbr_reparam" in dict(block.named_children())
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)


def test_implicit_fold_matches_official_formula():
    torch.manual_seed(0)
    head = randomise(IDetect(nc=1, anchors=[[10, 13, 16, 30, 33, 23]] * 3, ch=(8, 16, 32)), seed=5)
    conv, ia, im = head.m[0], head.ia[0], head.im[0]
    x = torch.randn(1, conv.in_channels, 4, 4)
    with torch.no_grad():
        ref = im(conv(ia(x)))
        head.fuse()
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is deprecated
def test_onnx_export_dynamic_batch_matches_onnxruntime(tmp_path, tiny):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = randomise(copy.deepcopy(tiny), seed=6).eval()
    path = tmp_path / "tiny.onnx"
    names = ["pred", "p3", "p4", "p5"]
    torch.onnx.export(
        model, torch.rand(1, 3, 64, 64), str(path), dynamo=False, opset_version=13,
        input_names=["images"], output_names=names,
        dynamic_axes={n: {0: "batch"} for n in ["images"] + names},
    )
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 13
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 64, 64)  # a batch size other than the export's
    outs = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        pred, raw = model(x)
    np.testing.assert_allclose(outs[0], pred.numpy(), rtol=1e-4, atol=1e-3)
    for o, r in zip(outs[1:], raw):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- configs & errors


def test_identify_architecture_and_config_errors():
    for arch in M.ARCHITECTURES:
        assert identify_architecture(get_config(arch, 7)) == arch
    cfg = get_config("yolov7-tiny")
    cfg["head"][0][3][0] = 128
    assert identify_architecture(cfg) == "custom"
    with pytest.raises(ValueError, match="unknown architecture 'yolov8'"):
        get_config("yolov8")
    with pytest.raises(ValueError, match="nc .* >= 1, got 0"):
        yolov7_tiny(nc=0)
    with pytest.raises(ValueError, match="got 2 class names for nc=3"):
        yolov7_tiny(nc=3, names=["a", "b"])
    bad = get_config("yolov7-tiny")
    bad["backbone"][0][2] = "ReOrg"
    with pytest.raises(UnsupportedArchitectureError, match="layer 0 uses module 'ReOrg'"):
        build_model(bad)
    bad = get_config("yolov7-tiny")
    bad["backbone"][0][3][5] = "nn.GELU()"
    with pytest.raises(UnsupportedArchitectureError, match="nn.GELU"):
        build_model(bad)


def test_custom_width_multiple_scales_channels():
    cfg = get_config("yolov7-tiny", 2)
    cfg["width_multiple"] = 0.5
    model = build_model(cfg)
    assert model.model[0].conv.out_channels == 16  # make_divisible(32 * 0.5, 8)
    assert model.model[77].m[0].out_channels == 3 * 7  # head outputs are not scaled
    assert model.arch == "custom"
    model.eval()
    with torch.no_grad():
        assert tuple(model(torch.rand(1, 3, 64, 64))[0].shape) == (1, 3 * (64 + 16 + 4), 7)
