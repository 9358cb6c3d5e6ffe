"""Training metrics: a per-run store of scalar histories, and writers to the console, a JSON-lines file and
TensorBoard event files."""

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

from ..utils import atomic_write_text

logger = logging.getLogger(__name__)


class MetricsStorage:
    """Scalar histories of one training run: name -> [(iteration, value)]."""

    KEPT_IN_CHECKPOINTS = 200  # recent values per name saved for a resumed run (more than any median window)

    def __init__(self, *, start_iter: int = 0):
        self.iter = start_iter
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def state_dict(self) -> dict[str, list[list[float]]]:
        """The last `KEPT_IN_CHECKPOINTS` (iteration, value) pairs of every name."""
        return {name: [[i, v] for i, v in values[-self.KEPT_IN_CHECKPOINTS :]] for name, values in self.history.items()}

    def load_state_dict(self, state: dict[str, list[list[float]]]) -> None:
        self.history.clear()
        for name, values in state.items():
            self.history[name] = [(int(i), float(v)) for i, v in values]

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
    """Appends one JSON object per write to `path` (metrics.jsonl): the iteration and the scalars new since the last
    write (evaluation results at the end of training get a record of their own for the last iteration).

    A run starting at `start_iter` (resumed from a checkpoint of that iteration) first drops the file's records of
    later iterations, which a killed run wrote after its last checkpoint and the resumed run writes again, so no
    iteration appears twice; a half-written last line is dropped too.
    """

    def __init__(self, *, path: str | Path, window: int = 20, start_iter: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.window = window
        self.start_iter = start_iter
        self._written_until: dict[str, int] = {}
        self._drop_records_after(start_iter)

    def _drop_records_after(self, iteration: int) -> None:
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                keep = record["iteration"] <= iteration
            except (json.JSONDecodeError, TypeError, KeyError):
                keep = False
            kept += [line] if keep else []
            dropped += not keep
        if dropped:
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
            logger.info("Dropped %d records after iteration %d from %s (written after the last checkpoint)",
                        dropped, iteration, self.path)

    def write(self, storage: MetricsStorage) -> None:
        values = new_scalars(storage, self._written_until, start_iter=self.start_iter, window=self.window)
        if not values:  # nothing new since the last write
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": storage.iter + 1, **values}) + "\n")


def new_scalars(
    storage: MetricsStorage, written_until: dict[str, int], *, start_iter: int, window: int
) -> dict[str, float]:
    """The scalars of `storage` recorded since the last call (per name, at an iteration after
    `written_until[name]`, else after `start_iter - 1`): losses, time and data_time as medians over the last
    `window` values, the others as their latest value. Updates `written_until`."""
    values: dict[str, float] = {}
    for name, history in storage.history.items():
        if history and history[-1][0] > written_until.get(name, start_iter - 1):
            smooth = name.startswith(("loss", "total_loss")) or name in ("time", "data_time")
            values[name] = storage.median(name, window) if smooth else history[-1][1]
            written_until[name] = history[-1][0]
    return values


class TensorboardMissingError(ImportError, RuntimeError):
    """TENSORBOARD is on but the tensorboard package is not installed (also a RuntimeError, so that the tools
    report it as a one-line error)."""


class TensorboardWriter:
    """TensorBoard event files in `log_dir`: at each write the scalars new since the last one, the same values and
    iteration number (`storage.iter + 1`) as `JSONWriter`'s record, under the same names ("total_loss", "lr",
    "bbox/AP", ...). Events are flushed at every write, so TensorBoard shows a running job.

    A run starting at `start_iter` > 0 (resumed) opens its event file with `purge_step=start_iter + 1`: TensorBoard
    then discards the events of later iterations that a killed run wrote before it, as `JSONWriter` drops its
    records. torch's `SummaryWriter` (from the `tensorboard` package, `pip install detectron_res[viz]`) is imported
    here, not with the module.

    Raises:
        TensorboardMissingError: tensorboard is not installed.
    """

    def __init__(self, *, log_dir: str | Path, window: int = 20, start_iter: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise TensorboardMissingError(
                f"TENSORBOARD: true needs the tensorboard package, which is not installed ({error}); "
                "pip install detectron_res[viz], or set TENSORBOARD=false"
            ) from error
        self.log_dir = Path(log_dir)
        self.window = window
        self.start_iter = start_iter
        self._written_until: dict[str, int] = {}
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_iter + 1 if start_iter > 0 else None)

    def write(self, storage: MetricsStorage) -> None:
        values = new_scalars(storage, self._written_until, start_iter=self.start_iter, window=self.window)
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=storage.iter + 1)
        if values:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file (later writes are lost)."""
        self._writer.close()
