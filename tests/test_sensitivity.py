"""qcourse.sensitivity on a tiny CNN with YOLO-style numbered blocks, one Concat and one MaxPool.

Oracles: the model with a layer's quantized convs swapped for plain ``nn.Conv2d`` / ``nn.Linear``
with the same weights (what "that layer in float" means, built without the code under test);
a numpy fake-quantization (tests/oracles.py) for the proxy's SQNR; scipy for Spearman.
"""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from oracles import np_quant
from qcourse import ptq, quant_modules, sensitivity as sens, workflow
from qcourse.tensor_quant import QuantDescriptor
from qcourse.utils import OWNED_LIST, NotOwnedError

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, c_in, c_out, k=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)

    def forward(self, x):
        return F.relu(self.conv(x))


class Cat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Head(nn.Module):
    """Two 1x1 convs in one layer, as a detection head has one per scale."""

    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

    def forward(self, xs):
        return self.large(xs[1]) + F.interpolate(self.small(xs[0]), scale_factor=2.0)


class TinyNet(nn.Module):
    """model.0 -> 1 -> 2; 3 = cat(1, 2) -> 4 -> pool 5 -> 6; 7 reads 4; 8 = head(6, 7).

    The placement rules tie model.2's input to model.4's (a Concat input and its output) and
    model.7's to model.6's (across the MaxPool): two ties that cross layers.
    """

    def __init__(self):
        super().__init__()
        self.model = nn.ModuleList([Block(3, 8, 3), Block(8, 8), Block(8, 8, 3), Cat(), Block(16, 8),
                                    nn.MaxPool2d(2), Block(8, 8), Block(8, 8), Head()])

    def forward(self, x):
        m = self.model
        a = m[1](m[0](x))
        b = m[2](a)
        c = m[4](m[3]([a, b]))
        return m[8]([m[6](m[5](c)), m[7](c)])


LAYERS = ["model.0", "model.1", "model.2", "model.4", "model.6", "model.7", "model.8"]
TIES = {"model.4.conv": ["model.2.conv"], "model.6.conv": ["model.7.conv"]}


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=g) for _ in range(n)]


def make_float():
    torch.manual_seed(0)
    return TinyNet().eval()


def make_quantized():
    """Calibrated with histogram/mse inputs and per-channel max weights, the rules applied."""
    m = copy.deepcopy(make_float())
    quant_modules.replace_modules(m, quant_desc_input=QuantDescriptor(calib_method="histogram"),
                                  quant_desc_weight=QuantDescriptor(axis=0))
    assert ptq.apply_placement_rules(m, torch.zeros(1, 3, 16, 16)) == TIES
    ptq.calibrate(m, _images(3, seed=1), 3, progress=False)
    ptq.load_amax(m, "mse")
    return m.eval()


EVAL_X = torch.cat(_images(2, seed=2))
_REF = []


def evaluate(model):
    """A deterministic score in [0, 1], 1 for the float model: 1 - relative RMS error of the outputs.

    The float reference is computed on first use, under the thread count the tests run with.
    """
    with torch.no_grad():
        if not _REF:
            _REF.append(make_float()(EVAL_X))
        ref = _REF[0]
        err = model(EVAL_X) - ref
        return 1.0 - min(1.0, float(err.square().mean().sqrt() / ref.square().mean().sqrt()))


def strip_seconds(data):
    return {**data, "layers": [{k: v for k, v in row.items() if k != "seconds"} for row in data["layers"]]}


# ----------------------------------------------------------------------------- oracles
def _float_twin(module):
    """A plain torch layer with the same weights as a quantized conv / linear."""
    if isinstance(module, nn.Conv2d):
        twin = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, module.groups, module.bias is not None)
    else:
        twin = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    twin.load_state_dict({k: v for k, v in module.state_dict().items() if "quantizer" not in k})
    return twin


def in_float_by_hand(model, layer):
    """A copy with every quantized module of ``layer`` replaced by its float twin (ties elsewhere kept)."""
    m = copy.deepcopy(model)  # deepcopy keeps shared quantizers shared
    for name, mod in list(m.named_modules()):
        if (name == layer or name.startswith(layer + ".")) and hasattr(mod, "_input_quantizer"):
            parent, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent), attr, _float_twin(mod))
    return m


def _state(model, skip_layer=None):
    """Per slot: switches, amax, and the quantizer object's identity (equal ids = a tie)."""
    out = {}
    for s in sens.quantizer_slots(model):
        if skip_layer and s.name.startswith(skip_layer + "."):
            continue
        a = s.quantizer.amax
        out[s.name] = (s.quantizer.switches, None if a is None else a.clone(), id(s.quantizer))
    return out


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and a[k][2:] == b[k][2:], k
        assert (a[k][1] is None) == (b[k][1] is None) and (a[k][1] is None or torch.equal(a[k][1], b[k][1])), k


