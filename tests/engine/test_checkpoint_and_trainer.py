"""Checkpoints are atomic, finite and resumable; a non-finite loss stops training and leaves the last good
checkpoint; the trainer's state restores the random generators and the metric history; the JSON log never
repeats an iteration."""

import itertools
import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from detectron_res.engine.checkpoint import Checkpointer, NonFiniteCheckpointError
from detectron_res.engine.events import JSONWriter, MetricsStorage
from detectron_res.engine.hooks import PeriodicCheckpointer, scalar_metrics
from detectron_res.engine.trainer import HookBase, NonFiniteLossError, Trainer
from detectron_res.utils.signals import Terminated, sigterm_raises


class ToyModel(nn.Module):
    """Loss = (w - 3)^2, turning NaN from iteration `nan_at` (0-based) on."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        loss = ((self.w - 3.0) ** 2).sum()
        if self.nan_at is not None and self.calls > self.nan_at:
            return {"loss_a": loss, "loss_b": loss * float("nan")}
        return {"loss_a": loss, "loss_b": loss * 0.0}


def make_trainer(model, tmp_path, *, max_iter, start_iter=0, period=2):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model=model, save_dir=tmp_path, optimizer=optimizer, metadata={"class_names": ["a"]})
    trainer = Trainer(
        model=model,
        data_loader=itertools.repeat([{}]),
        optimizer=optimizer,
        max_iter=max_iter,
        start_iter=start_iter,
        hooks=[PeriodicCheckpointer(checkpointer, period=period)],
    )
    return trainer, checkpointer


def test_non_finite_loss_names_iteration_and_term_and_keeps_last_checkpoint(tmp_path):
    model = ToyModel(nan_at=4)
    trainer, checkpointer = make_trainer(model, tmp_path, max_iter=10)
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: loss_b = nan"):
        trainer.train()
    assert checkpointer.last_checkpoint() == tmp_path / "model_0000004.pth"
    assert not (tmp_path / "model_final.pth").exists()
    weights_at_4 = torch.load(tmp_path / "model_0000004.pth", weights_only=True)["model"]["w"]
    assert torch.isfinite(model.w).all()  # no optimizer step was taken with the NaN loss
    fresh = ToyModel()
    extra = Checkpointer(model=fresh, save_dir=tmp_path).load(checkpointer.last_checkpoint())
    assert extra["iteration"] == 4 and extra["metadata"] == {"class_names": ["a"]}
    torch.testing.assert_close(fresh.w.detach(), weights_at_4)


def test_interrupted_save_leaves_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    model = ToyModel()
    checkpointer = Checkpointer(model=model, save_dir=tmp_path)
    good = checkpointer.save("model_0000002", iteration=2)
    before = good.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002", iteration=4)
    assert good.read_bytes() == before
    assert checkpointer.last_checkpoint() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth"]


class SendSigterm(HookBase):
    """Sends this process SIGTERM before the step of iteration `at` (0-based), as a scheduler preempting it would."""

    def __init__(self, at: int):
        self.at = at

    def before_step(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("at", "written"),
    [(2, ["model_0000002.pth", "model_0000003.pth"]), (3, ["model_0000002.pth", "model_0000004.pth"])],
)
def test_sigterm_in_the_loop_finishes_the_step_checkpoints_it_and_raises(tmp_path, caplog, at, written):
    model = ToyModel()
    trainer, checkpointer = make_trainer(model, tmp_path, max_iter=10)
    trainer.hooks.append(SendSigterm(at))
    trainer.hooks[-1].trainer = trainer
    try:
        with pytest.raises(Terminated), sigterm_raises(), caplog.at_level(logging.INFO):  # as run_tool runs it
            trainer.train()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert (trainer.done, trainer.stopped, trainer.completed) == (at + 1, True, False)
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == written
    assert [r.getMessage().rsplit("/", 1)[-1] for r in caplog.records if "Saved checkpoint" in r.getMessage()] == written
    state = torch.load(checkpointer.last_checkpoint(), weights_only=True)
    # w <- w - 0.1 * 2 (w - 3) = 0.8 w + 0.6 from 0: 0.6, 1.08, 1.464, 1.7712 after 1..4 steps
    assert state["iteration"] == state["trainer"]["iteration"] == at + 1
    torch.testing.assert_close(state["model"]["w"], torch.tensor([[0.6, 1.08, 1.464, 1.7712][at]]))


def test_resume_restores_model_optimizer_scheduler_and_iteration(tmp_path):
    torch.manual_seed(0)
    straight = ToyModel()
    trainer, _ = make_trainer(straight, tmp_path / "straight", max_iter=6)
    trainer.train()

    first = ToyModel()
    trainer, _ = make_trainer(first, tmp_path / "resumed", max_iter=4)
    trainer.train()
    second = ToyModel()
    optimizer = torch.optim.SGD(second.parameters(), lr=0.1)
    checkpointer = Checkpointer(model=second, save_dir=tmp_path / "resumed", optimizer=optimizer)
    start = checkpointer.load(checkpointer.last_checkpoint(), resume=True)["iteration"]
    assert start == 4
    Trainer(model=second, data_loader=itertools.repeat([{}]), optimizer=optimizer, max_iter=6, start_iter=start).train()
    torch.testing.assert_close(second.w.detach(), straight.w.detach())


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"other\.pth does not fit the model.*w: checkpoint \(2,\) vs model \(1,\)"):
        Checkpointer(model=ToyModel(), save_dir=tmp_path).load(path)


class ToyBN(nn.Module):
    """A weight and a BatchNorm-like running variance buffer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.register_buffer("running_var", torch.ones(2))


