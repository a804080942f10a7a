"""qcourse.qat: STE and PACT gradients, the distillation loss, the schedule, resume, torchrun.

Everything runs on a tiny CNN in seconds. Oracles: gradients written out by hand from the STE
and PACT rules (a float layer run on the fake-quantized values, then masked), NVIDIA's
schedule as its published dict, an uninterrupted run for resume, and a single-process step
for the 2-process DistributedDataParallel step.

This file is also the worker of the torchrun test: ``python tests/test_qat.py OUT BLOCKS`` under
``torchrun --nproc_per_node=2`` trains one step supervising the comma-separated BLOCKS and rank
0 writes ``OUT/last.pt``.
"""
import re
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


# ----------------------------------------------------------------------------- what the loss trains
def test_reached_parameters_are_the_leaves_behind_the_loss():
    model = tiny_cnn()
    x = images(4)
    reached = qat.reached_parameters(model[:3](x).sum())  # conv 0 and conv 2 only
    assert reached == {id(p) for p in (*model[0].parameters(), *model[2].parameters())}
    model[0].weight.requires_grad_(False)
    assert id(model[0].weight) not in qat.reached_parameters(model[:3](x).sum())


def test_parameters_the_loss_does_not_reach_stay_as_they_are(tmp_path):
    """Supervising block 2 only: the Linear head gets no gradient; it is left out, not stepped."""
    teacher, student, loader = setup()
    before = weights(student)
    lines = []
    qat.train(student, qat.DistillationLoss(teacher, ["2"]), loader, qat.QATConfig(epochs=1, iters_per_epoch=3,
              lr=1e-2), out_dir=tmp_path, log=lines.append)
    after = weights(student)
    assert torch.equal(after["6.weight"], before["6.weight"]) and torch.equal(after["6.bias"], before["6.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert all(p.requires_grad for p in student.parameters())  # given back as it came
    assert any(line.startswith("2 parameter tensors get no gradient from the loss") and "6.weight" in line
               for line in lines), lines
    saved = qat.load_state(tmp_path / "last.pt")
    assert len(saved["optimizer"]["param_groups"][0]["params"]) == 4  # Adam holds the two convs only


def test_a_loss_that_reaches_nothing_is_refused():
    _, student, loader = setup()
    with pytest.raises(ValueError, match="reaches no trainable parameter"):
        qat.train(student, lambda model, batch: torch.zeros((), requires_grad=True), loader,
                  qat.QATConfig(epochs=1, iters_per_epoch=1), log=lambda s: None)


# ----------------------------------------------------------------------------- settings and files
@pytest.mark.parametrize("batch, world, message", [
    (65, 1, "the batch size 65 is larger than the training data (64 items); pass a batch size of at most 64"),
    (8, 3, "the batch size 8 does not split over 3 processes"),
    (66, 2, "the batch size 66 is larger than the training data (64 items)"),
])
def test_batches_are_checked_by_name(batch, world, message):
    loader = DataLoader(TensorDataset(images()), batch_size=batch)
    with pytest.raises(ValueError, match=re.escape(message)):
        qat.check_batches(loader, world)
    qat.check_batches(DataLoader(TensorDataset(images()), batch_size=64 - 64 % world), world)


def test_a_new_run_deletes_the_earlier_runs_files_but_not_a_users(tmp_path):
    teacher, student, loader = setup()
    loss_fn, config = qat.DistillationLoss(teacher, ["6"]), qat.QATConfig(epochs=1, iters_per_epoch=1)
    qat.train(student, loss_fn, loader, config, out_dir=tmp_path, evaluate=lambda m: 0.0, log=lambda s: None)
    assert (tmp_path / "best.pt").is_file()

    def interrupted(model, batch):
        raise Interrupt

    with pytest.raises(Interrupt):  # the probe of the first batch: before any step
        qat.train(student, interrupted, loader, config, out_dir=tmp_path, log=lambda s: None)
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    (tmp_path / "best.pt").write_text("mine")
    with pytest.raises(ValueError, match="best.pt exists and was not written by qcourse"):
        qat.train(student, loss_fn, loader, config, out_dir=tmp_path, log=lambda s: None)
    assert (tmp_path / "best.pt").read_text() == "mine"


def _damaged_checkpoints(tmp_path):
    good = tmp_path / "good"
    teacher, student, loader = setup()
    qat.train(student, qat.DistillationLoss(teacher, ["6"]), loader, qat.QATConfig(epochs=1, iters_per_epoch=1),
              out_dir=good, log=lambda s: None)
    data = (good / "last.pt").read_bytes()
    torch.save({"format": qat.CHECKPOINT_FORMAT, "model": Interrupt()}, tmp_path / "pickled.pt")
    torch.save({"format": qat.CHECKPOINT_FORMAT, "model": {}}, tmp_path / "partial.pt")
    for name, content in (("garbage.pt", b"not a checkpoint\n"), ("truncated.pt", data[: len(data) // 2]),
                          ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
    return [tmp_path / n for n in ("garbage.pt", "truncated.pt", "empty.pt", "pickled.pt", "partial.pt")]


def test_a_damaged_checkpoint_is_named_and_unsafe_loading_never_suggested(tmp_path):
    for path in _damaged_checkpoints(tmp_path):
        with pytest.raises(ValueError) as err:
            qat.load_state(path)
        text = str(err.value)
        assert text.startswith(f"{path} is") and "damaged" in text and "delete it" in text, text
        assert "weights_only" not in text and err.value.__cause__ is None, text


# ----------------------------------------------------------------------------- devices of the processes
@pytest.mark.parametrize("requested, world, local, count, want", [
    ("cpu", 1, 0, 0, "cpu"),
    ("cuda", 1, 0, 1, "cuda"),  # alone: as asked
    ("cuda:1", 1, 0, 2, "cuda:1"),
    ("cpu", 2, 1, 2, "cpu"),  # gloo: every process on the CPU
    ("cuda", 2, 0, 2, "cuda:0"),
    ("cuda", 2, 1, 2, "cuda:1"),  # NCCL: the GPU of LOCAL_RANK
    ("cuda:1", 2, 1, 2, "cuda:1"),  # already chosen: unchanged
    ("cuda", 8, 3, 4, "cuda:3"),  # two machines of 4 GPUs: the local rank, not the global one
])
def test_rank_device_gives_each_process_its_own_gpu(requested, world, local, count, want):
    got = qat.rank_device(requested, world_size=world, local_rank=local, cuda_count=count)
    assert got == torch.device(want)
    assert qat.backend_for(got) == ("nccl" if got.type == "cuda" else "gloo")
    backend = qat.backend_for(got)
    assert qat.collective_device(backend, got) == (got if backend == "nccl" else torch.device("cpu"))


@pytest.mark.parametrize("requested, world, local, count, message", [
    ("cuda:0", 2, 1, 2, "'cuda:0' puts every one of the 2 processes on one GPU"),
    ("cuda", 4, 2, 2, "LOCAL_RANK=2 of 4 needs a GPU of its own, and 2 are visible"),
    ("meta", 2, 0, 0, "'meta' cannot train with 2 processes"),
])
def test_rank_device_refuses_what_nccl_cannot_run(requested, world, local, count, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        qat.rank_device(requested, world_size=world, local_rank=local, cuda_count=count)


def test_rank_device_reads_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert qat.rank_device("cuda", cuda_count=2) == torch.device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK='x' is not a whole number"):
        qat.rank_device("cuda", cuda_count=2)


@pytest.fixture
def process_group(tmp_path, request):
    """A process group of one, with the backend of ``request.param`` (gloo or nccl)."""
    import torch.distributed as dist

    backend, device = request.param
    qat.bind_device(torch.device(device))
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield torch.device(device)
    finally:
        dist.destroy_process_group()


def _collectives(monkeypatch, device):
    """Run the loop's collectives, recording the device of each tensor they hand to torch.distributed."""
    import torch.distributed as dist

    seen = []
    real_all_reduce, real_broadcast = dist.all_reduce, dist.broadcast_object_list

    def all_reduce(t, *a, **k):
        seen.append(("all_reduce", t.device))
        return real_all_reduce(t, *a, **k)

    def broadcast(objs, *a, **k):
        seen.append(("broadcast_object_list", torch.device(k["device"])))
        return real_broadcast(objs, *a, **k)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    assert qat._mean_over_ranks(1.5, device) == 1.5
    assert qat._from_main({"score": 0.25}, device) == {"score": 0.25}
    assert len(qat._digests_by_rank(tiny_cnn().to(device))) == 1
    return seen


@pytest.mark.parametrize("process_group", [("gloo", "cpu")], indirect=True)
def test_collectives_use_the_cpu_with_gloo(process_group, monkeypatch):
    seen = _collectives(monkeypatch, process_group)
    assert seen == [("all_reduce", torch.device("cpu")), ("broadcast_object_list", torch.device("cpu"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: NCCL runs collectives on GPUs only")
@pytest.mark.parametrize("process_group", [("nccl", "cuda:0")], indirect=True)
def test_collectives_use_the_ranks_gpu_with_nccl(process_group, monkeypatch):
    seen = _collectives(monkeypatch, process_group)  # a CPU tensor here: NCCL refuses it
    assert seen == [("all_reduce", torch.device("cuda:0")), ("broadcast_object_list", torch.device("cuda:0"))]


# ----------------------------------------------------------------------------- torchrun
DDP_CONFIG = dict(epochs=1, iters_per_epoch=2, lr=1e-3)  # the second step is where DDP would wait


def _one_step(out_dir, blocks=("2", "6")):
    teacher, student, loader = setup()
    return qat.train(student, qat.DistillationLoss(teacher, list(blocks)), loader, qat.QATConfig(**DDP_CONFIG),
                     out_dir=out_dir, log=lambda s: None)


@pytest.mark.parametrize("blocks", [("2", "6"), ("2",)], ids=["head-supervised", "head-unsupervised"])
def test_torchrun_two_processes_match_the_single_process_step(tmp_path, blocks):
    """Two processes under DDP end where one process does; also when the loss leaves the head
    without a gradient (DDP used to wait for it: 'Expected to have finished reduction')."""
    from cli_helpers import torchrun

    single = _one_step(tmp_path / "single", blocks)
    done = torchrun([__file__, str(tmp_path / "ddp"), ",".join(blocks)], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = qat.load_state(tmp_path / "ddp" / "last.pt")
    one = qat.load_state(tmp_path / "single" / "last.pt")
    assert ddp["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)
    for k, v in one["model"].items():  # at each step the 2 shards of 4 images are the single batch of 8
        assert torch.allclose(ddp["model"][k], v, atol=1e-6), k
    assert single["world_size"] == 1 and "world_size 2" in done.stdout
    digests = re.search(r"weights (\w+) (\w+)", done.stdout).groups()  # both processes end with the same weights
    assert digests[0] == digests[1], done.stdout


if __name__ == "__main__":  # the torchrun worker
    torch.set_num_threads(1)
    result = _one_step(Path(sys.argv[1]), sys.argv[2].split(","))
    if qat.is_main_process():
        print(f"world_size {result['world_size']}")
        print("weights " + " ".join(result["weights_sha256"]))