# ----------------------------------------------------------------------------- layers
def test_default_layer_of_cuts_after_the_first_numbered_block():
    assert sens.default_layer_of("model.37.conv._input_quantizer") == "model.37"
    assert sens.default_layer_of("model.77.m.0._weight_quantizer") == "model.77"
    assert sens.default_layer_of("3._weight_quantizer") == "3"
    assert sens.default_layer_of("conv1._input_quantizer") == "conv1"


def test_layers_and_ties_of_the_tiny_net():
    m = make_quantized()
    assert sens.quantized_layers(m) == LAYERS
    assert sens.int8_layer_count(m) == 7
    slots = {s.name: s.quantizer for s in sens.quantizer_slots(m)}
    assert slots["model.2.conv._input_quantizer"] is slots["model.4.conv._input_quantizer"]
    assert len(slots) == 16 and len({id(q) for q in slots.values()}) == 14


@pytest.mark.parametrize("layer", ["model.2", "model.4", "model.7", "model.0"])
def test_one_layer_in_float_leaves_every_other_quantizer_as_it_was(layer):
    m = make_quantized()
    before_all, before_others = _state(m), _state(m, skip_layer=layer)
    with sens.layers_in_float(m, [layer]):
        _same_state(_state(m, skip_layer=layer), before_others)  # switches, amax, ties, identity
        assert all(not s.quantizer.is_enabled for s in sens.layer_groups(m)[layer])
        assert sens.int8_layer_count(m) == 6
    _same_state(_state(m), before_all)  # and the layer itself comes back as it was


def test_one_layer_in_float_matches_the_layer_rebuilt_in_float_by_hand():
    m = make_quantized()
    for layer in LAYERS:
        with sens.layers_in_float(m, [layer]):
            got = m(EVAL_X)
        want = in_float_by_hand(m, layer)(EVAL_X)
        assert torch.equal(got, want), layer
    with sens.layers_in_float(m, ["model.2", "model.4"]):  # both holders of a tie: the tie is off
        got = m(EVAL_X)
    assert torch.equal(got, in_float_by_hand(in_float_by_hand(m, "model.2"), "model.4")(EVAL_X))


def test_unknown_layer_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"'model\.3' is not a quantized layer .* model\.0"):
        with sens.layers_in_float(make_quantized(), ["model.3"]):
            pass


# ----------------------------------------------------------------------------- the scan
def test_scan_measures_each_layer_against_the_oracle(tmp_path):
    m = make_quantized()
    res = sens.sensitivity_analysis(m, evaluate, tmp_path / "s.json", {"data": "tiny"})
    assert json.loads((tmp_path / "s.json").read_text()) == res
    assert list(res) == ["config", "fp32", "int8", "layers", "complete"] and res["complete"]
    assert res["config"]["layers"] == LAYERS and res["config"]["data"] == "tiny"
    assert res["fp32"]["map"] == pytest.approx(evaluate(make_float()), rel=1e-9)
    assert res["int8"]["map"] == evaluate(m)
    for row in res["layers"]:
        want = evaluate(in_float_by_hand(m, row["layer"]))
        assert row["map"] == pytest.approx(want, rel=1e-12), row["layer"]
        assert row["drop"] == pytest.approx(want - res["int8"]["map"], rel=1e-12)
    ranked = [r["layer"] for r in sens.ranking(res)]
    assert sorted(ranked) == sorted(LAYERS)
    drops = [r["drop"] for r in sens.ranking(res)]
    assert drops == sorted(drops, reverse=True)


def test_scan_of_some_layers_keeps_model_order_and_the_full_scan_numbers(tmp_path):
    full = sens.sensitivity_analysis(make_quantized(), evaluate, tmp_path / "all.json")
    some = sens.sensitivity_analysis(make_quantized(), evaluate, tmp_path / "some.json",
                                     layers=[LAYERS[-1], LAYERS[0]])
    assert some["config"]["layers"] == [LAYERS[0], LAYERS[-1]]  # model order, whatever order was asked
    chosen = some["config"]["layers"]
    assert strip_seconds(some)["layers"] == [r for r in strip_seconds(full)["layers"] if r["layer"] in chosen]
    with pytest.raises(ValueError, match=r"\['model\.99'\] are not quantized layers .* model\.0"):
        sens.sensitivity_analysis(make_quantized(), evaluate, tmp_path / "bad.json", layers=["model.99"])


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = sens.sensitivity_analysis(make_quantized(), evaluate, tmp_path / "full.json", {"run": 1})
    calls, crashed = [], []

    def failing(model):
        calls.append(1)
        if len(calls) == 5 and not crashed:  # fp32, int8, two layers, then the third one crashes
            crashed.append(1)
            raise RuntimeError("simulated crash")
        return evaluate(model)

    path = tmp_path / "part.json"
    with pytest.raises(RuntimeError, match="simulated crash"):
        sens.sensitivity_analysis(make_quantized(), failing, path, {"run": 1})
    partial = json.loads(path.read_text())
    assert [r["layer"] for r in partial["layers"]] == LAYERS[:2] and not partial["complete"]
    calls.clear()
    resumed = sens.sensitivity_analysis(make_quantized(), failing, path, {"run": 1})
    assert len(calls) == len(LAYERS) - 2  # finished layers, fp32 and int8 are not evaluated again
    assert strip_seconds(resumed) == strip_seconds(full)
    assert strip_seconds(json.loads(path.read_text())) == strip_seconds(full)


