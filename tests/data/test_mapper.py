"""Tests of DatasetMapper: decoding errors, shortest-edge resize, flip, and the boxes that follow."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detectron_res.data.mapper import DatasetMapper, read_image_rgb, resize_shortest_edge_shape


def test_resize_shortest_edge_shape() -> None:
    assert resize_shortest_edge_shape(480, 640, short_side=600, max_size=1000) == (600, 800)
    assert resize_shortest_edge_shape(480, 640, short_side=600, max_size=700) == (525, 700)
    assert resize_shortest_edge_shape(640, 480, short_side=600, max_size=1000) == (800, 600)
    assert resize_shortest_edge_shape(333, 500, short_side=600, max_size=1000) == (600, 901)  # 900.9 rounds up
    assert resize_shortest_edge_shape(100, 100, short_side=64, max_size=1000) == (64, 64)


@pytest.fixture
def landscape(tmp_path: Path) -> dict:
    """A 480x640 PNG: left half red, right half blue (RGB), with three boxes, one of them crowd."""
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[:, :320] = (255, 0, 0)
    image[:, 320:] = (0, 0, 255)
    path = tmp_path / "landscape.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return {
        "file_name": str(path),
        "image_id": 7,
        "height": 480,
        "width": 640,
        "annotations": [
            {"bbox": [10.0, 20.0, 110.0, 220.0], "category_id": 3, "iscrowd": 0},
            {"bbox": [0.0, 0.0, 640.0, 480.0], "category_id": 1, "iscrowd": 1},
            {"bbox": [400.0, 100.0, 640.0, 480.0], "category_id": 0, "iscrowd": 0},
        ],
    }


def test_inference_resize_keeps_boxes_in_step(landscape: dict) -> None:
    mapper = DatasetMapper(min_size=[600, 300], max_size=1000, hflip_prob=1.0, is_train=False)
    output = mapper(landscape)
    image = output["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 600, 800) and image.is_contiguous()
    assert (output["height"], output["width"], output["image_id"]) == (480, 640, 7)
    assert output["file_name"] == landscape["file_name"]
    assert image[:, 300, 10].tolist() == [255, 0, 0]  # never flipped at inference
    assert output["gt_boxes"].dtype == torch.float32 and output["gt_classes"].dtype == torch.int64
    torch.testing.assert_close(
        output["gt_boxes"], torch.tensor([[12.5, 25.0, 137.5, 275.0], [500.0, 125.0, 800.0, 600.0]])
    )
    assert output["gt_classes"].tolist() == [3, 0]  # the crowd box is not a target


def test_training_flip_moves_image_and_boxes(landscape: dict) -> None:
    mapper = DatasetMapper(min_size=[480], max_size=1000, hflip_prob=1.0, is_train=True)
    output = mapper(landscape)
    assert output["image"].shape == (3, 480, 640)
    assert output["image"][:, 240, 10].tolist() == [0, 0, 255]
    assert output["image"][:, 240, 630].tolist() == [255, 0, 0]
    # x1' = w - x2, x2' = w - x1
    torch.testing.assert_close(
        output["gt_boxes"], torch.tensor([[530.0, 20.0, 630.0, 220.0], [0.0, 100.0, 240.0, 480.0]])
    )


def test_training_draws_the_short_side_from_the_list(landscape: dict) -> None:
    mapper = DatasetMapper(min_size=[240, 480], max_size=1000, hflip_prob=0.5, is_train=True)
    np.random.seed(3)
    results = [mapper(landscape) for _ in range(12)]
    shapes = {tuple(result["image"].shape) for result in results}
    assert shapes == {(3, 240, 320), (3, 480, 640)}
    flipped = [result["image"][0, 10, 1].item() == 0 for result in results]  # red pixel gone: flipped
    assert 0 < sum(flipped) < 12
    np.random.seed(3)
    assert [tuple(mapper(landscape)["image"].shape) for _ in range(12)] == [tuple(r["image"].shape) for r in results]


def test_crowd_only_empty_and_collapsing_boxes(landscape: dict) -> None:
    record = {
        **landscape,
        "annotations": [
            {"bbox": [5.0, 5.0, 5.000001, 50.0], "category_id": 2, "iscrowd": 0},  # collapses when resized
            {"bbox": [700.0, 5.0, 800.0, 50.0], "category_id": 2, "iscrowd": 0},  # outside the image
            {"bbox": [0.0, 0.0, 64.0, 48.0], "category_id": 1, "iscrowd": 1},
        ],
    }
    mapper = DatasetMapper(min_size=48, max_size=1000, is_train=False)
    output = mapper(record)
    assert output["image"].shape == (3, 48, 64)
    assert output["gt_boxes"].shape == (0, 4) and output["gt_classes"].shape == (0,)

    without = {key: value for key, value in landscape.items() if key != "annotations"}
    assert "gt_boxes" not in mapper(without) and "gt_classes" not in mapper(without)


def test_missing_corrupt_and_wrong_size_images(tmp_path: Path, landscape: dict) -> None:
    mapper = DatasetMapper(min_size=[600], max_size=1000, is_train=False)
    missing = str(tmp_path / "nowhere.jpg")
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        mapper({**landscape, "file_name": missing})

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00\x01 this is not a jpeg" * 10)
    with pytest.raises(ValueError, match="corrupt or unsupported image: .*garbage.jpg"):
        mapper({**landscape, "file_name": str(garbage)})

    with pytest.raises(ValueError, match=r"landscape.png: decoded image is 480x640 .* says 640x480"):
        mapper({**landscape, "height": 640, "width": 480})


def test_read_image_rgb_channel_order(landscape: dict) -> None:
    image = read_image_rgb(landscape["file_name"])
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0] and image[0, 639].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_size": [], "max_size": 1000}, "min_size"),
        ({"min_size": [0], "max_size": 1000}, "min_size"),
        ({"min_size": [600], "max_size": 0}, "max_size"),
        ({"min_size": [600], "max_size": 1000, "hflip_prob": 1.5}, "hflip_prob"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatasetMapper(is_train=True, **kwargs)
