"""qcourse.qat: STE and PACT gradients, the distillation loss, the schedule, resume, torchrun.

Everything runs on a tiny CNN in seconds. Oracles: gradients written out by hand from the STE
and PACT rules (a float layer run on the fake-quantized values, then masked), NVIDIA's
schedule as its published dict, an uninterrupted run for resume, and a single-process step
for the 2-process DistributedDataParallel step.

This file is also the worker of the torchrun test: ``python tests/test_qat.py OUT`` under
``torchrun --nproc_per_node=2`` trains one step and rank 0 writes ``OUT/last.pt``.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qcourse import qat, workflow
from qcourse.tensor_quant import QuantDescriptor, fake_tensor_quant


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def setup(w_bits: int = 4, seed: int = 0):
    """(FP32 teacher, 4-bit-weight quantized copy calibrated on 2 batches, a shuffled loader)."""
    teacher = tiny_cnn(seed)
    x = images()
    student = workflow.quantized_copy(teacher, [x[:32], x[32:]], method="max",
                                      quant_desc_weight=QuantDescriptor(num_bits=w_bits, axis=0))
    return teacher, student, DataLoader(TensorDataset(x), batch_size=8, shuffle=True)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the schedule
def test_schedule_is_nvidias_over_10_epochs_and_rescales():
    config = qat.QATConfig(epochs=10, lr=1e-5)
    recipe = {0: 1e-6, 3: 1e-5, 8: 1e-6}  # yolov7_qat's lrschedule, by epoch
    want = [recipe[max(k for k in recipe if k <= e)] for e in range(10)]
    assert [qat.lr_at_epoch(config, e) for e in range(10)] == pytest.approx(want, rel=1e-12)
    three = qat.QATConfig(epochs=3, lr=1e-4)
    assert [qat.lr_at_epoch(three, e) for e in range(3)] == pytest.approx([1e-5, 1e-4, 1e-5])
    assert qat.lr_at_epoch(qat.QATConfig(epochs=1, lr=1e-4), 0) == pytest.approx(1e-4)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("lr", float("nan")),
                                          ("iters_per_epoch", 1.5), ("schedule", ((0.5, 1.0),))])
def test_config_refuses_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        qat.QATConfig(**{field: value})


# ----------------------------------------------------------------------------- gradients
def test_ste_gradient_reaches_the_weights_masked_where_clipped():
    _, student, _ = setup()
    layer = student[6]  # QuantLinear(8, 4), 4-bit per-channel weights
    with torch.no_grad():  # clip a few weights: their STE gradient must be exactly zero
        layer.weight[0, :3] = 3 * layer._weight_quantizer.amax[0]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    layer(x).square().sum().backward()
    # oracle: a plain linear run on the fake-quantized values, its weight gradient masked by |w| <= amax
    wquant, iquant = layer._weight_quantizer, layer._input_quantizer
    amax = wquant.amax
    wq = fake_tensor_quant(layer.weight.detach(), amax, 4, narrow_range=wquant.narrow_range).requires_grad_(True)
    xq = fake_tensor_quant(x, iquant.amax, narrow_range=iquant.narrow_range)
    nn.functional.linear(xq, wq, layer.bias.detach()).square().sum().backward()
    want = wq.grad * (layer.weight.detach().abs() <= amax)
    assert torch.allclose(layer.weight.grad, want, atol=1e-6)
    assert layer.weight.grad.abs().sum() > 0 and (layer.weight.grad[0, :3] == 0).all()


def test_amax_learns_with_the_pact_gradient_only_when_asked():
    _, student, _ = setup()
    q = student[6]._input_quantizer
    assert not isinstance(q._amax, nn.Parameter)  # calibrated: a buffer, no gradient (lesson 2's rule)
    names = qat.enable_learn_amax(student)
    assert "6._input_quantizer" in names and not any("weight" in n for n in names)  # per-channel stays fixed
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)) * 3  # some |x| > amax
    y = q(x)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(4))
    y.backward(g)
    clipped = x.abs() > q.amax.detach()
    assert clipped.any()
    assert torch.allclose(q._amax.grad, (g * x.sign())[clipped].sum(), atol=1e-5)


# ----------------------------------------------------------------------------- the loss
def test_select_blocks_stride_filter_and_last_kept():
    model = tiny_cnn()
    assert qat.select_blocks(model) == [str(i) for i in range(7)]
    assert qat.select_blocks(model, stride=3) == ["0", "3", "6"]
    assert qat.select_blocks(model, stride=4, block_filter=lambda n, m: n != "6") == ["0", "4", "5"]
    with pytest.raises(ValueError, match="no block"):
        qat.select_blocks(model, pattern=r"head\.\d+")


def test_distillation_loss_is_the_sum_of_block_mses_and_zero_without_quantization():
    teacher, student, loader = setup()
    x = images()[:8]
    loss = qat.DistillationLoss(teacher, ["0", "2", "6"])(student, (x,))
    want = 0.0
    for upto in (1, 3, 7):  # outputs of blocks 0, 2 and 6, computed by slicing the Sequentials
        want += nn.functional.mse_loss(student[:upto](x), teacher[:upto](x))
    assert torch.allclose(loss, want, rtol=1e-5)
    with workflow.disable_quantization(student):
        assert float(qat.DistillationLoss(teacher, ["0", "6"])(student, (x,)).detach()) == 0.0
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks  # no hook left behind


def test_short_run_lowers_the_distillation_loss(tmp_path):
    teacher, student, loader = setup()
    held_out = images(32, seed=9)
    loss_fn = qat.DistillationLoss(teacher, qat.select_blocks(student))

    def score(model):  # higher is better: minus the held-out loss
        with torch.no_grad():
            return -float(loss_fn(model, (held_out,)))

    before = score(student)
    res = qat.train(student, loss_fn, loader, qat.QATConfig(epochs=3, iters_per_epoch=16, lr=3e-5),
                    evaluate=score, out_dir=tmp_path, log=lambda s: None)
    scores = [r["score"] for r in res["history"]]
    assert max(scores) > before and scores[-1] > before, (before, scores)
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    assert res["best_score"] == max(scores) and (tmp_path / "best.pt").is_file()


# ----------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def test_resume_ends_with_the_uninterrupted_weights(tmp_path):
    config = qat.QATConfig(epochs=2, iters_per_epoch=10, lr=1e-2, learn_amax=True, checkpoint_every=3)
    teacher, student, loader = setup()
    full = qat.train(student, qat.DistillationLoss(teacher, ["2", "6"]), loader, config,
                     out_dir=tmp_path / "full", log=lambda s: None)
    want = weights(student)

    teacher, student, loader = setup()
    loss_fn, calls = qat.DistillationLoss(teacher, ["2", "6"]), [0]

    def interrupted(model, batch):  # dies at epoch 2, step 5: the checkpoint of step 3 is the last
        calls[0] += 1
        if calls[0] == 15:
            raise Interrupt
        return loss_fn(model, batch)

    with pytest.raises(Interrupt):
        qat.train(student, interrupted, loader, config, out_dir=tmp_path / "cut", log=lambda s: None)
    assert qat.load_state(tmp_path / "cut" / "last.pt")["step"] == 3
    teacher, student, loader = setup()  # a fresh process: nothing kept in memory
    res = qat.train(student, qat.DistillationLoss(teacher, ["2", "6"]), loader, config,
                    out_dir=tmp_path / "cut", resume=True, log=lambda s: None)
    got = weights(student)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert res["history"] == [{**r, "seconds": s["seconds"]} for r, s in zip(full["history"], res["history"])]
    assert res["step_losses"] == full["step_losses"] and len(full["step_losses"]) == 20
    # the loss curve agrees with the per-epoch means of the history
    assert [np.mean(full["step_losses"][10 * e:10 * e + 10]) for e in range(2)] == pytest.approx(
        [r["loss"] for r in full["history"]], rel=1e-9)


def test_resume_with_other_settings_is_refused(tmp_path):
    teacher, student, loader = setup()
    loss_fn = qat.DistillationLoss(teacher, ["6"])
    qat.train(student, loss_fn, loader, qat.QATConfig(epochs=1, iters_per_epoch=2), out_dir=tmp_path,
              log=lambda s: None)
    with pytest.raises(ValueError, match="lr was 1e-05, now 0.001"):
        qat.train(student, loss_fn, loader, qat.QATConfig(epochs=1, iters_per_epoch=2, lr=1e-3),
                  out_dir=tmp_path, resume=True, log=lambda s: None)


# ----------------------------------------------------------------------------- torchrun
DDP_CONFIG = dict(epochs=1, iters_per_epoch=1, lr=1e-3)


def _one_step(out_dir):
    teacher, student, loader = setup()
    return qat.train(student, qat.DistillationLoss(teacher, ["2", "6"]), loader, qat.QATConfig(**DDP_CONFIG),
                     out_dir=out_dir, log=lambda s: None)


def test_torchrun_two_processes_match_the_single_process_step(tmp_path):
    single = _one_step(tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = qat.load_state(tmp_path / "ddp" / "last.pt")
    one = qat.load_state(tmp_path / "single" / "last.pt")
    assert ddp["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)
    for k, v in one["model"].items():  # the 2 shards of 4 images are the single batch of 8
        assert torch.allclose(ddp["model"][k], v, atol=1e-6), k
    assert single["world_size"] == 1 and "world_size 2" in done.stdout


if __name__ == "__main__":  # the torchrun worker
    torch.set_num_threads(1)
    result = _one_step(Path(sys.argv[1]))
    if qat.is_main_process():
        print(f"world_size {result['world_size']}")