def test_ctrl_c_stops_after_saving_and_says_how_to_resume(tmp_path):
    calls = []

    def interrupted(model):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return evaluate(model)

    path = tmp_path / "s.json"
    with pytest.raises(KeyboardInterrupt, match=r"stopped after 1 of 7 layers, all saved in .*rerun"):
        sens.sensitivity_analysis(make_quantized(), interrupted, path, {})
    assert len(json.loads(path.read_text())["layers"]) == 1


CHILD = textwrap.dedent("""
    import sys, time, json, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_sensitivity as t
    from qcourse import sensitivity as sens
    path, ready = sys.argv[1], sys.argv[2]
    def slow(model):
        try:
            done = len(json.load(open(path))["layers"])
        except FileNotFoundError:
            done = 0
        if done >= 3:  # three layers saved: say so, then hang in the fourth until killed
            open(ready, "w").close()
            time.sleep(120)
        return t.evaluate(model)
    sens.sensitivity_analysis(t.make_quantized(), slow, path, {{"run": 1}})
""")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    path, ready = tmp_path / "s.json", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(HERE)), str(path), str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached its fourth layer"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(json.loads(path.read_text())["layers"]) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    resumed = sens.sensitivity_analysis(make_quantized(), evaluate, path, {"run": 1})
    full = sens.sensitivity_analysis(make_quantized(), evaluate, tmp_path / "full.json", {"run": 1})
    assert strip_seconds(resumed) == strip_seconds(full) and resumed["complete"]


def test_a_file_of_another_config_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "s.json"
    sens.sensitivity_analysis(make_quantized(), evaluate, path, {"method": "mse", "eval_batches": 2})
    before = path.read_bytes()
    with pytest.raises(sens.SensitivityFileError, match=r"eval_batches: 2 in the file, 4 now.*left as it is"):
        sens.sensitivity_analysis(make_quantized(), evaluate, path, {"method": "mse", "eval_batches": 4})
    other = make_quantized()
    ptq.load_amax(other, "percentile")  # another calibration of the same model
    with pytest.raises(sens.SensitivityFileError, match="state: .*calibration"):
        sens.sensitivity_analysis(other, evaluate, path, {"method": "mse", "eval_batches": 2})
    assert path.read_bytes() == before
    res = sens.sensitivity_analysis(other, evaluate, path, {"method": "percentile"}, fresh=True)
    assert res["config"]["method"] == "percentile" and json.loads(path.read_text()) == res


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],                                   # truncated
    lambda text: "\x00" * 10,                                               # garbage
    lambda text: json.dumps({"layers": []}),                                # wrong shape
    lambda text: text.replace('"drop"', '"dorp"', 1),                       # a bad row
])
def test_a_corrupted_file_is_reported_and_kept(tmp_path, damage):
    path = tmp_path / "s.json"
    sens.sensitivity_analysis(make_quantized(), evaluate, path, {})
    path.write_text(damage(path.read_text()))
    before = path.read_bytes()
    with pytest.raises(sens.SensitivityFileError, match=r"s\.json is not a sensitivity results file.*left as it is"):
        sens.sensitivity_analysis(make_quantized(), evaluate, path, {})
    assert path.read_bytes() == before


@pytest.mark.parametrize("fresh", [False, True])
def test_a_file_qcourse_did_not_write_is_refused_before_any_evaluation(tmp_path, fresh):
    """The same scan copied in by hand (no record of qcourse writing it): never replaced, refused up front."""
    done = tmp_path / "done.json"
    sens.sensitivity_analysis(make_quantized(), evaluate, done, {"run": 1})
    data = json.loads(done.read_text())
    data["layers"], data["complete"] = data["layers"][:1], False  # a run to resume
    path = tmp_path / "mine" / "s.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data, indent=2))
    before, calls = path.read_bytes(), []

    def counting(model):
        calls.append(1)
        return evaluate(model)

    with pytest.raises(NotOwnedError, match=r"s\.json exists and was not written by qcourse"):
        sens.sensitivity_analysis(make_quantized(), counting, path, {"run": 1}, fresh=fresh)
    assert calls == [] and path.read_bytes() == before


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    sens.write_json_atomic(path, {"v": 1})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        sens.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [OWNED_LIST, "a.json"]  # no temporary file left


