"""qcourse.ptq: TensorRT's placement rules, the Q/DQ placement checker, calibration, graph comparison.

Everything runs on a tiny CNN with one Concat and one MaxPool (seconds). The expected groups
are written from the forward pass below, by hand; ONNX Runtime and the ONNX graph are the
independent oracles for export.
"""
import numpy as np
import pytest
import torch
from torch import nn

from qcourse import ptq, quant_modules, workflow
from qcourse.export import export_onnx, list_qdq_nodes
from qcourse.nn import TensorQuantizer
from qcourse.tensor_quant import QuantDescriptor


class ConcatPoolNet(nn.Module):
    """c0 -> c1 = a -> c2 = b; c7 reads a; cat(a, b) read by c3, c4; pool(c3 out) read by c5; c6 reads c3 out."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o, k=1: nn.Conv2d(i, o, k, padding=k // 2)  # noqa: E731
        self.c0, self.c1, self.c2 = conv(3, 8, 3), conv(8, 8), conv(8, 8, 3)
        self.c3, self.c4 = conv(16, 8), conv(16, 8)
        self.c5, self.c6, self.c7 = conv(8, 8), conv(8, 8), conv(8, 8)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x0 = self.act(self.c0(x))
        a = self.act(self.c1(x0))
        b = self.act(self.c2(a))
        d = self.act(self.c7(a))          # reads a tensor the Concat reads
        cat = torch.cat([a, b], 1)
        y = self.act(self.c3(cat))        # first reader of the Concat: the major
        z = self.act(self.c4(cat))
        w = self.act(self.c5(self.pool(y)))   # first reader of the pool: the major
        v = self.act(self.c6(y))          # reads the pool's input
        feats = w.mean((2, 3)) + v.mean((2, 3)) + d.mean((2, 3)) + z.mean((2, 3))
        return self.fc(feats)


# what the forward above implies, read off by hand
EXPECTED = {"c3": ["c2", "c4", "c7"], "c5": ["c6"]}


def _model(**kw):
    torch.manual_seed(0)
    m = ConcatPoolNet().eval()
    quant_modules.replace_modules(m, quant_desc_input=QuantDescriptor(calib_method="histogram"),
                                  quant_desc_weight=QuantDescriptor(axis=0), **kw)
    return m


def _batches(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(2, 3, size, size, generator=g) for _ in range(n)]


def _calibrated(rules: bool, method="max"):
    m = _model()
    if rules:
        ptq.apply_placement_rules(m)
    ptq.calibrate(m, _batches(), 4, progress=False)
    ptq.load_amax(m, method)
    return m


def test_rules_tie_exactly_the_groups_of_the_graph():
    m = _model()
    assert ptq.apply_placement_rules(m) == EXPECTED
    for major, tied in EXPECTED.items():
        q = getattr(m, major)._input_quantizer
        assert all(getattr(m, name)._input_quantizer is q for name in tied)
    # the untied ones keep their own quantizer
    others = [getattr(m, n)._input_quantizer for n in ("c0", "c1", "c3", "c5")]
    assert len({id(q) for q in others}) == 4
    assert sorted(map(sorted, ptq.shared_input_quantizers(m))) == [["c2", "c3", "c4", "c7"], ["c5", "c6"]]


def test_rules_are_idempotent_and_find_nothing_without_concat_or_pool():
    m = _model()
    ptq.apply_placement_rules(m)
    assert ptq.apply_placement_rules(m) == EXPECTED
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    quant_modules.replace_modules(plain)
    assert ptq.apply_placement_rules(plain) == {}
    assert ptq.apply_placement_rules(nn.Sequential(nn.Conv2d(3, 4, 3)).eval()) == {}  # nothing quantized


def test_rules_skip_ignored_layers_and_work_with_quantized_maxpool():
    m = _model(ignore=r"c4$")  # c4 stays float: it cannot be tied
    assert ptq.apply_placement_rules(m) == {"c3": ["c2", "c7"], "c5": ["c6"]}
    m = _model(include_maxpool=True)  # the pool's own input quantizer is a reader of y
    groups = ptq.apply_placement_rules(m)
    assert groups["c3"] == EXPECTED["c3"] and sorted(groups["c5"]) == ["c6", "pool"]


def test_groups_that_share_a_member_merge_whatever_the_order():
    class TwoConcats(nn.Module):
        # s is read by both Concats: the two majors end up in one group with one quantizer
        def __init__(self):
            super().__init__()
            self.s, self.t, self.u = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.m1, self.m2, self.r = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            s = self.s(x)
            a = torch.cat([s, self.t(s)], 1)
            b = torch.cat([s, self.u(s)], 1)
            return self.m1(a) + self.m2(b)

    m = TwoConcats().eval()
    quant_modules.replace_modules(m)
    groups = ptq.apply_placement_rules(m)
    assert groups == {"m1": ["m2", "t", "u"]}
    assert len({id(getattr(m, n)._input_quantizer) for n in ("m1", "m2", "t", "u")}) == 1


def test_tied_quantizer_calibrates_on_every_member_and_saves_one_amax():
    m = _calibrated(rules=True)
    # oracle: max calibration of the group = the largest |input| any member saw, from hooks on a float copy
    torch.manual_seed(0)
    ref, seen = ConcatPoolNet().eval(), {}
    for name in ("c2", "c3", "c4", "c7"):
        getattr(ref, name).register_forward_pre_hook(
            lambda mod, inp, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), float(inp[0].abs().max()))))
    with torch.no_grad():
        for x in _batches():
            ref(x)
    amax = float(m.c3._input_quantizer.amax)
    assert amax >= max(seen.values())
    bin_width = float(m.c3._input_quantizer.calibrator.bin_width)
    assert amax - max(seen.values()) <= bin_width  # the histogram's top edge: within one bin
    sd = m.state_dict()
    assert all(torch.equal(sd[f"{n}._input_quantizer._amax"], sd["c3._input_quantizer._amax"]) for n in ("c2", "c4", "c7"))


def test_checker_finds_mismatches_without_rules_and_none_with(tmp_path):
    # percentile: with max calibration the scales would agree by themselves (max(cat(a, b)) is
    # max(a) when a holds the largest value, and max-pooling keeps the maximum)
    x = _batches(1)[0]
    for rules in (False, True):
        m = _calibrated(rules, method="percentile")
        path = export_onnx(m, x, tmp_path / f"rules_{rules}.onnx")
        problems = ptq.check_qdq_placement(path)
        if rules:
            assert problems == []
        else:
            assert len(problems) == 2
            assert problems[0].startswith("Concat") and problems[1].startswith("MaxPool")
    # oracle for "one scale": the tied Q nodes of the exported graph carry the same number
    scales = [float(r["scale"]) for r in list_qdq_nodes(tmp_path / "rules_True.onnx") if np.ndim(r["scale"]) == 0]
    # 9 quantized inputs (8 convs and the Linear); the groups of 4 and 2 leave 9 - 3 - 1 = 5 scales
    assert len(scales) == 9 and len(set(scales)) == 5


class CountingLoader:
    def __init__(self, n):
        self.batches, self.taken = _batches(n), 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.taken += 1
            yield b


def test_calibrate_takes_exactly_n_batches_and_refuses_too_few():
    m, loader = _model(), CountingLoader(6)
    assert ptq.calibrate(m, loader, 3, progress=False) == 3
    assert loader.taken == 3
    with pytest.raises(ValueError, match="has 6 batches, fewer than the 7"):
        ptq.calibrate(_model(), CountingLoader(6), 7, progress=False)
    with pytest.raises(ValueError, match="yielded 2 batches"):
        ptq.calibrate(_model(), iter(_batches(2)), 3, progress=False)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches must be a whole number >= 1"):
            ptq.calibrate(_model(), _batches(), bad, progress=False)


def test_every_method_gives_an_amax_from_the_same_statistics():
    m = _model()
    ptq.calibrate(m, _batches(), 4, progress=False)
    amax = {}
    for method in ptq.METHODS:
        amax[method] = float(ptq.load_amax(m, method)["c3._input_quantizer"])
    # percentile (99.99 %) and mse clip, max keeps everything
    assert amax["max"] >= max(amax["entropy"], amax["mse"], amax["percentile"])
    with pytest.raises(ValueError, match="unknown calibration method 'kl'; choose one of max, entropy"):
        ptq.load_amax(m, "kl")


def test_compare_graphs_counts_nodes_pairs_and_scales(tmp_path):
    x = _batches(1)[0]
    torch.manual_seed(0)
    fp32 = export_onnx(ConcatPoolNet().eval(), x, tmp_path / "fp32.onnx")
    int8 = export_onnx(_calibrated(rules=True), x, tmp_path / "int8.onnx")
    g = ptq.compare_graphs({"fp32": fp32, "int8": int8})
    assert g["fp32"]["nodes"]["Conv"] == g["int8"]["nodes"]["Conv"] == 8
    assert g["fp32"]["qdq_pairs"] == 0
    # one pair per quantized input and per weight: 9 inputs + 9 weights
    assert g["int8"]["qdq_pairs"] == 18 and g["int8"]["weight_quantizers"] == 9
    assert g["int8"]["activation_scales"] == 5 and g["int8"]["activation_q_nodes"] == 9


def test_int8_graph_in_onnx_runtime_computes_what_pytorch_computes(tmp_path):
    import onnxruntime as ort

    m = _calibrated(rules=True, method="entropy")
    x = _batches(1, size=16)[0]
    path = export_onnx(m, x, tmp_path / "int8.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = m(x).numpy()
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()


def _q_groups(model):
    """Per tensor, the ``(scale, zero point)`` of each QuantizeLinear reading it (values, not names)."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    groups = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
        elif n.op_type == "QuantizeLinear":
            groups.setdefault(n.input[0], []).append(
                (consts[n.input[1]].tobytes(), consts[n.input[2]].tobytes(), str(consts[n.input[2]].dtype)))
    return groups


