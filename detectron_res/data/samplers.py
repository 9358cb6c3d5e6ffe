"""Index samplers for training (infinite, sharded by rank) and inference (contiguous shards), and batching."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TrainingSampler(Sampler[int]):
    """Infinite stream of data set indices for one process.

    All processes draw the same sequence of permutations of ``range(size)`` (one per epoch, from ``seed``);
    process ``rank`` takes every ``world_size``-th index of that shared stream, so within an epoch the
    processes see disjoint indices.
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"TrainingSampler needs a data set with at least one image, got size={size}")
        _check_rank(rank, world_size)
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._shared_stream(), self.rank, None, self.world_size)

    def _shared_stream(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=generator).tolist()
            else:
                yield from range(self.size)


class InferenceSampler(Sampler[int]):
    """Each index of ``range(size)`` exactly once over all processes, process ``rank`` a contiguous shard."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if size < 0:
            raise ValueError(f"InferenceSampler needs size >= 0, got {size}")
        _check_rank(rank, world_size)
        per_rank, remainder = divmod(size, world_size)
        self.begin = rank * per_rank + min(rank, remainder)
        self.end = self.begin + per_rank + (1 if rank < remainder else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def aspect_ratio_group_ids(records: Sequence[dict]) -> list[int]:
    """Group id per record: 0 for landscape or square images (width >= height), 1 for portrait."""
    return [0 if record["width"] >= record["height"] else 1 for record in records]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices drawn from ``sampler`` whose group ids are all equal.

    Indices wait in a buffer per group until that group has a full batch; whatever remains when a finite
    ``sampler`` ends is dropped.
    """

    def __init__(self, sampler: Iterable[int], *, group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for index in self.sampler:
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer[:]
                buffer.clear()
