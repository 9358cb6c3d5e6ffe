"""Tests of the training and inference data loaders (filtering, grouping, sharding, worker seeding)."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.data.loader import SerializedRecords, build_test_loader, build_train_loader


def describe(record: dict) -> dict:
    """A stand-in mapper: what was loaded, plus one draw of numpy's global random state."""
    return {"image_id": record["image_id"], "portrait": record["height"] > record["width"], "draw": np.random.random()}


def make_dataset(count: int = 12) -> DetectionDataset:
    records = []
    for index in range(count):
        annotations = [{"bbox": [0.0, 0.0, 5.0, 5.0], "category_id": 0, "iscrowd": int(index % 4 == 1)}]
        if index % 4 == 3:
            annotations = []
        height, width = (60, 40) if index % 3 == 0 else (40, 60)
        records.append(
            {"file_name": f"{index}.png", "image_id": index, "height": height, "width": width,
             "annotations": annotations}
        )
    return DetectionDataset(name="fake", records=records, class_names=["a"], category_ids=[1])


def first_batches(loader, count: int) -> list[list[dict]]:
    return list(itertools.islice(loader, count))


def test_serialized_records_round_trip() -> None:
    records = make_dataset(5).records
    serialized = SerializedRecords(records)
    assert len(serialized) == 5
    assert [serialized[index] for index in range(5)] == records
    assert serialized[-1] == records[-1]
    with pytest.raises(IndexError, match="record index 5"):
        serialized[5]


def test_train_loader_filters_empty_and_groups(caplog: pytest.LogCaptureFixture) -> None:
    dataset = make_dataset()
    with caplog.at_level(logging.INFO, logger="detectron_res.data.loader"):
        loader = build_train_loader(
            dataset, mapper=describe, batch_size=2, num_workers=0, aspect_ratio_grouping=True, filter_empty=True, seed=0
        )
    assert "left out 6 of 12 images" in caplog.text  # 1, 5, 9 crowd only; 3, 7, 11 without annotations
    batches = first_batches(loader, 30)
    ids = {item["image_id"] for batch in batches for item in batch}
    assert ids == {0, 2, 4, 6, 8, 10}
    assert all(len(batch) == 2 and batch[0]["portrait"] == batch[1]["portrait"] for batch in batches)


def test_train_loader_plain_batching_and_seed() -> None:
    def ids(seed: int) -> list[list[int]]:
        loader = build_train_loader(
            make_dataset(), mapper=describe, batch_size=3, num_workers=0, aspect_ratio_grouping=False,
            filter_empty=False, seed=seed,
        )
        return [[item["image_id"] for item in batch] for batch in first_batches(loader, 8)]

    first = ids(seed=5)
    assert all(len(batch) == 3 for batch in first)
    assert sorted(first[0] + first[1] + first[2] + first[3]) == list(range(12))  # one epoch
    assert ids(seed=5) == first and ids(seed=6) != first


def test_train_loader_workers_are_seeded() -> None:
    def draws(seed: int) -> list[float]:
        loader = build_train_loader(
            make_dataset(), mapper=describe, batch_size=2, num_workers=1, aspect_ratio_grouping=False,
            filter_empty=False, seed=seed,
        )
        return [item["draw"] for batch in first_batches(loader, 3) for item in batch]

    first = draws(seed=1)
    assert draws(seed=1) == first
    assert draws(seed=2) != first


def test_train_loader_needs_images() -> None:
    dataset = DetectionDataset(name="empty", records=make_dataset(4).records[3:], class_names=["a"], category_ids=[1])
    with pytest.raises(ValueError, match="'empty' has no images to train on"):
        build_train_loader(
            dataset, mapper=describe, batch_size=1, num_workers=0, aspect_ratio_grouping=True, filter_empty=True, seed=0
        )


def test_test_loader_in_order_and_sharded() -> None:
    dataset = make_dataset(5)
    whole = [batch for batch in build_test_loader(dataset, mapper=describe, num_workers=0)]
    assert [len(batch) for batch in whole] == [1] * 5
    assert [batch[0]["image_id"] for batch in whole] == [0, 1, 2, 3, 4]
    shard = build_test_loader(dataset, mapper=describe, num_workers=0, rank=1, world_size=2)
    assert [batch[0]["image_id"] for batch in shard] == [3, 4]