@pytest.mark.parametrize("rules", [False, True])
def test_checker_and_ort_rewrite_read_the_tidied_graph_as_the_exporters(tmp_path, rules):
    # the exporter's graph routes tied scales through Identity and the tied inputs through
    # no-op Casts; export_onnx's graph has neither: same problems, same merged ORT graph
    import onnx

    from qcourse.engines import to_ort_int8
    from qdq_graph import assert_bit_identical, assert_tidy, qdq_structure, run_reference, untidied_export

    m = _calibrated(rules, method="percentile")
    x = _batches(1)[0]
    raw = untidied_export(m, x, tmp_path / "raw.onnx")
    tidy = export_onnx(m, x, tmp_path / "tidy.onnx")
    if rules:
        assert qdq_structure(raw)["identity"] > 0 and qdq_structure(raw)["noop_casts"] > 0
    assert_tidy(tidy)
    assert qdq_structure(tidy)["casts"] == 0
    assert ptq.check_qdq_placement(tidy) == ptq.check_qdq_placement(raw)
    assert len(ptq.check_qdq_placement(tidy)) == (0 if rules else 2)
    xs = _batches(1, size=16)[0].numpy()
    assert_bit_identical(run_reference(raw, xs), run_reference(tidy, xs))
    from_raw, info_raw = to_ort_int8(onnx.load(str(raw)), weight_dtype="uint8")
    from_tidy, info_tidy = to_ort_int8(onnx.load(str(tidy)), weight_dtype="uint8")
    assert info_tidy == info_raw
    groups = _q_groups(from_tidy)
    assert all(len(set(qs)) == len(qs) for qs in groups.values())   # no two Qs of one tensor at one scale left
    assert sorted(map(len, groups.values())) == sorted(map(len, _q_groups(from_raw).values()))
    if rules:   # c2 and c7 read a, c3 and c4 the Concat, each pair at one scale: one Q each
        assert max(map(len, groups.values())) == 1
    assert_bit_identical(run_reference(from_raw, xs), run_reference(from_tidy, xs))
