"""Checkpoints of model, optimizer, scheduler, iteration and trainer state, written atomically and only when finite.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over its final name;
`last_checkpoint` (a one-line text file naming the newest checkpoint) is replaced the same way afterwards. A crash
at any moment leaves the previous checkpoint and pointer intact. A model or optimizer holding a NaN or infinite
value is never written: `save` refuses with `NonFiniteCheckpointError`, so the newest checkpoint is always one a
run can resume from.

Periodic checkpoints are `model_<iteration, 7 digits>.pth` (the iterations done), the last one `model_final.pth`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling.weight_formats import detect_format, detectron2_to_detectron_res, read_weights_file
from ..utils.io import DiskFullError, atomic_write, atomic_write_text, read_torch_file

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
FINAL_CHECKPOINT = "model_final"
_PERIODIC_NAME = re.compile(r"model_(\d{7})\.pth")
_SHOWN = 10


class NonFiniteCheckpointError(FloatingPointError):
    """The model or optimizer state holds NaN or infinite values; the checkpoint was not written."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the module itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _names(keys: list[str], shown: int = _SHOWN) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def state_dict_mismatches(own: dict, theirs: dict, *, shown: int = _SHOWN) -> list[str]:
    """Human-readable differences between a model's state_dict and a checkpoint's: wrong shapes, missing keys,
    unexpected keys (at most `shown` names each)."""
    wrong_shape = shape_mismatches(own, theirs)
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch: {_names(wrong_shape, shown)}")
    if missing:
        problems.append(f"missing: {_names(missing, shown)}")
    if unexpected:
        problems.append(f"unexpected: {_names(unexpected, shown)}")
    return problems


