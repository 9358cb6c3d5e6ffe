"""The thin training loop (detectron2's SimpleTrainer): fetch a batch, compute losses, check them, step; hooks do
everything else (learning-rate schedule, checkpoints, logging, evaluation).

`Trainer.state_dict()` is what a checkpoint needs besides the model, optimizer and scheduler for a resumed run to
continue exactly as an uninterrupted one (on CPU, bit for bit): the iteration, every random generator of the
process (Python, NumPy, torch, CUDA) and the recent metric history that the logged medians are taken over. The
data loader's position is the iteration itself (see `detectron_res.data.loader`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
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
        self.done = start_iter  # iterations completed, the first `start_iter` of them by an earlier run
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
                self.done = self.iter + 1
                for hook in self.hooks:
                    hook.after_step()
            self.iter = self.max_iter
            self.completed = True
        finally:
            for hook in self.hooks:
                hook.after_train()

    def state_dict(self) -> dict[str, Any]:
        """The iteration done, the random generators' states and the recent metric history (see the module)."""
        return {"iteration": self.done, "rng": get_rng_states(), "metrics": self.storage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` saved; the iteration must be the `start_iter` this trainer was built with."""
        if state["iteration"] != self.start_iter:
            raise ValueError(f"trainer state of iteration {state['iteration']} for a run starting at {self.start_iter}")
        set_rng_states(state["rng"])
        self.storage.load_state_dict(state["metrics"])

    def run_step(self) -> None:
        start = time.perf_counter()
        batch = next(self._data_iter)
        data_time = time.perf_counter() - start
        losses = self.model(batch)
        check_losses_finite(losses, iteration=self.iter, batch=batch)
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


def check_losses_finite(losses: dict[str, torch.Tensor], *, iteration: int, batch: Sequence[dict] = ()) -> None:
    """Raises NonFiniteLossError naming the iteration, every non-finite loss term and the batch's images."""
    values = {name: value.item() for name, value in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        files = [str(item.get("file_name", item.get("image_id", "?"))) for item in batch]
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {iteration + 1}: "
            + ", ".join(f"{name} = {value}" for name, value in bad.items())
            + f" (all terms: {values}; images: {', '.join(files) or 'unknown'}). "
            "Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or set SOLVER.CLIP_GRAD_NORM."
        )


def get_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (and CUDA's, one per device), as plain
    values and tensors that `torch.load(weights_only=True)` reads back."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what `get_rng_states` returned (CUDA states only when this process sees as many devices)."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            logger.warning("The checkpoint holds the random states of %d CUDA devices; not restored on this machine",
                           len(states["cuda"]))
