"""Training hooks: step timing, learning-rate schedule, periodic checkpoints, periodic evaluation, writers."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from .checkpoint import FINAL_CHECKPOINT, Checkpointer
from .events import peak_memory_mb
from .trainer import HookBase

logger = logging.getLogger(__name__)


class IterationTimer(HookBase):
    """Records each step's wall time ("time") and the peak memory so far ("memory_mb")."""

    def before_train(self) -> None:
        self._train_start = time.perf_counter()

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        storage = self.trainer.storage
        storage.put_scalar("time", time.perf_counter() - self._step_start)
        storage.put_scalar("memory_mb", peak_memory_mb(next(self.trainer.model.parameters()).device))

    def after_train(self) -> None:
        done = self.trainer.done - self.trainer.start_iter
        total = time.perf_counter() - self._train_start
        logger.info("Ran %d iterations in %.1f s (%.3f s / iteration)", done, total, total / max(done, 1))


class LRScheduler(HookBase):
    """Records the learning rate and steps the scheduler after every iteration."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_step(self) -> None:
        self.trainer.storage.put_scalar("lr", self.trainer.optimizer.param_groups[0]["lr"])
        self.scheduler.step()


class PeriodicCheckpointer(HookBase):
    """Saves `model_XXXXXXX.pth` every `period` iterations and `model_final.pth` when training completes, each with
    the trainer's state for an exact resume. A run that fails (e.g. a non-finite loss) writes nothing more: the last
    good checkpoint stays the newest. A run that had nothing left to do (resumed at `max_iter`) rewrites nothing. A
    run stopped by SIGTERM (`trainer.stopped`, a preemption) saves `model_XXXXXXX.pth` of the iteration it stopped
    after, so that `--resume` loses no step.

    In a distributed job every rank runs the hook (the trainer state gathers all ranks' random states) and only the
    one built with `write` (rank 0) writes."""

    def __init__(self, checkpointer: Checkpointer, *, period: int, write: bool = True):
        self.checkpointer = checkpointer
        self.period = period
        self.write = write

    def _save(self, name: str) -> None:
        state = self.trainer.state_dict()
        if self.write:
            self.checkpointer.save(name, iteration=state["iteration"], trainer=state)

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.period == 0 and done < self.trainer.max_iter:
            self._save(f"model_{done:07d}")

    def after_train(self) -> None:
        if self.trainer.completed and self.trainer.max_iter > self.trainer.start_iter:
            self._save(FINAL_CHECKPOINT)
        elif self.trainer.stopped:
            done = self.trainer.done
            if done % self.period != 0 or done >= self.trainer.max_iter:  # else after_step has just saved it
                self._save(f"model_{done:07d}")


def scalar_metrics(results: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of nested evaluation results under "/"-joined names: {"bbox": {"AP": 1.0}} -> {"bbox/AP": 1.0},
    {"set_a": {"bbox": {"AP": 1.0}}} -> {"set_a/bbox/AP": 1.0}; undefined values (None, NaN) are left out."""
    scalars: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            scalars.update(scalar_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scalars[f"{prefix}{key}"] = value
    return scalars


class EvalHook(HookBase):
    """Runs `eval_function() -> {task: {metric: value}}` (or {data set: {task: ...}} for several) every `period`
    iterations (0 = never during training) and once after training completes; the numbers go to the metrics
    storage as "task/metric" ("data set/task/metric")."""

    def __init__(self, eval_function: Callable[[], dict], *, period: int):
        self.eval_function = eval_function
        self.period = period

    def _evaluate(self) -> None:
        results = self.eval_function()
        for name, value in scalar_metrics(results).items():
            self.trainer.storage.put_scalar(name, value)
        self.trainer.model.train()

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.trainer.max_iter:
            self._evaluate()

    def after_train(self) -> None:
        if self.trainer.completed:
            self._evaluate()


class PeriodicWriter(HookBase):
    """Calls each writer's `write(storage)` every `period` iterations and at the end, then the `close()` of those
    that have one (TensorBoard's event files), whether training completed or failed."""

    def __init__(self, writers: Sequence, *, period: int):
        self.writers = list(writers)
        self.period = period

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.period == 0 or done == self.trainer.max_iter:
            for writer in self.writers:
                writer.write(self.trainer.storage)

    def after_train(self) -> None:
        if self.trainer.completed:  # the evaluation results arrive after the last step
            for writer in self.writers:
                writer.write(self.trainer.storage)
        for writer in self.writers:
            if callable(getattr(writer, "close", None)):
                writer.close()
