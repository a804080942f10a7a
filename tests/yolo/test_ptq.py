"""qcourse.yolo.ptq and `qcourse ptq`: YOLOv7 PTQ with TensorRT's placement rules (lesson 5).

The expected tied groups below were written by reading the layer lists in
qcourse/yolo/models/configs.py (which layer reads which), not by printing the rules' output:
for every Concat, its major is the first conv reading it and the tied ones are the other
convs reading it and the convs reading one of its inputs; for every MP whose output a conv
reads first, the convs reading the MP's input are tied to that conv.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

from qcourse import ptq, workflow
from qcourse.course.cli import main
from qcourse.export import export_onnx
from qcourse.yolo import models
from qcourse.yolo import ptq as yptq
from qcourse.yolo.datasets import create_dataloader, ensure_default_dataset
from qcourse.utils import OWNED_LIST, atomic_write, is_owned


def _c(*layers):
    return [f"model.{i}.conv" for i in layers]


# YOLOv7-tiny: ELAN concats 6/13/20/27 (inputs: the two 1x1 branches and two 3x3 convs), MP 15
# and 22 whose inputs 14 and 21 also feed the routes 50 and 40, the head concats 41/51/59/67
# read by two convs each, and 59/67 also read 47/37, which 48/38 read too. The SPP concat 34
# and concat 36 have no conv reading their inputs; MP 8's input (7) feeds nothing else.
TINY = {
    "model.7.conv": _c(4, 5), "model.14.conv": _c(11, 12), "model.16.conv": _c(50),
    "model.21.conv": _c(18, 19), "model.23.conv": _c(40), "model.28.conv": _c(25, 26),
    "model.42.conv": _c(43), "model.47.conv": _c(44, 45), "model.52.conv": _c(53),
    "model.57.conv": _c(54, 55), "model.60.conv": _c(48, 61), "model.65.conv": _c(62, 63),
    "model.68.conv": _c(38, 69), "model.73.conv": _c(70, 71),
}

# YOLOv7 (fused): the course's 20 groups, e.g. model.6 and model.8 to model.11, model.14 to model.13.
YOLOV7 = {
    "model.11.conv": _c(6, 8), "model.13.conv": _c(14), "model.17.conv": _c(18), "model.24.conv": _c(19, 21),
    "model.26.conv": _c(27, 66), "model.30.conv": _c(31), "model.37.conv": _c(32, 34),
    "model.39.conv": _c(40, 54), "model.43.conv": _c(44), "model.50.conv": _c(45, 47), "model.56.conv": _c(57),
    "model.63.conv": _c(58, 59, 60, 61), "model.68.conv": _c(69), "model.75.conv": _c(70, 71, 72, 73),
    "model.77.conv": _c(78) + ["model.102.rbr_reparam"], "model.81.conv": _c(64, 82),
    "model.88.conv": _c(83, 84, 85, 86), "model.90.conv": _c(91) + ["model.103.rbr_reparam"],
    "model.94.conv": _c(52, 95), "model.101.conv": _c(96, 97, 98, 99),
}


def _quantized(arch, fuse):
    torch.manual_seed(0)
    m = models.build_model(models.get_config(arch, 6)).eval()
    if fuse:
        m.fuse()
    return yptq.quantize(m)


@pytest.mark.parametrize("fuse", [False, True])
def test_rules_on_yolov7_tiny_tie_the_groups_of_its_config(fuse):
    qm, info = _quantized("yolov7-tiny", fuse)
    assert info["groups"] == TINY
    assert info["ignored"] == ["model.77.m.0", "model.77.m.1", "model.77.m.2"]
    for major, tied in TINY.items():
        q = qm.get_submodule(major)._input_quantizer
        assert all(qm.get_submodule(n)._input_quantizer is q for n in tied)


def test_rules_on_yolov7_tie_the_courses_20_groups():
    qm, info = _quantized("yolov7", fuse=True)
    assert info["groups"] == YOLOV7 and len(YOLOV7) == 20
    assert info["ignore"] == [r"model\.105\.m\..*"]


def test_rules_on_unfused_yolov7_tie_both_repconv_branches():
    _, info = _quantized("yolov7", fuse=False)
    assert info["groups"]["model.77.conv"] == _c(78) + ["model.102.rbr_1x1.0", "model.102.rbr_dense.0"]


# ----------------------------------------------------------------------------- on the default
@pytest.fixture(scope="module")
def data():
    root = ensure_default_dataset(progress=False)
    calib = create_dataloader(root, "train", img_size=160, batch_size=8, shuffle=False)
    val = create_dataloader(root, "val", img_size=160, batch_size=8)
    return calib, val


@pytest.fixture(scope="module")
def calibrated(data):
    """The default model, quantized with and without rules, calibrated on 2 batches (percentile)."""
    out = {}
    for rules in (True, False):
        qm, _ = yptq.quantize(yptq.load_float_model(), rules=rules)
        ptq.calibrate(qm, data[0], 2, progress=False)
        ptq.load_amax(qm, "percentile")
        out[rules] = qm
    return out


def test_checker_finds_mismatches_without_rules_and_none_with(calibrated, tmp_path):
    x = torch.zeros(1, 3, 160, 160)
    with_rules = ptq.check_qdq_placement(export_onnx(calibrated[True], x, tmp_path / "rules.onnx"))
    without = ptq.check_qdq_placement(export_onnx(calibrated[False], x, tmp_path / "norules.onnx"))
    assert with_rules == []
    # every group of TINY comes from one Concat or one MaxPool. Untied, each differs except
    # concats 41 and 51, whose only quantized neighbours (42/43, 52/53) read the very same
    # tensor: identical statistics give identical amax even without a tie
    names = sorted(p.split()[1].rstrip(":") for p in without)
    expected = [f"/model.{i}/Concat" for i in (6, 13, 20, 27, 46, 56, 59, 64, 67, 72)]
    assert names == sorted(expected + ["/model.15/m/MaxPool", "/model.22/m/MaxPool"])


def test_calibrated_checkpoint_reloads_with_identical_outputs(calibrated, data, tmp_path):
    qm = calibrated[True]
    path = yptq.save_quantized(qm, tmp_path / "int8.pt", method="percentile")
    plain = torch.load(path, weights_only=True)  # plain tensors and data: no code
    assert plain["format"] == "qcourse.yolo.ptq" and plain["meta"]["method"] == "percentile"
    back = yptq.load_quantized(path)
    x = next(iter(data[1]))[0]
    with torch.no_grad():
        assert torch.equal(qm(x)[0], back(x)[0])
    assert sorted(map(sorted, ptq.shared_input_quantizers(back))) == sorted(map(sorted, ptq.shared_input_quantizers(qm)))
    amax = {k: v for k, v in back.state_dict().items() if k.endswith("_amax")}
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in amax.items()) and len(amax) == 110
    with pytest.raises(models.CheckpointError, match="load it with qcourse.yolo.ptq.load_quantized"):
        models.load_checkpoint(path)


def test_int8_onnx_in_onnx_runtime_agrees_with_pytorch(calibrated, data, tmp_path):
    qm = calibrated[True]
    path = export_onnx(qm, torch.zeros(1, 3, 160, 160), tmp_path / "int8.onnx")
    r = yptq.ort_agreement(qm, path, data[1], batches=2)
    assert r["images"] == 16 and r["detections"] > 20
    # same detections up to rounding ties: at most one PyTorch detection in 20 without a partner
    assert r["matched"] >= 0.95 and r["ort_only"] <= 0.05 * r["detections"]


def test_int8_onnx_gives_every_qdq_its_own_constants_and_keeps_every_output_bit(calibrated, data, tmp_path):
    import onnx

    from qcourse.engines import to_ort_int8
    from qdq_graph import (assert_bit_identical, assert_same_quantizers, assert_tidy, qdq_structure,
                           run_reference, untidied_export)

    qm, example = calibrated[True], torch.zeros(1, 3, 160, 160)
    raw = untidied_export(qm, example, tmp_path / "raw.onnx")
    tidy = export_onnx(qm, example, tmp_path / "int8.onnx")
    before, after = qdq_structure(raw), qdq_structure(tidy)
    # the exporter's graph: every pair shares its constants, tied scales reach Qs through
    # Identity nodes, the tied inputs go through Casts to float of float tensors
    assert before["qdq"] == 220 and before["shared"] == 440
    assert before["identity"] > 0 and before["noop_casts"] > 0
    assert_tidy(tidy)
    assert after["qdq"] == 220 and after["identities"] == 0
    assert after["casts"] == before["casts"] - before["noop_casts"] > 0   # the head's int64 -> float grid stays
    assert_same_quantizers(raw, tidy)
    assert ptq.check_qdq_placement(tidy) == ptq.check_qdq_placement(raw) == []
    x = next(iter(data[1]))[0].numpy()
    assert_bit_identical(run_reference(raw, x), run_reference(tidy, x))
    # the ORT INT8 rewrite merges the tied Qs by value: the same graph from both
    (a, info_a), (b, info_b) = (to_ort_int8(onnx.load(str(p)), weight_dtype="uint8") for p in (raw, tidy))
    assert info_a == info_b and info_b["convs"] > 0
    assert sum(n.op_type == "QuantizeLinear" for n in a.graph.node) == sum(n.op_type == "QuantizeLinear" for n in b.graph.node)
    assert_bit_identical(run_reference(a, x), run_reference(b, x))


# ----------------------------------------------------------------------------- the command
def test_cli_runs_end_to_end_on_a_small_slice(tmp_path, capsys):
    out = tmp_path / "ptq"
    rc = main(["ptq", "--calib-batches", "1", "--eval-batches", "1", "--batch-size", "8",
               "--method", "entropy", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["img_size"] == 160 and res["calib_batches"] == 1 and res["rules"] is True
    assert res["ignored"] == ["model.77.m.0", "model.77.m.1", "model.77.m.2"]
    assert set(res["int8"]) == {"entropy"} and res["int8"]["entropy"]["placement_problems"] == 0
    for f in (res["fp32"]["onnx"], res["int8"]["entropy"]["onnx"], res["int8"]["entropy"]["checkpoint"]):
        assert (out / f).is_file()
    written = ["fp32.onnx", "int8_entropy.onnx", "int8_entropy.pt", "results.json"]
    assert sorted(p.name for p in out.iterdir()) == [OWNED_LIST, *written]  # no staging folder left
    assert all(is_owned(out / name) for name in written)  # listed as qcourse's: a rerun may replace them
    assert 0 <= res["int8"]["entropy"]["map"] <= 1 and "int8 entropy" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    no_images = tmp_path / "coco_empty"
    (no_images / "annotations").mkdir(parents=True)
    no_ann = tmp_path / "coco_noann"
    (no_ann / "train2017").mkdir(parents=True)
    (no_ann / "val2017").mkdir()
    return [
        (["--weights", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
        (["--weights", str(corrupt)], "is not a readable PyTorch checkpoint"),
        (["--coco", str(no_images)], "no image folder for split 'train2017'"),
        (["--coco", str(no_ann)], "instances_train2017.json"),
        (["--ignore", "model\\.77\\.(m"], "not a valid regular expression"),
        (["--ignore", "backbone\\..*"], "matches no quantizable layer"),
        (["--method", "kl"], "invalid choice: 'kl'"),
        (["--calib-batches", "0"], "0 is too small"),
    ]


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    for args, message in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        rc = main(["ptq", *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert err.startswith("qcourse: error:") and err.count("\n") == 1 and message in err, (args, err)
        assert not (out / "results.json").exists()


@pytest.mark.parametrize("name", ["results.json", "fp32.onnx", "int8_max.pt"])
def test_a_users_file_in_out_is_refused_before_any_work(tmp_path, name, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("the run started working instead of refusing")

    monkeypatch.setattr(yptq, "_prepare", refuse)
    out = tmp_path / "ptq"
    out.mkdir()
    with atomic_write(out / "int8_max.onnx") as tmp:  # an earlier run's file: that one may be replaced
        tmp.write_text("from an earlier run")
    mine = out / name
    mine.write_text("the user's own file")
    assert main(["ptq", "--method", "max", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mine) in err and "was not written by qcourse" in err
    assert mine.read_text() == "the user's own file"



def test_settings_are_named_parsed_and_checked():
    s = yptq.Setting.parse(" w4ptA6 ", method="entropy")
    assert (s.w_bits, s.per_channel, s.a_bits, s.method, s.name) == (4, False, 6, "entropy", "W4ptA6")
    inp, w = s.descriptors()
    assert (inp.num_bits, inp.calib_method, w.num_bits, w.axis) == (6, "histogram", 4, None)
    assert yptq.Setting().name == "W8pcA8" and yptq.Setting().descriptors()[1].axis == 0
    assert yptq.METHOD_STRESS.name == "W8pcA6" and yptq.SENSITIVITY_STRESS.as_dict()["method"] == "entropy"
    for bad in ("W9pcA8", "W8xxA8", "8/8", "W1pcA8"):
        with pytest.raises(ValueError, match="is not a setting like W8pcA6"):
            yptq.Setting.parse(bad)
    with pytest.raises(ValueError, match="a_bits must be a whole number of bits from 2 to 8, got 9"):
        yptq.Setting(8, True, 9)
    with pytest.raises(ValueError, match="unknown calibration method 'minmax'"):
        yptq.Setting(method="minmax")


def test_calibrated_at_a_setting_rounds_on_its_grid(data):
    """Every quantized input of the W8ptA5 model takes at most 2^5 levels; weights 2^8, one amax per tensor."""
    qm = yptq.calibrated(yptq.load_float_model(), yptq.Setting(8, False, 5, "max"), data[0], 1)
    conv = qm.model[2].conv
    x = torch.randn(2, conv.in_channels, 12, 12) * 3
    assert len(torch.unique(conv._input_quantizer(x))) <= 2 ** 5
    assert conv._weight_quantizer.amax.numel() == 1
    assert float(conv._weight_quantizer.amax) == pytest.approx(float(conv.weight.abs().max()))
    assert len(torch.unique(conv._weight_quantizer(conv.weight))) <= 2 ** 8


# ----------------------------------------------------------------------------- the method screen
def _same_table(a, b):
    return (np.array_equal(a.image_ids, b.image_ids) and np.array_equal(a.gt, b.gt) and len(a.tp) == len(b.tp)
            and all(np.array_equal(x, y) for f in ("det_image", "tp", "fp") for x, y in zip(getattr(a, f), getattr(b, f))))


def test_method_screen_calibrates_once_and_equals_a_calibration_per_method(data, tmp_path, monkeypatch):
    """Each method's row is what a model calibrated for that method alone scores (evaluated here); one
    calibration pass serves them all; the tables saved are the ones returned."""
    from qcourse.yolo import intervals
    from qcourse.yolo.evaluate import evaluate

    calib, val = data
    model = yptq.load_float_model()
    passes = []
    real_calibrate = ptq.calibrate
    monkeypatch.setattr(ptq, "calibrate", lambda *a, **k: passes.append(1) or real_calibrate(*a, **k))
    methods = ("percentile", "max")
    rows = yptq.method_screen(model, yptq.METHOD_STRESS, calib, 1, val, methods=methods, eval_batches=1,
                              out=tmp_path / "stress")
    assert len(passes) == 1 and list(rows) == list(methods)
    for method in methods:
        oracle = yptq.calibrated(model, dataclasses.replace(yptq.METHOD_STRESS, method=method), calib, 1)
        want = evaluate(oracle, val, progress=False, max_batches=1, matches=True)
        row = rows[method]
        assert (row["map"], row["map50"], row["images"]) == (round(want["map"], 4), round(want["map50"], 4), 8)
        assert _same_table(row["table"], want["matches"])
        assert row["matches"] == f"{method}.npz"
        assert _same_table(intervals.load_table(tmp_path / "stress" / row["matches"]), row["table"])
    # at 6 bits max's range is wider than percentile's: the amax really was switched
    assert rows["max"]["map"] != rows["percentile"]["map"]
    with pytest.raises(ValueError, match="unknown calibration method"):
        yptq.method_screen(model, yptq.METHOD_STRESS, calib, 1, val, methods=("kl",))
