"""Checkpoints are atomic and resumable; a non-finite loss stops training and leaves the last good checkpoint."""

import itertools

import pytest
import torch
from torch import nn

from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.hooks import PeriodicCheckpointer
from detectron_res.engine.trainer import NonFiniteLossError, Trainer


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
