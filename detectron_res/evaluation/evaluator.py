"""The evaluator protocol (detectron2's ``DatasetEvaluator``) and the loop that runs a model over a data set."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from ..utils import comm

logger = logging.getLogger(__name__)


class DatasetEvaluator(ABC):
    """Accumulates a model's outputs image by image and turns them into metrics.

    Inputs are the mapper dicts of one batch (at least ``"image_id"``, ``"height"``, ``"width"``); outputs
    are the model's per-image dicts ``{"boxes": (N, 4) XYXY in original image pixels, "scores": (N,),
    "labels": (N,) int64 contiguous class indices}``.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything processed so far; called before each evaluation run."""

    @abstractmethod
    def process(self, inputs: list[dict], outputs: list[dict[str, Tensor]]) -> None:
        """Record the outputs of one batch; ``inputs[i]`` belongs to ``outputs[i]``."""

    @abstractmethod
    def evaluate(self) -> dict:
        """Metrics over everything processed since the last :meth:`reset`, as ``{task: {metric: value}}``."""


@dataclass
class InferenceTiming:
    """Images run and the seconds the inference loop took, summed over the `inference_on_dataset` calls it is
    passed to (e.g. the rows of an ablation)."""

    images: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else float("nan")


def inference_on_dataset(
    model: Callable[[list[dict]], list[dict[str, Tensor]]],
    data_loader: Iterable[list[dict]],
    evaluator: DatasetEvaluator | None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    timing: InferenceTiming | None = None,
) -> dict:
    """Run ``model`` on every batch of ``data_loader``, feed ``evaluator`` and return its metrics.

    The model runs in eval mode inside ``torch.inference_mode()``; an ``nn.Module``'s training mode is
    restored afterwards. The model gets the batch's input dicts unchanged and moves them to its device itself.

    In a distributed job every rank runs its own shard of the data set (``data_loader`` of its rank, see
    ``InferenceSampler``); the outputs, on the CPU, and the inputs without their image tensors are gathered to rank 0,
    whose evaluator processes them in rank order (the data set's order) and evaluates once. Every rank returns those
    metrics; only rank 0 needs an evaluator (the others may pass None).

    Args:
        model: any callable from a list of input dicts to a list of output dicts (see :class:`DatasetEvaluator`).
        data_loader: yields lists of input dicts.
        evaluator: receives every batch; it is reset before the first one.
        device: where the model runs, used only to synchronise CUDA before reading the clock so that the
            logged images/s is exact. Default: the device of the model's first parameter, if it has any.
        progress: show a tqdm progress bar when stderr is a terminal (none in logs and CI).
        timing: when given, the images and the seconds of the loop (loading, model, `process`) are added to it.
    """
    device = _resolve_device(model, device)
    distributed = comm.get_world_size() > 1
    if evaluator is None and comm.is_main_process():
        raise ValueError("inference_on_dataset needs an evaluator on rank 0")
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None

    if evaluator is not None:
        evaluator.reset()
    was_training = getattr(model, "training", None)
    if was_training is not None and hasattr(model, "train"):
        model.eval()  # type: ignore[attr-defined]
    num_images = 0
    shard: list[tuple[list[dict], list[dict]]] = []  # distributed: this rank's (inputs, outputs) for rank 0
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            for inputs in tqdm(data_loader, total=total, desc="inference", disable=None if progress else True):
                outputs = model(inputs)
                if distributed:
                    shard.append(([_without_images(x) for x in inputs], [_on_cpu(y) for y in outputs]))
                else:
                    evaluator.process(inputs, outputs)  # type: ignore[union-attr]
                num_images += len(inputs)
            synchronize_device(device)
            elapsed = time.perf_counter() - start
    finally:
        if was_training is not None and hasattr(model, "train"):
            model.train(was_training)  # type: ignore[attr-defined]

    if timing is not None:
        timing.images += num_images
        timing.seconds += elapsed
    if not distributed:
        logger.info(
            "Inference on %d images took %.2f s (%.2f images/s)",
            num_images, elapsed, num_images / elapsed if elapsed > 0 else float("inf"),
        )
        return evaluator.evaluate()  # type: ignore[union-attr]

    shards = comm.gather(shard)
    slowest = max(comm.all_gather(elapsed))
    metrics = None
    if comm.is_main_process():
        for rank_shard in shards:
            for inputs, outputs in rank_shard:
                evaluator.process(inputs, outputs)  # type: ignore[union-attr]
        images = sum(len(inputs) for rank_shard in shards for inputs, _ in rank_shard)
        logger.info(
            "Inference on %d images over %d processes took %.2f s (%.2f images/s)",
            images, comm.get_world_size(), slowest, images / slowest if slowest > 0 else float("inf"),
        )
        metrics = evaluator.evaluate()  # type: ignore[union-attr]
    return comm.broadcast(metrics)


def _without_images(inputs: dict) -> dict:
    """An input dict without its image tensors (what evaluators read is the rest: ids, sizes, annotations)."""
    return {key: value for key, value in inputs.items() if not _holds_tensors(value)}


def _holds_tensors(value: object) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Tensor) for v in value)
    )


def _on_cpu(outputs: dict) -> dict:
    return {key: value.cpu() if isinstance(value, Tensor) else value for key, value in outputs.items()}


def _resolve_device(model: object, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def synchronize_device(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that a clock read after it is exact; nothing on the CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