def test_a_non_finite_buffer_or_optimizer_state_is_never_written(tmp_path):
    model = ToyBN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpointer = Checkpointer(model=model, save_dir=tmp_path, optimizer=optimizer)
    good = checkpointer.save("model_0000001", iteration=1)
    model.running_var[1] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"model_0000002.pth: 1 tensors hold NaN or infinite values \(model.running_var\)"):
        checkpointer.save("model_0000002", iteration=2)
    model.running_var[1] = 1.0
    model.w.grad = torch.tensor([1.0, float("nan")])
    optimizer.step()  # the momentum buffer (and the weight) become NaN
    with pytest.raises(NonFiniteCheckpointError, match=r"model.w, optimizer.state.0.momentum_buffer"):
        checkpointer.save("model_0000002", iteration=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert checkpointer.last_checkpoint() == good


def test_resume_point_is_the_newest_usable_checkpoint_whatever_the_pointer_says(tmp_path, caplog):
    model = ToyBN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model=model, save_dir=tmp_path, optimizer=optimizer)
    assert checkpointer.resume_point() is None  # an empty folder: start from scratch
    for iteration in (5, 10):
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    checkpointer.save("model_final", iteration=15)
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")  # a stale pointer
    path, state = checkpointer.resume_point()
    assert path.name == "model_final.pth" and state["iteration"] == 15

    (tmp_path / "model_final.pth").write_bytes(b"truncated by a full disk")
    bad = {"model": {"w": torch.ones(2), "running_var": torch.tensor([1.0, float("nan")])},
           "optimizer": optimizer.state_dict(), "iteration": 10}
    torch.save(bad, tmp_path / "model_0000010.pth")  # written by an older version, before the finite check
    with caplog.at_level(logging.WARNING, logger="detectron_res.engine.checkpoint"):
        path, state = checkpointer.resume_point()
    assert path.name == "model_0000005.pth" and state["iteration"] == 5
    assert "Cannot resume from" in caplog.text and "model.running_var" in caplog.text

    (tmp_path / "model_0000005.pth").unlink()
    with pytest.raises(ValueError, match=r"none of the checkpoints .* can be resumed from \(model_0000010.pth: 1 tensors"):
        checkpointer.resume_point()


def test_fine_tuning_skips_tensors_of_another_shape_with_a_warning_and_evaluation_does_not(tmp_path, caplog):
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 6))  # e.g. a detector with another class count
    torch.save({"model": source.state_dict()}, tmp_path / "other.pth")
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    initial_head = target[1].weight.detach().clone()
    checkpointer = Checkpointer(model=target, save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"1.weight: checkpoint \(6, 4\) vs model \(2, 4\)"):
        checkpointer.load(tmp_path / "other.pth")
    with caplog.at_level(logging.WARNING, logger="detectron_res.engine.checkpoint"):
        checkpointer.load(tmp_path / "other.pth", allow_shape_mismatch=True)
    assert "because the shapes differ" in caplog.text and "1.weight: checkpoint (6, 4) vs model (2, 4)" in caplog.text
    assert "1.bias: checkpoint (6,) vs model (2,)" in caplog.text
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[1].weight, initial_head)

    torch.save({"model": {"0.weight": torch.zeros(4, 3)}}, tmp_path / "partial.pth")  # missing keys stay an error
    with pytest.raises(ValueError, match=r"missing: 0.bias, 1.bias, 1.weight"):
        checkpointer.load(tmp_path / "partial.pth", allow_shape_mismatch=True)


