"""The thin training loop (detectron2's SimpleTrainer): fetch a batch, compute losses, check them, step; hooks do
everything else (learning-rate schedule, checkpoints, logging, evaluation).

`Trainer.state_dict()` is what a checkpoint needs besides the model, optimizer and scheduler for a resumed run to
continue exactly as an uninterrupted one (on CPU, bit for bit): the iteration, every random generator of the
process (Python, NumPy, torch, CUDA) and the recent metric history that the logged medians are taken over. The
data loader's position is the iteration itself (see `detectron_res.data.loader`). In a distributed job the state
holds every rank's random generators and the world size.

Distributed (DistributedDataParallel) and mixed-precision (autocast, with a gradient scaler for float16) training
run through the same step: the losses are averaged over the ranks for the log and checked everywhere at once.

A SIGTERM during the loop (a scheduler preempting the job) does not interrupt a step: the ranks learn of it through
the step's all-reduce of the losses, so that all of them stop after the same step; the hooks then write a checkpoint
there (`stopped`) and `Terminated` is raised (`utils.signals.sigterm_deferred`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import comm
from ..utils.signals import Terminated, sigterm_deferred, sigterm_requested
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
        amp_dtype: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        accumulate: int = 1,
    ):
        """
        Args:
            model: returns a dict of named scalar losses for a list of input dicts; in a distributed job, wrapped in
                DistributedDataParallel (the losses logged and checked are then the means over all ranks).
            data_loader: an infinite iterable of batches (lists of mapper dicts).
            optimizer: stepped once per iteration.
            max_iter, start_iter: iterations run are start_iter .. max_iter - 1 (start_iter > 0 when resuming).
            hooks: run in order around training and each step.
            clip_grad_norm: clip the gradients' total norm to this; 0 = off.
            amp_dtype: run the model's forward under autocast to this dtype (torch.bfloat16 or torch.float16) on
                its device; None = float32. The model keeps its losses and box decoding in float32.
            grad_scaler: scales the loss for float16 (`torch.amp.GradScaler`); None = no scaling.
            accumulate: batches per iteration (SOLVER.ACCUMULATE, Caffe's `iter_size`): the gradients of this many
                batches, each loss divided by it, are summed before the one optimizer step of the iteration, so an
                iteration is one step on `accumulate` x the loader's batch. The logged losses are their means.
        """
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.iter = start_iter
        self.done = start_iter  # iterations completed, the first `start_iter` of them by an earlier run
        self.clip_grad_norm = clip_grad_norm
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.accumulate = accumulate
        self.storage = MetricsStorage(start_iter=start_iter)
        self.completed = False  # set once every iteration ran without error
        self.stop_agreed = False  # a rank received SIGTERM before this step's all-reduce (see the module)
        self.stopped = False  # the loop stopped on it after `done` iterations
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
            with sigterm_deferred():
                for self.iter in range(self.start_iter, self.max_iter):
                    self.storage.iter = self.iter
                    for hook in self.hooks:
                        hook.before_step()
                    self.run_step()
                    self.done = self.iter + 1
                    for hook in self.hooks:
                        hook.after_step()
                    if self.stop_agreed:
                        self.stopped = True
                        logger.info("SIGTERM: stopping after iteration %d%s", self.done,
                                    f" (all {comm.get_world_size()} ranks)" if comm.is_distributed() else "")
                        raise Terminated("SIGTERM")
            self.iter = self.max_iter
            self.completed = True
        finally:
            for hook in self.hooks:
                hook.after_train()

    def state_dict(self) -> dict[str, Any]:
        """The iteration done, the world size, every rank's random generators' states (in rank order), the recent
        metric history and the gradient scaler's state (see the module). A collective: every rank must call it."""
        state = {
            "iteration": self.done,
            "world_size": comm.get_world_size(),
            "rng": comm.all_gather(get_rng_states()),
            "metrics": self.storage.state_dict(),
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` saved; the iteration must be the `start_iter` this trainer was built with.

        Each rank takes its own random states. Saved by another number of processes, the run goes on (the data
        continues at the same place of the shared sample order, see `data.loader`) but with the random states of
        the ranks both runs have, so it no longer repeats an uninterrupted run exactly: a warning says so."""
        if state["iteration"] != self.start_iter:
            raise ValueError(f"trainer state of iteration {state['iteration']} for a run starting at {self.start_iter}")
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one dict: a single-process run
        saved_world_size = state.get("world_size", len(rng))
        rank, world_size = comm.get_rank(), comm.get_world_size()
        if saved_world_size != world_size:
            logger.warning(
                "The checkpoint was written by a run of %d processes, this one has %d: training goes on with the new "
                "sharding from the same place in the data, but its random draws differ from an uninterrupted run's",
                saved_world_size, world_size,
            )
        if rank < len(rng):
            set_rng_states(rng[rank])
        self.storage.load_state_dict(state["metrics"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])

    def run_step(self) -> None:
        """One optimizer step on the gradients of `accumulate` batches (each backward adds to them); under DDP the
        first `accumulate - 1` backward passes skip the gradient all-reduce (`no_sync`), the last reduces the sum."""
        device = next(self.model.parameters()).device
        self.optimizer.zero_grad(set_to_none=True)
        data_time, logged = 0.0, []
        for index in range(self.accumulate):
            start = time.perf_counter()
            batch = next(self._data_iter)
            data_time += time.perf_counter() - start
            syncing = index == self.accumulate - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if syncing else self.model.no_sync():
                with torch.autocast(
                    device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
                ):
                    losses = self.model(batch)
                total = sum(losses.values())
                values, stop = all_ranks_losses(losses, total, iteration=self.iter, batch=batch,
                                                stop=sigterm_requested())
                logged.append(values)
                self.stop_agreed = self.stop_agreed or stop  # every rank sees each reduce: they agree
                if self.accumulate > 1:
                    total = total / self.accumulate  # the step's loss: the mean of the batches' losses
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(total).backward()
                else:
                    total.backward()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # clip (and the optimizer) see the true gradients
        if self.clip_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)  # skipped when float16 gradients overflowed
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        values = {name: sum(v[name] for v in logged) / len(logged) for name in logged[0]}
        self.storage.put_scalars(data_time=data_time, **values)


def all_ranks_losses(
    losses: dict[str, torch.Tensor], total: torch.Tensor, *, iteration: int, batch: Sequence[dict] = (),
    stop: bool = False,
) -> tuple[dict[str, float], bool]:
    """({"total_loss": ..., loss name: ...}, whether any rank asks to stop): the means over all ranks of `total` and
    `losses` (this process's values in a single process), after checking that they are finite everywhere, and
    whether `stop` was true on any rank (a SIGTERM), agreed in the same all-reduce so that every rank stops after
    the same step. A rank whose loss is not finite raises `NonFiniteLossError` naming its images, every other rank
    one saying that another rank's loss is not, all at the same step, so that no rank is left waiting for the
    others."""
    local = torch.stack([value.detach().float().reshape(()) for value in (total, *losses.values())])
    finite = torch.isfinite(local).all().float().reshape(1)
    stops = torch.tensor([float(stop)], device=local.device)  # NCCL reduces CUDA tensors only
    reduced = comm.all_reduce_mean(torch.cat([local, finite, stops]))
    check_losses_finite(losses, iteration=iteration, batch=batch)
    if reduced[-2].item() < 1:
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {iteration + 1} on another rank (see its error); rank "
            f"{comm.get_rank()} stops with it"
        )
    return dict(zip(["total_loss", *losses], reduced[:-2].tolist())), reduced[-1].item() > 0


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
