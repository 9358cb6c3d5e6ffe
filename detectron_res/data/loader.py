"""Training and inference data loaders: records -> mapper -> batches (lists of dicts), one process's share."""

from __future__ import annotations

import functools
import logging
import pickle
import random
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from .datasets.base import DetectionDataset
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids

logger = logging.getLogger(__name__)

Mapper = Callable[[dict], dict]


class SerializedRecords(Sequence):
    """The records pickled into one numpy byte buffer.

    Worker processes forked from the main one then share a single buffer instead of touching (and so
    copying, through reference counts) millions of small Python objects.
    """

    def __init__(self, records: Sequence[dict]) -> None:
        blobs = [
            np.frombuffer(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for record in records
        ]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        index %= len(self)
        begin = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[begin : int(self._ends[index])]))


class MappedDataset(Dataset):
    """Map-style data set: item ``i`` is ``mapper(records[i])``."""

    def __init__(self, *, records: Sequence[dict], mapper: Mapper) -> None:
        self.records = SerializedRecords(records)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.records[index])


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
) -> DataLoader:
    """An infinite iterable of training batches for process ``rank``: lists of ``batch_size`` mapped records.

    Args:
        dataset: the training data set (concatenate several beforehand).
        mapper: turns a record into the model's input dict (e.g. ``DatasetMapper(is_train=True)``).
        batch_size: images per batch in this process.
        num_workers: loading processes; 0 loads in the main process (the mapper's randomness then comes
            from the main process's numpy state).
        aspect_ratio_grouping: batch landscape images together and portrait images together.
        filter_empty: leave out records with no non-crowd annotation.
        seed: seeds the shuffling (shared by all processes) and each worker's random state.
        rank, world_size: this process and the number of processes of distributed training.
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
    return DataLoader(
        MappedDataset(records=records, mapper=mapper),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_as_list,
        worker_init_fn=functools.partial(_init_worker, seed=seed, rank=rank),
        persistent_workers=num_workers > 0,
    )


def build_test_loader(
    dataset: DetectionDataset,
    *,
    mapper: Mapper,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Batches of one mapped record, in data set order, over this process's contiguous shard."""
    sampler = InferenceSampler(len(dataset.records), rank=rank, world_size=world_size)
    return DataLoader(
        MappedDataset(records=dataset.records, mapper=mapper),
        batch_sampler=BatchSampler(sampler, batch_size=1, drop_last=False),
        num_workers=num_workers,
        collate_fn=_as_list,
        worker_init_fn=functools.partial(_init_worker, seed=0, rank=rank),
    )


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _init_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, rank, worker id); keep OpenCV single-threaded per worker."""
    worker_seed = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    cv2.setNumThreads(1)