def test_evaluate_must_return_a_finite_number(tmp_path):
    with pytest.raises(ValueError, match=r"evaluate\(\) returned nan for the FP32 model"):
        sens.sensitivity_analysis(make_quantized(), lambda m: float("nan"), tmp_path / "s.json")


# ----------------------------------------------------------------------------- proxy and top-k
def _sqnr_by_hand(model, layer):
    """SQNR of a conv block's output, fake-quantized in numpy from its float input."""
    block = model.get_submodule(layer)
    seen = []
    h = block.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out.clone())))
    with workflow.disable_quantization(model), torch.no_grad():
        for x in _images(2, seed=3):
            model(x)
    h.remove()
    conv = block.conv
    _, w_q, _ = np_quant(conv.weight.detach().numpy(), conv._weight_quantizer.amax.numpy(),
                         narrow_range=conv._weight_quantizer.narrow_range)
    sig = noise = 0.0
    for x, y in seen:
        _, x_q, _ = np_quant(x.numpy(), conv._input_quantizer.amax.numpy(),
                             narrow_range=conv._input_quantizer.narrow_range)
        y_q = F.relu(F.conv2d(torch.from_numpy(x_q).double(), torch.from_numpy(w_q).double(),
                              conv.bias.detach().double(), padding=conv.padding))
        sig += float(y.double().square().sum())
        noise += float((y.double() - y_q).square().sum())
    return 10 * math.log10(sig / noise)


def test_proxy_sqnr_matches_numpy_fake_quantization():
    m = make_quantized()
    before = _state(m)
    proxy = sens.proxy_sqnr(m, _images(2, seed=3))
    assert list(proxy) == LAYERS
    for layer in ("model.0", "model.2", "model.4", "model.7"):  # tied inputs included
        assert proxy[layer] == pytest.approx(_sqnr_by_hand(m, layer), rel=1e-5), layer
    _same_state(_state(m), before)
    assert all(20 < v < 80 for v in proxy.values())  # 8 bits: about 6 dB per bit, less the clipping


def test_rank_correlation_is_scipy_spearman_of_drop_vs_minus_sqnr():
    from scipy.stats import spearmanr

    results = {"layers": [{"layer": f"l{i}", "drop": d} for i, d in enumerate([0.3, 0.1, 0.2, 0.0])]}
    proxy = {"l0": 10.0, "l1": 30.0, "l2": 20.0, "l3": 40.0}
    assert sens.rank_correlation(results, proxy)["spearman"] == pytest.approx(1.0)
    proxy["l3"] = 5.0
    rho = spearmanr([0.3, 0.1, 0.2, 0.0], [-10.0, -30.0, -20.0, -5.0])[0]
    assert sens.rank_correlation(results, proxy)["spearman"] == pytest.approx(rho)


def test_top_k_table_disabling_and_requantizing(tmp_path):
    m = make_quantized()
    res = sens.sensitivity_analysis(m, evaluate, tmp_path / "s.json", {})
    ranked = [r["layer"] for r in sens.ranking(res)]
    rows = sens.top_k_table(m, evaluate, ranked, ks=(0, 1, 3, 5, 10))
    assert [r["k"] for r in rows] == [0, 1, 3, 5]  # 10 > 7 layers: skipped
    assert [r["int8_layers"] for r in rows] == [7, 6, 4, 2]
    assert rows[0]["map"] == res["int8"]["map"]
    assert rows[1]["map"] == pytest.approx(res["layers"][LAYERS.index(ranked[0])]["map"], rel=1e-12)

    def requantize(layers):  # lesson 5's way: an ignore list, rules and calibration on the rest
        q = copy.deepcopy(make_float())
        quant_modules.replace_modules(q, ignore=[rf"{l}\." for l in layers],
                                      quant_desc_input=QuantDescriptor(calib_method="histogram"),
                                      quant_desc_weight=QuantDescriptor(axis=0))
        ptq.apply_placement_rules(q, torch.zeros(1, 3, 16, 16))
        ptq.calibrate(q, _images(3, seed=1), 3, progress=False)
        ptq.load_amax(q, "mse")
        return q.eval()

    rows = sens.top_k_table(m, evaluate, ranked, ks=(0, 3), requantize=requantize)
    assert rows[0]["map"] == pytest.approx(res["int8"]["map"], rel=1e-12)
    assert rows[1]["int8_layers"] == 4 and rows[1]["float_layers"] == ranked[:3]
