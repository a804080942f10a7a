"""qcourse.yolo.sensitivity and `qcourse sensitivity` on the embedded default, on small slices (lesson 6).

Oracles: the default with one layer's convs swapped for plain float ``nn.Conv2d`` (built here,
without qcourse.sensitivity) evaluated by qcourse.yolo.evaluate; YOLOv7-tiny's 55 quantized
layers counted from its config (78 layers, less the 22 without a conv — Concat, MP, SP —
and the head model.77, left in float).
"""
import contextlib
import copy
import io
import json
from pathlib import Path

import torch

import pytest
from torch import nn

from cli_helpers import error_line, run_cli
from qcourse import sensitivity as sens
from qcourse.course.cli import main
from qcourse.yolo import ptq as yptq
from qcourse.yolo import sensitivity as ys
from qcourse.utils import is_owned
from qcourse.yolo.evaluate import evaluate

SMALL = ["--calib-batches", "1", "--eval-batches", "1", "--batch-size", "8"]
N_LAYERS = 55


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """One full CLI run on a small slice: (out folder, its stdout)."""
    out = tmp_path_factory.mktemp("sens") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sensitivity", *SMALL, "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_cli_writes_the_scan_the_summary_and_the_chart(scanned):
    out, stdout = scanned
    scan = json.loads((out / "sensitivity.json").read_text())
    res = json.loads((out / "results.json").read_text())
    assert scan["complete"] and len(scan["layers"]) == N_LAYERS == len(res["proxy_sqnr_db"])
    assert scan["config"]["eval_batches"] == 1 and scan["config"]["calib_batches"] == 1
    assert scan["config"]["ignore"] == [r"model\.77\.m\..*"] and scan["config"]["method"] == "mse"
    assert "model.77" not in scan["config"]["layers"]
    assert [r["k"] for r in res["map_vs_k"]] == [0, 1, 3, 5, 10]
    assert [r["int8_layers"] for r in res["map_vs_k"]] == [55, 54, 52, 50, 45]
    assert res["map_vs_k"][0]["map"] == scan["int8"]["map"]
    assert [r["layer"] for r in res["top"]] == res["map_vs_k"][-1]["float_layers"]
    assert res["proxy_correlation"]["layers"] == N_LAYERS and -1 <= res["proxy_correlation"]["spearman"] <= 1
    assert (out / "sensitivity.png").stat().st_size > 10_000
    assert all(is_owned(out / f) for f in ("sensitivity.json", "results.json", "sensitivity.png"))
    # every evaluation kept its match table: FP32, INT8, each layer, each re-quantized model, each random draw
    tables = {p.stem for p in (out / "tables").glob("*.npz")}
    assert {"fp32", "int8"} | {f"float-{row['layer']}" for row in scan["layers"]} <= tables
    assert {Path(row["matches"]).stem for row in res["map_vs_k"]} <= tables
    assert len(res["topk"]["vs_random"]["draws"]) == 3 and all(
        "ignore-" + "+".join(d) in tables for d in res["topk"]["vs_random"]["draws"])
    assert res["setting"]["name"] == "W8pcA8" and res["images"] == 8
    assert res["split_half_rho"]["halves"] == [4, 4] and res["split_half_rho"]["splits"] == 50
    assert set(res["criteria"]) and res["holds"] == all(res["criteria"].values())
    # W8A8 on 8 images: the ranking cannot pass its tests, so it is not called "most sensitive"
    assert not res["holds"] and "most sensitive" not in stdout
    assert "the layers the scan ranks first" in stdout and "Spearman rho" in stdout and "split-half rho" in stdout


def _float_twin(conv):
    twin = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None)
    twin.load_state_dict({k: v for k, v in conv.state_dict().items() if "quantizer" not in k})
    return twin


def test_a_tied_layers_value_matches_the_layer_rebuilt_in_float(scanned):
    out, _ = scanned
    scan = json.loads((out / "sensitivity.json").read_text())
    prep = ys.prepare(ys.SensitivityConfig(calib_batches=1, eval_batches=1, batch_size=8, progress=False))
    layer = "model.4"  # its input quantizer is model.7's (an ELAN Concat tie): model.7 must stay INT8
    m = copy.deepcopy(prep.qmodel)
    m.model[4].conv = _float_twin(m.model[4].conv)
    assert m.model[7].conv._input_quantizer.is_enabled
    want = evaluate(m, prep.val, progress=False, max_batches=1)["map"]
    row = next(r for r in scan["layers"] if r["layer"] == layer)
    assert row["map"] == pytest.approx(want, abs=1e-12)


