"""The report's table of the course's effects and results.json's ``ptq`` / ``sensitivity`` / ``qat`` keys.

The stage results below are written out by hand (numbers chosen on both sides of each bar), so
every reading the report prints is checked against the bar written out here, and the top-level
keys against the stage results they come from.
"""
import pytest

from qcourse.course import report


def _data(rho=0.81, share=0.62, qat_share=0.74, gap=(0.096, [0.083, 0.108]), vs_random=(0.05, [0.02, 0.08])):
    sens = {"setting": {"name": "W8pcA4", "w_bits": 8, "per_channel": True, "a_bits": 4, "method": "entropy"},
            "images": 64, "fp32": {"map": 0.71, "interval": [0.68, 0.75]}, "int8": {"map": 0.52, "interval": [0.48, 0.57]},
            "loss": {"diff": 0.19, "interval": [0.16, 0.22]},
            "split_half_rho": {"rho": rho, "halves": [32, 32], "seed": 0, "splits": 50, "median": rho - 0.02,
                               "p05_p95": [rho - 0.2, rho + 0.1]},
            "topk": {"k": 5, "recovered_share": share, "interval": [share - 0.1, share + 0.1],
                     "vs_random": {"diff": vs_random[0], "interval": vs_random[1], "draws": [["model.1"]] * 3}},
            "proxy_correlation": {"spearman": 0.39, "p_value": 0.003}}
    sens["criteria"] = {"loss >= 0.03, interval > 0": True, "split-half rho >= 0.7": rho >= 0.7,
                        "top-5 share >= 0.5": share >= 0.5, "top-5 beats random 5, interval > 0": vs_random[1][0] > 0}
    sens["holds"] = all(sens["criteria"].values())
    ptq = {"best_histogram_vs_max": {"best": "percentile", "diff": -0.0001, "interval": [-0.0046, 0.0039]},
           "method_gap": {"setting": "W8pcA6", "best_method": "percentile", "gap": gap[0], "interval": gap[1]}}
    w8a8 = {"settings": {"w_bits": 8, "a_bits": 8, "loss": "detection", "epochs": 2, "iters_per_epoch": 10},
            "recovered_share": None, "recovered_share_reason": "PTQ's loss is within noise"}
    stress = {"settings": {"w_bits": 3, "a_bits": 8, "loss": "detection", "epochs": 2, "iters_per_epoch": 10},
              "recovered_share": {"share": qat_share, "interval": [qat_share - 0.1, qat_share + 0.1]}}
    qat = {"runs": {"w8a8": w8a8, "stress": stress},
           "recovered_share": {"run": "stress", "setting": "W3pcA8", "share": qat_share,
                               "interval": [qat_share - 0.1, qat_share + 0.1], "steps": 20}}
    return {"settings": {"weights": None}, "stages": {"ptq": {"results": ptq}, "sensitivity": {"results": sens},
                                                      "qat": {"results": qat}}}


def _rows(data):
    header, rows = report.effects_table(data)
    assert header[-1] == "reading"
    return {r[1]: r for r in rows}


def test_each_reading_follows_its_bar():
    rows = _rows(_data())
    w8 = rows["percentile minus max calibration"]
    assert [r for r in report.effects_table(_data())[1] if r[1] == w8[1]][0][2] == "W8pcA8"
    readings = {r[2]: r[-1] for r in report.effects_table(_data())[1] if r[1] == "percentile minus max calibration"}
    assert readings == {"W8pcA8": "does not hold", "W8pcA6": "holds"}  # -0.01 points vs +9.6 [8.3, 10.8]
    assert rows["FP32 minus INT8 (the loss the scan explains)"][-1] == "holds"
    rho = next(r for k, r in rows.items() if k.startswith("Spearman rho of the layer rankings"))
    assert rho[-1] == "holds" and rho[3].startswith("0.81") and "(32 and 32 images)" in rho[1]
    assert rows["share of the loss won back by the top 5 layers in float"][3] == "0.62 [0.52, 0.72]"
    assert rows["share of PTQ's loss won back by QAT (stress)"][-1] == "holds"
    assert rows["share of PTQ's loss won back by QAT (w8a8)"][3] == "none: PTQ's loss is within noise"
    assert rows["share of PTQ's loss won back by QAT (w8a8)"][-1] == "-"
    assert rows["SQNR proxy vs the scan: Spearman rho"][-1] == "-"  # reported, no bar