def test_trainer_state_restores_every_random_generator_and_the_metric_history():
    trainer = Trainer(model=ToyModel(), data_loader=itertools.repeat([{}]), optimizer=torch.optim.SGD(
        ToyModel().parameters(), lr=0.1), max_iter=3, start_iter=0)
    trainer.train()
    state = trainer.state_dict()
    expected = (random.random(), np.random.random(), np.random.normal(), torch.rand(2))
    resumed = Trainer(model=ToyModel(), data_loader=itertools.repeat([{}]), optimizer=torch.optim.SGD(
        ToyModel().parameters(), lr=0.1), max_iter=5, start_iter=3)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    resumed.load_state_dict(state)
    assert (random.random(), np.random.random(), np.random.normal()) == expected[:3]
    assert torch.equal(torch.rand(2), expected[3])
    assert resumed.storage.history["loss_a"] == trainer.storage.history["loss_a"]
    assert [i for i, _ in resumed.storage.history["loss_a"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="trainer state of iteration 3 for a run starting at 0"):
        Trainer(model=ToyModel(), data_loader=[], optimizer=torch.optim.SGD(ToyModel().parameters(), lr=0.1),
                max_iter=5).load_state_dict(state)


def test_non_finite_loss_names_the_images_of_the_batch():
    model = ToyModel(nan_at=0)
    batches = itertools.repeat([{"file_name": "a.jpg"}, {"file_name": "b.jpg"}])
    trainer = Trainer(model=model, data_loader=batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), max_iter=2)
    with pytest.raises(NonFiniteLossError, match=r"images: a.jpg, b.jpg"):
        trainer.train()


def test_json_log_drops_records_after_the_resume_point_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "total_loss": i / 10}) + "\n" for i in range(1, 8)) + '{"itera')
    writer = JSONWriter(path=path, start_iter=5)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    storage = MetricsStorage(start_iter=5)
    storage.load_state_dict({"total_loss": [[4, 0.5]], "bbox/AP": [[4, 12.0]]})  # already written by the first run
    storage.put_scalar("total_loss", 0.6)
    writer.write(storage)
    writer.write(storage)  # nothing new: no record
    assert path.read_text().splitlines()[5:] == ['{"iteration": 6, "total_loss": 0.55}']  # the median of 0.5, 0.6


def test_scalar_metrics_flattens_one_or_several_test_sets():
    one = {"bbox": {"AP": 50.0, "APs": None}, "voc": {"mAP_07": 0.5, "per_class": {"cat": {"AP_07": float("nan")}}}}
    assert scalar_metrics(one) == {"bbox/AP": 50.0, "voc/mAP_07": 0.5}
    several = {"set_a": {"bbox": {"AP": 1.0}}, "set_b": {"bbox": {"AP": 2.0}}}
    assert scalar_metrics(several) == {"set_a/bbox/AP": 1.0, "set_b/bbox/AP": 2.0}


