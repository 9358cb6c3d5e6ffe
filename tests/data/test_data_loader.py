"""Tests of the training and inference data loaders (filtering, grouping, sharding, per-sample seeds, resuming,
bad images, stuck and dead workers)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time

import cv2
import numpy as np
import pytest

from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.data.loader import SerializedRecords, build_test_loader, build_train_loader
from detectron_res.data.mapper import BadImageError, read_image_rgb


def describe(record: dict, *, rng: np.random.Generator | None = None) -> dict:
    """A stand-in mapper: what was loaded, plus one draw of the sample's generator (training only)."""
    draw = rng.random() if rng is not None else None
    return {"image_id": record["image_id"], "portrait": record["height"] > record["width"], "draw": draw}


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


def draws(*, seed: int, num_workers: int, start_iter: int = 0, count: int = 3) -> list[tuple[int, float]]:
    loader = build_train_loader(
        make_dataset(), mapper=describe, batch_size=2, num_workers=num_workers, aspect_ratio_grouping=True,
        filter_empty=False, seed=seed, start_iter=start_iter,
    )
    return [(item["image_id"], item["draw"]) for batch in first_batches(loader, count) for item in batch]


def test_train_samples_draw_from_their_own_seed_whatever_the_worker() -> None:
    first = draws(seed=1, num_workers=0, count=6)
    assert draws(seed=1, num_workers=2, count=6) == first  # the same draws whichever process mapped a sample
    assert draws(seed=2, num_workers=0, count=6) != first
    # a sample's generator is seeded from (seed, batch number) and its place in the batch: the second of batch 1
    sample_seed = np.random.SeedSequence([1, 1]).generate_state(2)[1]
    assert first[3][1] == np.random.default_rng(int(sample_seed)).random()


def test_two_processes_of_one_image_draw_the_samples_of_one_process_of_two() -> None:
    def samples(rank: int, world_size: int) -> list[list[tuple[int, float]]]:
        loader = build_train_loader(
            make_dataset(), mapper=describe, batch_size=2 // world_size, num_workers=0, aspect_ratio_grouping=False,
            filter_empty=False, seed=4, rank=rank, world_size=world_size, start_iter=1,
        )
        return [[(item["image_id"], item["draw"]) for item in batch] for batch in first_batches(loader, 5)]

    alone = samples(0, 1)
    rank0, rank1 = samples(0, 2), samples(1, 2)
    assert [a + b for a, b in zip(rank0, rank1)] == alone  # the same images and augmentations, step by step
    images = [image for batch in alone for image, _ in batch]
    assert len(set(images)) == 10  # batches 1-5 of the first epoch of 12 images: no image twice


def test_train_loader_resumes_at_a_batch_number_with_the_same_samples_and_draws() -> None:
    whole = draws(seed=3, num_workers=0, count=10)
    # batch 4 onwards, replayed through the aspect-ratio grouping buffers: the same images and the same draws
    assert draws(seed=3, num_workers=1, start_iter=4, count=6) == whole[8:]


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


def read_images(record: dict, *, rng: np.random.Generator | None = None) -> dict:
    """A mapper that decodes the record's image file (raising for bad ones) and uses OpenCV's thread pool."""
    image = read_image_rgb(record["file_name"])
    cv2.GaussianBlur(cv2.resize(image, (400, 400)), (9, 9), 0)
    return {"image_id": record["image_id"]}


def image_dataset(tmp_path, bad: dict[int, bytes]) -> DetectionDataset:
    """6 JPEG records; those in `bad` get the given file content instead (b"" = the file is missing)."""
    _, good = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    records = []
    for index in range(6):
        path = tmp_path / f"{index}.jpg"
        content = bad.get(index, good.tobytes())
        if content:
            path.write_bytes(content)
        records.append({"file_name": str(path), "image_id": index, "height": 40, "width": 60,
                        "annotations": [{"bbox": [0.0, 0.0, 5.0, 5.0], "category_id": 0}]})
    return DetectionDataset(name="jpegs", records=records, class_names=["a"], category_ids=[1])


