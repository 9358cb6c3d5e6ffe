"""Checkpoints of model, optimizer, scheduler and iteration, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over its final name;
`last_checkpoint` (a one-line text file naming the newest checkpoint) is replaced the same way afterwards. A crash
at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the module itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def state_dict_mismatches(own: dict, theirs: dict, *, shown: int = 10) -> list[str]:
    """Human-readable differences between a model's state_dict and a checkpoint's: wrong shapes, missing keys,
    unexpected keys (at most `shown` names each)."""

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")

    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch: {names(wrong_shape)}")
    if missing:
        problems.append(f"missing: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected: {names(unexpected)}")
    return problems


class Checkpointer:
    def __init__(
        self,
        *,
        model: nn.Module,
        save_dir: str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        metadata: dict | None = None,
    ):
        """
        Args:
            model: saved and loaded through its state_dict (a DDP wrapper is unwrapped).
            save_dir: where checkpoints and the `last_checkpoint` pointer live.
            optimizer, scheduler: saved alongside and restored on resume.
            metadata: plain data saved in every checkpoint under "metadata" (e.g. the class names).
        """
        self.model = unwrap_model(model)
        self.save_dir = Path(save_dir)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.metadata = metadata or {}

    def save(self, name: str, **extra: Any) -> Path:
        """Writes `save_dir/name.pth` holding the model, optimizer, scheduler and `extra` (e.g. iteration)."""
        state = {"model": self.model.state_dict(), "metadata": self.metadata, **extra}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        path = self.save_dir / f"{name}.pth"
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write_text(self.save_dir / LAST_CHECKPOINT, path.name)
        logger.info("Saved checkpoint %s", path)
        return path

    def last_checkpoint(self) -> Path | None:
        """The checkpoint `last_checkpoint` names, if both exist."""
        pointer = self.save_dir / LAST_CHECKPOINT
        if not pointer.is_file():
            return None
        path = self.save_dir / pointer.read_text().strip()
        return path if path.is_file() else None

    def load(self, path: str | Path, *, resume: bool = False) -> dict[str, Any]:
        """Loads the model weights of `path` (a detectron_res checkpoint or a bare state_dict); with `resume`,
        also the optimizer and scheduler. Returns the checkpoint's other entries (e.g. "iteration").

        Raises on any missing, unexpected or mis-shaped model key: a checkpoint must fit the model exactly.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"Could not read checkpoint {path}: {e}") from e
        model_state = state.get("model", state) if isinstance(state, dict) else None
        if not isinstance(model_state, dict):
            raise ValueError(f"{path} holds no model state_dict")
        problems = state_dict_mismatches(self.model.state_dict(), model_state)
        if problems:
            raise ValueError(
                f"Checkpoint {path} does not fit the model (is the config the one it was trained with?): "
                + "; ".join(problems)
            )
        self.model.load_state_dict(model_state)
        logger.info("Loaded model weights from %s", path)
        if resume:
            for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
                if target is not None:
                    if key not in state:
                        raise ValueError(f"Cannot resume from {path}: it holds no {key} state")
                    target.load_state_dict(state[key])
        return {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler")}