@pytest.mark.parametrize("kwargs,effect", [
    (dict(rho=0.69), "Spearman rho"),
    (dict(share=0.49), "share of the loss won back by the top 5 layers in float"),
    (dict(qat_share=0.69), "share of PTQ's loss won back by QAT (stress)"),
    (dict(gap=(0.019, [0.005, 0.03])), "percentile minus max calibration@W8pcA6"),
    (dict(gap=(0.05, [-0.001, 0.1])), "percentile minus max calibration@W8pcA6"),
    (dict(vs_random=(0.05, [-0.01, 0.1])), "top 5 minus 5 random layers"),
])
def test_a_measurement_just_short_of_its_bar_does_not_hold(kwargs, effect):
    name, _, setting = effect.partition("@")
    rows = [r for r in report.effects_table(_data(**kwargs))[1] if r[1].startswith(name) and setting in r[2]]
    assert len(rows) == 1 and rows[0][-1] == "does not hold", rows


def test_sensitivity_title_says_most_sensitive_only_when_every_criterion_holds():
    def titles(data):
        return [b[1] for b in report.report_blocks({**data, "claims": report.claims(data), "machine": {},
                                                    "settings": {"weights": None, "coco": None, "device": "cpu"},
                                                    "generated": "now", "qcourse": "0", "seconds_this_run": 1.0,
                                                    "stages": data["stages"]}) if b[0] == "h2"]

    def with_top(data):
        sens = data["stages"]["sensitivity"]["results"]
        sens.update({"layers_scanned": 3, "top": [{"rank": 1, "layer": "model.0", "map": 0.55, "drop": 0.03,
                                                   "sqnr_db": 15.7}], "map_vs_k": []})
        data["stages"].update({n: {"results": None, "seconds": None, "title": n, "status": "not run",
                                   "finished": None} for n in ("baseline", "engines", "notebooks", "demo", "ptq", "qat")})
        for st in data["stages"].values():
            st.setdefault("seconds", None), st.setdefault("title", "t"), st.setdefault("status", "ran")
            st.setdefault("finished", None)
        return data

    stable = titles(with_top(_data()))
    shaky = titles(with_top(_data(rho=0.3)))
    assert "Sensitivity: the most sensitive layers" in stable
    assert not any("most sensitive layers" in t and "not stable" not in t for t in shaky)
    assert any(t.startswith("Sensitivity: the layers the scan ranks first") for t in shaky)


def test_top_level_keys_are_the_stage_results():
    data = _data(rho=0.3)
    got = report.summary(data)
    sens = data["stages"]["sensitivity"]["results"]
    assert got["ptq"]["method_gap"] == {"setting": "W8pcA6", "best_method": "percentile", "gap": 0.096,
                                        "interval": [0.083, 0.108]}
    assert got["sensitivity"]["split_half_rho"] == 0.3 and got["sensitivity"]["split_half"] is sens["split_half_rho"]
    assert got["sensitivity"]["topk"]["vs_random"]["interval"] == [0.02, 0.08]
    assert got["sensitivity"]["holds"] is False
    assert got["qat"]["recovered_share"]["share"] == 0.74 and got["qat"]["recovered_share"]["interval"] == [0.64, 0.84]
    assert report.summary({"settings": {}, "stages": {}}) == {}  # no stage ran: no key


def test_the_stress_gap_is_a_claim_with_a_verdict():
    found = {c["name"]: c for c in report.claims(_data())}
    stress = next(c for name, c in found.items() if "stress setting W8pcA6" in name)
    assert stress["verdict"] == "reproduced" and stress["measured"] == 0.096
    assert next(c for name, c in found.items() if name.startswith("max calibration 0.444"))["verdict"] == "within noise"
