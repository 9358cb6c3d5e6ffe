"""The thin training loop (detectron2's SimpleTrainer): fetch a batch, compute losses, check them, step; hooks do
everything else (learning-rate schedule, checkpoints, logging, evaluation)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .events import MetricsStorage

logger = logging.getLogger(__name__)


class HookBase:
    """Called around training and each step; `self.trainer` is set when registered."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised before the optimizer step, so the weights stay finite."""


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        data_loader: Iterable[list[dict]],
        optimizer: torch.optim.Optimizer,
        max_iter: int,
        start_iter: int = 0,
        hooks: Sequence[HookBase] = (),
        clip_grad_norm: float = 0.0,
    ):
        """
        Args:
            model: returns a dict of named scalar losses for a list of input dicts.
            data_loader: an infinite iterable of batches (lists of mapper dicts).
            optimizer: stepped once per iteration.
            max_iter, start_iter: iterations run are start_iter .. max_iter - 1 (start_iter > 0 when resuming).
            hooks: run in order around training and each step.
            clip_grad_norm: clip the gradients' total norm to this; 0 = off.
        """
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.iter = start_iter
        self.clip_grad_norm = clip_grad_norm
        self.storage = MetricsStorage(start_iter=start_iter)
        self.completed = False  # set once every iteration ran without error
        self.hooks: list[HookBase] = []
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def train(self) -> None:
        logger.info("Starting training from iteration %d to %d", self.start_iter, self.max_iter)
        self.model.train()
        self._data_iter = iter(self.data_loader)
        try:
            for hook in self.hooks:
                hook.before_train()
            for self.iter in range(self.start_iter, self.max_iter):
                self.storage.iter = self.iter
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
            self.iter = self.max_iter
            self.completed = True
        finally:
            for hook in self.hooks:
                hook.after_train()

    def run_step(self) -> None:
        start = time.perf_counter()
        batch = next(self._data_iter)
        data_time = time.perf_counter() - start
        losses = self.model(batch)
        check_losses_finite(losses, iteration=self.iter)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.optimizer.step()
        self.storage.put_scalars(
            data_time=data_time, total_loss=total.item(), **{name: value.item() for name, value in losses.items()}
        )


def check_losses_finite(losses: dict[str, torch.Tensor], *, iteration: int) -> None:
    """Raises NonFiniteLossError naming the iteration and every non-finite loss term."""
    values = {name: value.item() for name, value in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {iteration + 1}: "
            + ", ".join(f"{name} = {value}" for name, value in bad.items())
            + f" (all terms: {values}). Training stopped; the last checkpoint written is intact. "
            "Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or set SOLVER.CLIP_GRAD_NORM."
        )