def truncated_jpeg() -> bytes:
    _, data = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    return data.tobytes()[: len(data) // 2]


def test_bad_images_stop_the_run_naming_the_file_by_default(tmp_path) -> None:
    dataset = image_dataset(tmp_path, {2: truncated_jpeg()})
    loader = build_test_loader(dataset, mapper=read_images, num_workers=0)
    with pytest.raises(BadImageError, match=r"truncated JPEG.*2\.jpg"):
        list(loader)


def test_skipped_bad_images_are_counted_replaced_in_training_and_not_evaluated(tmp_path, caplog) -> None:
    dataset = image_dataset(tmp_path, {2: truncated_jpeg(), 3: b"", 4: b"not an image"})
    with caplog.at_level(logging.WARNING, logger="detectron_res.data.loader"):
        evaluated = [batch[0]["image_id"] for batch in build_test_loader(dataset, mapper=read_images, num_workers=1, on_bad_image="skip")]
    assert evaluated == [0, 1, 5]
    assert "(3 so far)" in caplog.text and "image file not found" in caplog.text and "corrupt or unsupported" in caplog.text

    caplog.clear()
    loader = build_train_loader(
        dataset, mapper=read_images, batch_size=6, num_workers=0, aspect_ratio_grouping=False, filter_empty=False,
        seed=0, on_bad_image="skip",
    )
    (batch,) = first_batches(loader, 1)
    # each bad image is replaced by the next readable record: 2, 3 and 4 all become 5
    assert sorted(item["image_id"] for item in batch) == [0, 1, 5, 5, 5, 5]
    assert all("skipped_bad_images" not in item for item in batch)
    assert "Skipped an unreadable image (6 so far)" in caplog.text  # 2 -> 3 -> 4 -> 5 is three skips, 3 -> 4 -> 5 two, 4 -> 5 one


def sleep_on_image_1(record: dict, *, rng: np.random.Generator | None = None) -> dict:
    if record["image_id"] == 1:
        time.sleep(60)
    return {"image_id": record["image_id"]}


def exit_on_image_1(record: dict, *, rng: np.random.Generator | None = None) -> dict:
    if record["image_id"] == 1:
        os._exit(3)
    return {"image_id": record["image_id"]}


def sigterm_self_on_image_1(record: dict, *, rng: np.random.Generator | None = None) -> dict:
    if record["image_id"] == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's preemption signals every process of the job
    return {"image_id": record["image_id"]}


def test_a_worker_outlives_sigterm_so_that_the_training_step_it_feeds_can_finish() -> None:
    """A SIGTERM to the whole job reaches the workers too; the main process defers it to the end of its step
    (engine.trainer), which may need the workers' next batches, so they ignore it and end with the main process."""
    loader = build_test_loader(make_dataset(3), mapper=sigterm_self_on_image_1, num_workers=1, timeout=60)
    assert [batch[0]["image_id"] for batch in loader] == [0, 1, 2]


def test_a_stuck_worker_ends_the_run_with_an_error_after_the_timeout() -> None:
    loader = build_test_loader(make_dataset(3), mapper=sleep_on_image_1, num_workers=1, timeout=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"No batch from the data-loading workers for \d+ s \(DATALOADER.TIMEOUT=2\)"):
        list(loader)
    assert time.monotonic() - start < 30


def test_a_dead_worker_ends_the_run_with_an_error_at_once() -> None:
    loader = build_test_loader(make_dataset(3), mapper=exit_on_image_1, num_workers=1, timeout=600)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(loader)
    assert time.monotonic() - start < 30  # torch checks the workers every 5 s, not after the 600 s timeout


def test_workers_start_after_opencv_ran_threads_in_this_process(tmp_path) -> None:
    """A forked worker used to block forever in cv2.setNumThreads once OpenCV's pool had run in the parent."""
    cv2.setNumThreads(2)
    big = np.zeros((1500, 1500, 3), np.float32)
    cv2.GaussianBlur(cv2.resize(big, (1200, 1200)), (15, 15), 0)
    loader = build_test_loader(image_dataset(tmp_path, {}), mapper=read_images, num_workers=2, timeout=60)
    assert [batch[0]["image_id"] for batch in loader] == list(range(6))
