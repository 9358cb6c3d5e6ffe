"""Training metrics: a per-run store of scalar histories, and writers to the console and a JSON-lines file."""

from __future__ import annotations

import datetime
import json
import logging
import resource
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class MetricsStorage:
    """Scalar histories of one training run: name -> [(iteration, value)]."""

    def __init__(self, *, start_iter: int = 0):
        self.iter = start_iter
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def put_scalar(self, name: str, value: float) -> None:
        self.history[name].append((self.iter, float(value)))

    def put_scalars(self, **values: float) -> None:
        for name, value in values.items():
            self.put_scalar(name, value)

    def latest(self, name: str) -> float | None:
        values = self.history.get(name)
        return values[-1][1] if values else None

    def median(self, name: str, window: int) -> float | None:
        """Median of the last `window` values: robust to the odd slow or lossy iteration."""
        values = self.history.get(name)
        return statistics.median(v for _, v in values[-window:]) if values else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class ConsoleWriter:
    """One log line: iteration, ETA, losses, learning rate, seconds per iteration, data time, peak memory."""

    def __init__(self, *, max_iter: int, window: int = 20):
        self.max_iter = max_iter
        self.window = window
        self._last_written = -1

    def write(self, storage: MetricsStorage) -> None:
        iteration = storage.iter
        if iteration == self._last_written:  # nothing new since the last line
            return
        self._last_written = iteration
        step_time = storage.median("time", self.window)
        eta = ""
        if step_time is not None:
            eta = f"eta: {datetime.timedelta(seconds=int(step_time * (self.max_iter - iteration - 1)))}  "
        losses = "  ".join(
            f"{name}: {storage.median(name, self.window):.4f}" for name in storage.history if name.startswith(("loss", "total_loss"))
        )
        parts = [f"iter: {iteration + 1}/{self.max_iter}", eta + losses]
        if step_time is not None:
            parts.append(f"time: {step_time:.3f}  data_time: {storage.median('data_time', self.window):.3f}")
        lr = storage.latest("lr")
        if lr is not None:
            parts.append(f"lr: {lr:.6g}")
        memory = storage.latest("memory_mb")
        if memory is not None:
            parts.append(f"max_mem: {memory:.0f}M")
        logger.info("  ".join(parts))


class JSONWriter:
    """Appends one JSON object per write to `path` (metrics.jsonl): the iteration and the latest scalars."""

    def __init__(self, *, path: str | Path, window: int = 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.window = window
        self._written_until: dict[str, int] = {}

    def write(self, storage: MetricsStorage) -> None:
        record: dict[str, float | int] = {"iteration": storage.iter + 1}
        for name, values in storage.history.items():
            if values and values[-1][0] > self._written_until.get(name, -1):
                smooth = name.startswith(("loss", "total_loss")) or name in ("time", "data_time")
                record[name] = storage.median(name, self.window) if smooth else values[-1][1]
                self._written_until[name] = values[-1][0]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