def test_rerun_resumes_and_other_settings_are_refused(scanned, capsys):
    out, _ = scanned
    before = (out / "sensitivity.json").read_bytes()
    assert main(["sensitivity", *SMALL, "--out", str(out)]) == 0  # all layers done: nothing re-evaluated
    assert (out / "sensitivity.json").read_bytes() == before
    capsys.readouterr()
    args = ["sensitivity", "--calib-batches", "1", "--eval-batches", "2", "--batch-size", "8", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_batches: 1 in the file, 2 now" in err and "--fresh" in err
    assert (out / "sensitivity.json").read_bytes() == before


def test_ctrl_c_stops_after_saving_with_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import qcourse.yolo.evaluate as ev

    real, calls = ev.evaluate, []

    def interrupted(*args, **kwargs):  # FP32, INT8, 3 layers, then Ctrl-C during the 4th
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", interrupted)
    out = tmp_path / "run"
    assert main(["sensitivity", *SMALL, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped after 3 of 55 layers" in err and "rerun the same command" in err
    assert len(json.loads((out / "sensitivity.json").read_text())["layers"]) == 3


def test_proxy_only_from_a_calibrated_checkpoint(tmp_path, capsys):
    root = ys.prepare(ys.SensitivityConfig(calib_batches=1, batch_size=8, progress=False))
    ckpt = yptq.save_quantized(root.qmodel, tmp_path / "int8_mse.pt", method="mse", calib_batches=1, img_size=160)
    out = tmp_path / "proxy"
    assert main(["sensitivity", "--calibrated", str(ckpt), "--proxy", "--proxy-batches", "1", "--batch-size", "8",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["calibrated"] == str(ckpt) and res["config"]["method"] == "mse"
    assert len(res["proxy_sqnr_db"]) == N_LAYERS and len(res["proxy_top"]) == 10 and "top" not in res
    assert not (out / "sensitivity.json").exists()
    direct = ys.sensitivity.proxy_sqnr(root.qmodel, [next(iter(root.calib))])
    assert res["proxy_sqnr_db"] == pytest.approx(direct, rel=1e-9)
    assert "label-free ranking" in capsys.readouterr().out


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    ckpt = tmp_path / "int8.pt"
    ckpt.write_bytes(b"x")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "sensitivity.json").write_text('{"config": {')
    cases = [
        (["--weights", str(ckpt), "--calibrated", str(ckpt)], "not both"),
        (["--calibrated", str(ckpt), "--method", "max"], "--method max cannot re-calibrate int8.pt"),
        (["--calibrated", str(ckpt), "--setting", "W8pcA4"], "--setting W8pcA4 cannot re-calibrate int8.pt"),
        (["--eval-batches", "0"], "0 is too small"),
        (["--top", "x"], "'x' is not a whole number"),
        (["--calibrated", str(tmp_path / "none.pt")], "none.pt does not exist"),
        ([*SMALL, "--out", str(damaged)], "is not a sensitivity results file that can be resumed"),
    ]
    for args, message in cases:
        rc = main(["sensitivity", *args] + ([] if "--out" in args else ["--out", str(tmp_path / "o")]))
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert err.startswith("qcourse: error:") and err.count("\n") == 1 and message in err, (args, err)
    assert (damaged / "sensitivity.json").read_text() == '{"config": {'


@pytest.mark.parametrize("name,args", [("results.json", []), ("results.json", ["--proxy"]),
                                       ("sensitivity.json", ["--fresh"]), ("sensitivity.png", [])])
def test_a_users_file_in_out_is_refused_before_any_work(tmp_path, name, args, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("the run started working instead of refusing")

    monkeypatch.setattr(ys, "prepare", refuse)
    mine = tmp_path / "out" / name
    mine.parent.mkdir()
    mine.write_text("the user's own file")
    assert main(["sensitivity", *SMALL, *args, "--out", str(mine.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mine) in err and "was not written by qcourse" in err
    assert mine.read_text() == "the user's own file"


def test_published_reference_is_the_courses_top_10():
    assert ys.PUBLISHED_YOLOV7_TOP10[:4] == ("model.104", "model.37", "model.2", "model.1")
    assert len(set(ys.PUBLISHED_YOLOV7_TOP10)) == 10


def _levels(q, amax):
    """How many distinct values quantizer ``q`` gives a fine ramp over [-amax, amax]: 2^bits at most."""
    x = torch.linspace(-float(amax), float(amax), 4001)
    with torch.no_grad():
        return len(torch.unique(q(x)))


def test_the_setting_reaches_every_quantizer_and_the_requantized_models():
    setting = yptq.Setting.parse("W6ptA4", method="max")
    config = ys.SensitivityConfig(setting=setting, calib_batches=1, eval_batches=1, batch_size=8, progress=False)
    prep = ys.prepare(config)
    assert prep.run_config["setting"] == "W6ptA4" and prep.run_config["method"] == "max"
    again = ys.requantizer(prep, config)(["model.3"])
    for model in (prep.qmodel, again):
        slots = [s for s in sens.quantizer_slots(model) if s.quantizer.is_enabled]
        inputs = [s.quantizer for s in slots if s.attr == "_input_quantizer"]
        weights = [s.quantizer for s in slots if s.attr == "_weight_quantizer"]
        assert inputs and weights
        for q in inputs[:5]:  # 4-bit activations: more than 8 levels, at most 16
            assert 8 < _levels(q, q.amax.max()) <= 16
        for q in weights[:5]:  # 6-bit per-tensor weights: one amax, more than 32 levels, at most 64
            assert q.amax.numel() == 1 and 32 < _levels(q, q.amax) <= 64
    default = ys.SensitivityConfig()
    assert default.quant == yptq.Setting(8, True, 8, "mse")


def test_a_bad_setting_gets_one_line_and_exit_2(capsys):
    code, _, err = run_cli(["sensitivity", "--setting", "W9pcA4"], capsys)
    assert code == 2 and "'W9pcA4' is not a setting like W8pcA4" in error_line(err)
    code, _, err = run_cli(["sensitivity", "--setting", "A4"], capsys)
    assert code == 2 and "is not a setting like W8pcA4" in error_line(err)
    with pytest.raises(ValueError, match="not both"):
        ys.SensitivityConfig(setting=yptq.SENSITIVITY_STRESS, calibrated=Path("int8.pt"))
    with pytest.raises(ValueError, match="must be a qcourse.yolo.ptq.Setting"):
        ys.SensitivityConfig(setting="W8pcA4")
