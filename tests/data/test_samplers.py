"""Tests of the training, inference and grouped batch samplers."""

from __future__ import annotations

import itertools

import pytest

from detectron_res.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    aspect_ratio_group_ids,
)


def take(iterable, count: int) -> list:
    return list(itertools.islice(iterable, count))


def test_training_sampler_ranks_split_each_epoch() -> None:
    size = 10
    shared = take(TrainingSampler(size, seed=4), 3 * size)
    for epoch in range(3):
        assert sorted(shared[epoch * size : (epoch + 1) * size]) == list(range(size))
    assert shared[:size] != shared[size : 2 * size]  # a new permutation per epoch

    rank0 = take(TrainingSampler(size, seed=4, rank=0, world_size=2), size)
    rank1 = take(TrainingSampler(size, seed=4, rank=1, world_size=2), size)
    assert rank0 == shared[0 : 2 * size : 2] and rank1 == shared[1 : 2 * size : 2]
    assert set(rank0[:5]).isdisjoint(rank1[:5])
    assert sorted(rank0[:5] + rank1[:5]) == list(range(size))


def test_training_sampler_is_deterministic_in_the_seed() -> None:
    assert take(TrainingSampler(50, seed=1), 100) == take(TrainingSampler(50, seed=1), 100)
    assert take(TrainingSampler(50, seed=1), 100) != take(TrainingSampler(50, seed=2), 100)
    assert take(TrainingSampler(5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]
    assert take(TrainingSampler(5, shuffle=False, rank=1, world_size=2), 4) == [1, 3, 0, 2]


def test_training_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        TrainingSampler(0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        TrainingSampler(5, rank=2, world_size=2)


def test_inference_sampler_contiguous_shards() -> None:
    shards = [list(InferenceSampler(10, rank=rank, world_size=3)) for rank in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(InferenceSampler(10, rank=rank, world_size=3)) for rank in range(3)] == [4, 3, 3]
    assert [list(InferenceSampler(2, rank=rank, world_size=3)) for rank in range(3)] == [[0], [1], []]
    assert list(InferenceSampler(4)) == [0, 1, 2, 3]


def test_aspect_ratio_group_ids() -> None:
    records = [{"width": 640, "height": 480}, {"width": 480, "height": 640}, {"width": 100, "height": 100}]
    assert aspect_ratio_group_ids(records) == [0, 1, 0]


def test_grouped_batches_hold_one_group() -> None:
    group_ids = [0, 1, 0, 1, 1, 0, 0, 1, 0, 0]
    batches = list(GroupedBatchSampler(range(10), group_ids=group_ids, batch_size=2))
    assert batches == [[0, 2], [1, 3], [5, 6], [4, 7], [8, 9]]

    stream = TrainingSampler(len(group_ids), seed=0)
    infinite = take(GroupedBatchSampler(stream, group_ids=group_ids, batch_size=3), 40)
    assert all(len(batch) == 3 and len({group_ids[index] for index in batch}) == 1 for batch in infinite)
    assert {group_ids[batch[0]] for batch in infinite} == {0, 1}
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(range(3), group_ids=[0, 0, 0], batch_size=0)