def shape_mismatches(own: dict, theirs: dict) -> list[str]:
    """`key: checkpoint (shape) vs model (shape)` for every key both hold with different shapes."""
    return [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and own[k].shape != v.shape
    ]


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors anywhere in `state` (nested dicts and lists) holding a NaN or an
    infinity."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    found = []
    for key, value in items:
        found += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration a checkpoint file was written at: from its name (`model_0005000.pth`), else read from the
    file (memory-mapped: the weights are not read); None when the file cannot be read."""
    match = _PERIODIC_NAME.fullmatch(path.name)
    if match:
        return int(match.group(1))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file simply has no iteration
        return None
    iteration = state.get("iteration") if isinstance(state, dict) else None
    return int(iteration) if isinstance(iteration, int) else None


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
        """Writes `save_dir/name.pth` holding the model, optimizer, scheduler and `extra` (e.g. iteration), then
        points `last_checkpoint` at it.

        Raises:
            DiskFullError: the filesystem is full (an OSError; one line naming the file and the free space, with a
                note naming the checkpoint `last_checkpoint` still points at); nothing else changed.
            NonFiniteCheckpointError: a model parameter or buffer (e.g. a BatchNorm running variance) or an optimizer
                state holds NaN or infinity; nothing is written, the previous checkpoint stays the newest.
        """
        state = {"model": self.model.state_dict(), "metadata": self.metadata, **extra}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        path = self.save_dir / f"{name}.pth"
        bad = non_finite_tensors({"model": state["model"], "optimizer": state.get("optimizer", {})})
        if bad:
            raise NonFiniteCheckpointError(
                f"Refusing to write {path}: {len(bad)} tensors hold NaN or infinite values ({_names(bad)}); "
                "training has diverged."
            )
        previous = self._pointer_target()
        try:
            atomic_write(path, lambda f: torch.save(state, f))
            atomic_write_text(self.save_dir / LAST_CHECKPOINT, path.name)
        except DiskFullError as error:
            error.add_note(
                f"The newest checkpoint is still {previous}: free some space, then continue with --resume."
                if previous is not None else "No checkpoint had been written yet."
            )
            raise
        logger.info("Saved checkpoint %s", path)
        return path

    def checkpoint_files(self) -> list[tuple[int | None, Path]]:
        """Every `model_*.pth` in `save_dir` with its iteration (None: unreadable), newest first."""
        found = [(checkpoint_iteration(path), path) for path in self.save_dir.glob("model_*.pth")]
        return sorted(found, key=lambda item: (item[0] is not None, item[0] or 0, item[1].name), reverse=True)

    def last_checkpoint(self) -> Path | None:
        """The checkpoint `last_checkpoint` names; if that file is gone (or there is no pointer), the newest
        checkpoint file in the folder by iteration, with a warning; None when there is none."""
        named = self._pointer_target()
        if named is not None and (self.save_dir / named).is_file():
            return self.save_dir / named
        readable = [path for iteration, path in self.checkpoint_files() if iteration is not None]
        if readable and named is not None:
            logger.warning("%s names %s, which is missing; using the newest checkpoint, %s",
                           self.save_dir / LAST_CHECKPOINT, named, readable[0])
        return readable[0] if readable else None

    def _pointer_target(self) -> str | None:
        """The file name `last_checkpoint` holds, None without a pointer."""
        pointer = self.save_dir / LAST_CHECKPOINT
        return pointer.read_text().strip() if pointer.is_file() else None

    def resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint in `save_dir` that can be resumed from, and its contents.

        Newest means the highest iteration, whatever `last_checkpoint` says (a missing, stale or unreadable pointer
        is only worth a warning). A file that cannot be read, lacks the optimizer or iteration, or holds non-finite
        values is skipped with a warning and the next newest is tried. None when the folder holds no checkpoint.

        Raises:
            ValueError: the folder holds checkpoint files but none of them can be resumed from.
        """
        candidates = self.checkpoint_files()
        problems = []
        for _, path in candidates:
            try:
                state = self.read(path)
                for key in ("iteration", "optimizer"):
                    if key not in state:
                        raise ValueError(f"it holds no {key!r}: not a training checkpoint")
                bad = non_finite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
                if bad:
                    raise ValueError(f"{len(bad)} tensors hold NaN or infinite values ({_names(bad)})")
            except ValueError as error:
                problems.append(f"{path.name}: {error}")
                logger.warning("Cannot resume from %s: %s", path, error)
                continue
            named = self._pointer_target()
            if named != path.name:
                logger.warning("%s names %r; resuming from the newest usable checkpoint, %s",
                               self.save_dir / LAST_CHECKPOINT, named, path.name)
            return path, state
        if problems:
            raise ValueError(
                f"--resume: none of the checkpoints in {self.save_dir} can be resumed from ({'; '.join(problems)}). "
                "Move them away to start afresh, or choose another output folder."
            )
        return None

    def read(self, path: str | Path) -> dict[str, Any]:
        """The contents of a detectron_res checkpoint, or {"model": state_dict} for a bare state_dict file.

        A detectron2 C4 detector (a model-zoo `.pkl` or a detectron2 `.pth` checkpoint) is converted to our names
        (`modeling.weight_formats`): {"model", "format": "detectron2", "settings": the config values it needs}; its
        optimizer and iteration are not taken.

        Raises:
            FileNotFoundError: no such file. ValueError: it cannot be read (`utils.io.UnreadableFileError`, one line
                saying why: empty, text, truncated, a pickled object refused, ...) or holds no model state_dict.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint not found: {path}")
        if path.suffix == ".pkl":
            tensors, container = read_weights_file(path)
            state = {**container, "model": tensors}
        else:
            state = read_torch_file(path, what="checkpoint")
        model_state = state.get("model", state) if isinstance(state, dict) else None
        if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
            raise ValueError(f"{path} holds no model state_dict")
        found = detect_format(model_state)
        if found == "detectron2":
            converted = detectron2_to_detectron_res(model_state)
            logger.info("%s is a detectron2 model: %d tensors renamed to ours", path, len(converted.state_dict))
            return {"model": converted.state_dict, "format": "detectron2", "settings": converted.settings}
        if found in ("msra", "torchvision"):
            raise ValueError(
                f"{path} holds ImageNet ResNet weights ({found}), not a detector: give it to MODEL.BACKBONE.WEIGHTS"
            )
        return state if "model" in state else {"model": model_state}

    def load(
        self, path: str | Path, *, resume: bool = False, allow_shape_mismatch: bool = False, state: dict | None = None
    ) -> dict[str, Any]:
        """Loads the model weights of `path` (a detectron_res checkpoint or a bare state_dict; `state` when already
        read); with `resume`, also the optimizer and scheduler. Returns the checkpoint's other entries (e.g.
        "iteration", "metadata", "trainer").

        Every key must match the model. With `allow_shape_mismatch` (fine-tuning, e.g. COCO weights for a VOC
        model), tensors whose shape differs are skipped with a warning naming them and keep their initial values;
        otherwise any difference is an error.
        """
        path = Path(path)
        state = state if state is not None else self.read(path)
        model_state = dict(state["model"])
        explain = getattr(unwrap_model(self.model), "checkpoint_mismatch", None)
        reason = explain(model_state) if explain is not None else None
        if reason:
            raise ValueError(f"Checkpoint {path} does not fit the model: {reason}")
        own = self.model.state_dict()
        skipped = shape_mismatches(own, model_state) if allow_shape_mismatch else []
        if skipped:  # those tensors keep the model's own values
            model_state = {k: own[k] if k in own and own[k].shape != v.shape else v for k, v in model_state.items()}
            logger.warning(
                "Not loaded from %s because the shapes differ (they keep their initial values): %s",
                path, "; ".join(skipped),
            )
        problems = state_dict_mismatches(own, model_state)
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
