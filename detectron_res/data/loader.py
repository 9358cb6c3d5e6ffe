"""Training and inference data loaders: records -> mapper -> batches (lists of dicts), one process's share.

Worker processes start from a fork server (a clean process that imported torch, OpenCV and this package), never
by forking the main process: a fork inherits OpenCV's thread pool in whatever state the main process left it,
and a worker touching it can block forever (seen after the Predictor or the shapes generator had used OpenCV).
A worker that dies ends the run with torch's error; one that hangs, with an error after ``timeout`` seconds.

Training randomness does not depend on which worker maps a sample: every sample gets its own seed from
(seed, batch number, place in the batch of all processes), so resuming at batch ``start_iter`` replays exactly the
batches and augmentations an uninterrupted run would have drawn.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import pickle
import os
import random
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from ..utils.main_guard import check_main_guard
from .datasets.base import DetectionDataset
from .mapper import BadImageError
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids

logger = logging.getLogger(__name__)

Mapper = Callable[..., dict]
ON_BAD_IMAGE = ("error", "skip")
BAD_IMAGE_ERRORS = (BadImageError, FileNotFoundError, IsADirectoryError)
# modules the fork server imports once, so that each worker forked from it starts in milliseconds
_WORKER_PRELOAD = ["torch", "cv2", "albumentations", "detectron_res.data.loader"]
_MAX_REPLACEMENTS = 10  # consecutive bad images a training sample may skip before the run stops


class SerializedRecords(Sequence):
    """The records pickled into one byte buffer held by a torch tensor.

    Millions of small Python objects would be copied into every worker (reference counts touch their pages);
    one buffer is not, and as a tensor it travels to the workers through shared memory.
    """

    def __init__(self, records: Sequence[dict]) -> None:
        blobs = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self._ends = torch.tensor(np.cumsum([len(blob) for blob in blobs], dtype=np.int64))
        self._buffer = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy())

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        index %= len(self)
        begin = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(self._buffer[begin : int(self._ends[index])].numpy().tobytes())


class MappedDataset(Dataset):
    """Map-style data set: item ``i`` is ``mapper(records[i])``; item ``(i, seed)`` is
    ``mapper(records[i], rng=numpy.random.default_rng(seed))`` (the training loader's seeded samples).

    With ``on_bad_image="skip"`` an image that cannot be read (missing, corrupt, truncated, of another size than
    its record says) does not stop the run: a training sample moves on to the next record (up to
    ``_MAX_REPLACEMENTS`` of them), an inference sample becomes ``{"bad_image": message}``; the main process
    reports them (see :class:`SkipReportingLoader`). With ``"error"`` the error propagates.
    """

    def __init__(self, *, records: Sequence[dict], mapper: Mapper, on_bad_image: str = "error") -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.records = SerializedRecords(records)
        self.mapper = mapper
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        skipped: list[str] = []
        for _ in range(_MAX_REPLACEMENTS + 1):
            try:
                mapped = self._map(index, seed)
            except BAD_IMAGE_ERRORS as error:
                if self.on_bad_image == "error":
                    raise
                skipped.append(f"{type(error).__name__}: {error}")
                if seed is None:  # inference: report it, there is nothing to replace it with
                    return {"bad_image": skipped[0]}
                index = (index + 1) % len(self)
                continue
            if skipped:
                mapped["skipped_bad_images"] = skipped
            return mapped
        raise BadImageError(
            f"{_MAX_REPLACEMENTS + 1} consecutive images could not be read (DATALOADER.ON_BAD_IMAGE=skip): "
            + "; ".join(skipped)
        )

    def _map(self, index: int, seed: int | None) -> dict:
        if seed is None:
            return self.mapper(self.records[index])
        return self.mapper(self.records[index], rng=np.random.default_rng(seed))


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of ``batch_sampler`` from batch number ``start`` on, each index paired with its own seed.

    A sample's seed depends only on its place in the shared sample order of all processes: the k-th sample of
    batch b of process ``rank`` (of ``world_size``, each taking every world_size-th index of that order, see
    `TrainingSampler`) is sample k * world_size + rank of global batch b, and its seed is a hash of (seed, b, that
    place). So skipping ``start`` batches gives a resumed run the same data and augmentations as an uninterrupted
    one, and without aspect-ratio grouping N processes of B images draw the images and augmentations of one process
    of N x B. Skipping replays the (cheap, index-only) batch sampler, grouping buffers included.
    """

    def __init__(
        self, batch_sampler: Iterable[list[int]], *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in enumerate(self.batch_sampler):
            if number < self.start:
                continue
            seeds = np.random.SeedSequence([self.seed, number]).generate_state(len(batch) * self.world_size).tolist()
            yield [(index, int(seeds[k * self.world_size + self.rank])) for k, index in enumerate(batch)]


class SkipReportingLoader:
    """Iterates a loader of ``DATALOADER.ON_BAD_IMAGE=skip`` and logs every image left out, with a running count,
    in the main process: ``{"bad_image": ...}`` items are dropped (a batch left empty is not yielded) and a
    training sample's ``skipped_bad_images`` list is removed from it."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            kept = []
            for item in batch:
                messages = [item["bad_image"]] if "bad_image" in item else item.pop("skipped_bad_images", [])
                for message in messages:
                    self.num_skipped += 1
                    logger.warning("Skipped an unreadable image (%d so far): %s", self.num_skipped, message)
                if "bad_image" not in item:
                    kept.append(item)
            if kept:
                yield kept


def has_usable_annotation(record: dict) -> bool:
    """Whether the record has at least one non-crowd annotation (a training target)."""
    return any(not ann.get("iscrowd", 0) for ann in record.get("annotations") or ())


def build_train_loader(
    dataset: DetectionDataset,
    *,
    mapper: Mapper,
    batch_size: int,
    num_workers: int,
    aspect_ratio_grouping: bool,
    filter_empty: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    on_bad_image: str = "error",
    timeout: float = 0.0,
) -> Iterable[list[dict]]:
    """An infinite iterable of training batches for process ``rank``: lists of ``batch_size`` mapped records.

    Args:
        dataset: the training data set (concatenate several beforehand).
        mapper: ``mapper(record, *, rng)`` -> the model's input dict (e.g. ``DatasetMapper(is_train=True)``); all its
            randomness must come from ``rng``, a numpy Generator seeded per sample.
        batch_size: images per batch in this process.
        num_workers: loading processes; 0 loads in the main process.
        aspect_ratio_grouping: batch landscape images together and portrait images together.
        filter_empty: leave out records with no non-crowd annotation.
        seed: seeds the shuffling (shared by all processes) and every sample's random generator.
        rank, world_size: this process and the number of processes of distributed training.
        start_iter: the batches this process already trained on (a resumed run starts after them).
        on_bad_image: "error" stops at an unreadable image; "skip" logs it and takes the next record.
        timeout: seconds to wait for a batch from the workers before stopping with an error; 0 waits forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = dataset.records
    if filter_empty:
        records = [record for record in records if has_usable_annotation(record)]
        logger.info(
            "Data set %r: left out %d of %d images without a usable (non-crowd) annotation; %d remain",
            dataset.name, len(dataset.records) - len(records), len(dataset.records), len(records),
        )
    if not records:
        raise ValueError(f"data set {dataset.name!r} has no images to train on (filter_empty={filter_empty})")

    sampler = TrainingSampler(len(records), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    if aspect_ratio_grouping:
        batch_sampler = GroupedBatchSampler(
            sampler, group_ids=aspect_ratio_group_ids(records), batch_size=batch_size
        )
    else:
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=True)
    loader = _data_loader(
        MappedDataset(records=records, mapper=mapper, on_bad_image=on_bad_image),
        batch_sampler=SeededBatchSampler(batch_sampler, seed=seed, rank=rank, world_size=world_size, start=start_iter),
        num_workers=num_workers,
        seed=seed,
        rank=rank,
        timeout=timeout,
        persistent_workers=num_workers > 0,
    )
    return SkipReportingLoader(loader) if on_bad_image == "skip" else loader


def build_test_loader(
    dataset: DetectionDataset,
    *,
    mapper: Mapper,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    on_bad_image: str = "error",
    timeout: float = 0.0,
) -> Iterable[list[dict]]:
    """Batches of one mapped record, in data set order, over this process's contiguous shard (``on_bad_image`` and
    ``timeout`` as in :func:`build_train_loader`; skipped images are not evaluated)."""
    sampler = InferenceSampler(len(dataset.records), rank=rank, world_size=world_size)
    loader = _data_loader(
        MappedDataset(records=dataset.records, mapper=mapper, on_bad_image=on_bad_image),
        batch_sampler=BatchSampler(sampler, batch_size=1, drop_last=False),
        num_workers=num_workers,
        seed=0,
        rank=rank,
        timeout=timeout,
        persistent_workers=False,
    )
    return SkipReportingLoader(loader) if on_bad_image == "skip" else loader


class _WatchedWorkersIter(_MultiProcessingDataLoaderIter):
    """torch's multi-process iterator, waiting at most ``batch_timeout`` seconds for a batch while still checking
    every few seconds that no worker died (torch's own ``timeout`` makes it check only once the timeout is over)."""

    def __init__(self, loader: WatchedDataLoader) -> None:
        super().__init__(loader)
        self._batch_timeout = loader.batch_timeout

    def _get_data(self):
        start = time.monotonic()
        while True:
            success, data = self._try_get_data()  # raises when a worker has died
            if success:
                return data
            waited = time.monotonic() - start
            if self._batch_timeout > 0 and waited >= self._batch_timeout:
                raise RuntimeError(
                    f"No batch from the data-loading workers for {waited:.0f} s (DATALOADER.TIMEOUT="
                    f"{self._batch_timeout:g}): a worker is stuck. Stopping instead of waiting forever."
                )


class WatchedDataLoader(DataLoader):
    """A DataLoader whose workers must deliver a batch within ``batch_timeout`` seconds (0 = no limit)."""

    def __init__(self, *args, batch_timeout: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_timeout = batch_timeout

    def _get_iterator(self):
        return _WatchedWorkersIter(self) if self.num_workers > 0 else super()._get_iterator()


def _data_loader(
    dataset: Dataset, *, batch_sampler, num_workers: int, seed: int, rank: int, timeout: float, persistent_workers: bool
) -> DataLoader:
    """A DataLoader whose workers come from the fork server and whose own random draws (the workers' base seed)
    use a private generator, leaving the global torch random state to the model. Workers import the main script
    again: one started from its unguarded top level is refused (`utils.main_guard`)."""
    check_main_guard(num_workers)
    return WatchedDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_as_list,
        worker_init_fn=functools.partial(_init_worker, seed=seed, rank=rank, main_pid=os.getpid()),
        multiprocessing_context=_worker_context() if num_workers > 0 else None,
        persistent_workers=persistent_workers,
        generator=torch.Generator().manual_seed(seed),
        batch_timeout=timeout,
    )


def _worker_context() -> multiprocessing.context.BaseContext:
    """The fork server where the platform has one (Linux, macOS), else spawn (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([name for name in _WORKER_PRELOAD if name in sys.modules])
    return context


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _init_worker(worker_id: int, *, seed: int, rank: int, main_pid: int) -> None:
    """Seed python, numpy and torch from (seed, rank, worker id) for any randomness outside the per-sample
    generators; keep OpenCV single-threaded per worker (safe here: the worker did not inherit a thread pool); end
    the worker when the main process is gone (`exit_when_gone`).

    SIGTERM from any process but the main one is ignored (`stop_only_for`): a scheduler's preemption signals every
    process of the job, and the training process defers it to the end of its step (`engine.trainer`), which may need
    this worker's next batches. The main process's own SIGTERM (the loader's shutdown) ends the worker as usual."""
    worker_seed = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    cv2.setNumThreads(1)
    stop_only_for(main_pid)
    exit_when_gone(main_pid)


def stop_only_for(pid: int) -> threading.Thread | None:
    """Makes SIGTERM end this process only when process `pid` sent it: SIGTERM is blocked in every thread, and a
    daemon thread waits for it (`sigwaitinfo`, which says who sent it), ending the process for `pid`'s and ignoring
    the others'. Call it before any other thread starts (they inherit the blocked signal). Returns the thread, or
    None where `sigwaitinfo` does not exist (not Linux): SIGTERM then keeps its default action."""
    if not hasattr(signal, "sigwaitinfo"):
        return None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == pid:
                os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=wait, name=f"sigterm-from-{pid}", daemon=True)
    thread.start()
    return thread


def exit_when_gone(pid: int, *, poll_s: float = 1.0) -> threading.Thread:
    """Starts a daemon thread that ends this process (`os._exit(1)`) as soon as process `pid` has ended, however it
    ended (SIGKILL included).

    A worker's parent is the fork server, not the main process, so torch's own check (is my parent alive?) never
    fires when the main process is killed; and the worker holds a copy of the fork server's lifeline pipe, so the
    fork server does not exit either: without this, a killed training left the fork server, its worker and
    multiprocessing's resource tracker running for good (about 1.2 GB). Waits on a pidfd (Linux 5.3+: readable once
    the process has exited, even before it is reaped); elsewhere polls every `poll_s` seconds until the pid is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd_open here (not Linux, or an older kernel)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _process_exists(pid):
                time.sleep(poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"exit-when-{pid}-is-gone", daemon=True)
    thread.start()
    return thread


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