class LinearModel(nn.Module):
    """Loss = (x . w - 1)^2 through a Linear layer (so that autocast has a matmul to lower), recording its dtypes."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1, bias=False)
        nn.init.constant_(self.linear.weight, 0.5)
        self.dtypes = []

    def forward(self, batch):
        out = self.linear(torch.ones(1, 4))
        self.dtypes.append(out.dtype)
        return {"loss": ((out.float() - 1.0) ** 2).sum()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_autocast_runs_the_forward_in_its_dtype_and_steps_in_float32(dtype):
    model = LinearModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model=model, data_loader=itertools.repeat([{}]), optimizer=optimizer, max_iter=1,
                      amp_dtype=dtype)  # fmt: skip
    trainer.train()
    assert model.dtypes == [dtype or torch.float32] and model.linear.weight.dtype == torch.float32
    # loss (4 * 0.5 - 1)^2 = 1, gradient 2 * (2 - 1) * x = 2 per weight: 0.5 - 0.1 * 2 = 0.3 (exact in bfloat16)
    torch.testing.assert_close(model.linear.weight, torch.full((1, 4), 0.3))
    assert trainer.storage.latest("total_loss") == trainer.storage.latest("loss") == 1.0


def test_a_non_finite_loss_on_another_rank_stops_this_one_at_the_same_step(monkeypatch):
    from detectron_res.engine import trainer as trainer_module

    # this rank's loss is 2.0; the mean over 2 ranks of (total, loss, finite flag, stop flag) says one rank's was not
    # finite
    sent = []

    def all_reduce_mean(tensor):
        sent.append(tensor.tolist())
        return replies.pop(0)
    monkeypatch.setattr(trainer_module.comm, "all_reduce_mean", all_reduce_mean)
    replies = [torch.tensor([float("nan")] * 2 + [0.5, 0.0])]
    loss = torch.tensor(2.0)
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer_module.all_ranks_losses({"loss": loss}, loss, iteration=4)
    assert str(stopped.value) == (
        "Loss became non-finite at iteration 5 on another rank (see its error); rank 0 stops with it"
    )
    # a SIGTERM on this rank (stop=True) or on another (a stop flag mean of 0.5) stops every rank after this step
    replies = [torch.tensor([3.0, 1.0, 1.0, stop]) for stop in (0.0, 0.5, 0.5)]
    means = {"total_loss": 3.0, "loss": 1.0}
    assert trainer_module.all_ranks_losses({"loss": loss}, loss, iteration=4) == (means, False)
    assert trainer_module.all_ranks_losses({"loss": loss}, loss, iteration=4) == (means, True)
    assert trainer_module.all_ranks_losses({"loss": loss}, loss, iteration=4, stop=True)[1] is True
    assert sent[1:] == [[2.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 1.0]]  # this rank's flags


def test_a_gradient_scaler_scales_the_backward_and_its_state_goes_into_the_trainer_state(tmp_path):
    model = LinearModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    trainer = Trainer(model=model, data_loader=itertools.repeat([{}]), optimizer=optimizer, max_iter=1,
                      grad_scaler=scaler)  # fmt: skip
    trainer.train()
    torch.testing.assert_close(model.linear.weight, torch.full((1, 4), 0.3))  # unscaled before the step
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == 2048.0  # one finite step grows the scale (growth_interval=1)
    assert state["world_size"] == 1 and len(state["rng"]) == 1

    fresh = torch.amp.GradScaler("cpu", init_scale=1.0)
    resumed = Trainer(model=LinearModel(), data_loader=iter(()), optimizer=optimizer, max_iter=2, start_iter=1,
                      grad_scaler=fresh)  # fmt: skip
    resumed.load_state_dict(state)
    assert fresh.get_scale() == 2048.0


def test_a_single_process_checkpoints_trainer_state_of_the_older_form_still_resumes():
    trainer = Trainer(model=LinearModel(), data_loader=iter(()), optimizer=None, max_iter=3, start_iter=1)
    state = trainer.state_dict()
    old = dict(state, rng=state["rng"][0])  # before distributed training: one dict of states, no world size
    del old["world_size"]
    torch.manual_seed(123)
    trainer.load_state_dict(old)
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])


def test_a_trainer_state_of_two_processes_restores_rank_0s_states_here_with_a_warning(caplog):
    from detectron_res.engine.trainer import get_rng_states

    trainer = Trainer(model=LinearModel(), data_loader=iter(()), optimizer=None, max_iter=3, start_iter=1)
    state = trainer.state_dict()
    torch.manual_seed(7)
    two = dict(state, world_size=2, rng=[state["rng"][0], get_rng_states()], grad_scaler={"scale": 8.0})
    with caplog.at_level(logging.WARNING, logger="detectron_res.engine.trainer"):
        trainer.load_state_dict(two)  # no gradient scaler here: its state is not needed
    assert [r.getMessage() for r in caplog.records] == [
        "The checkpoint was written by a run of 2 processes, this one has 1: training goes on with the new sharding "
        "from the same place in the data, but its random draws differ from an uninterrupted run's"
    ]
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])  # rank 0's, not rank 1's
