"""Tests of DatasetMapper: decoding errors, shortest-edge resize, flip, and the boxes that follow."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detectron_res.data.mapper import (
    BadImageError,
    DatasetMapper,
    jpeg_is_truncated,
    read_image_rgb,
    resize_shortest_edge_shape,
)


def test_resize_shortest_edge_shape() -> None:
    assert resize_shortest_edge_shape(480, 640, short_side=600, max_size=1000) == (600, 800)
    assert resize_shortest_edge_shape(480, 640, short_side=600, max_size=700) == (525, 700)
    assert resize_shortest_edge_shape(640, 480, short_side=600, max_size=1000) == (800, 600)
    assert resize_shortest_edge_shape(333, 500, short_side=600, max_size=1000) == (600, 901)  # 900.9 rounds up
    assert resize_shortest_edge_shape(100, 100, short_side=64, max_size=1000) == (64, 64)
    # extreme aspect ratios: 4 * 1000/6000 = 0.67 and 3 * 1000/6000 = 0.5 px round to 1 and 0; both sides stay >= 1
    assert resize_shortest_edge_shape(4, 6000, short_side=600, max_size=1000) == (1, 1000)
    assert resize_shortest_edge_shape(6000, 3, short_side=600, max_size=1000) == (1000, 1)
    assert resize_shortest_edge_shape(6000, 2, short_side=600, max_size=1000) == (1000, 1)
    assert resize_shortest_edge_shape(4, 6000, short_side=128, max_size=213) == (1, 213)  # 0.14 px before the clamp


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

    with pytest.raises(BadImageError, match=r"landscape.png: decoded image is 480x640 .* says 640x480"):
        mapper({**landscape, "height": 640, "width": 480})

    with pytest.raises(IsADirectoryError, match="expected an image file, got a folder"):
        mapper({**landscape, "file_name": str(tmp_path)})


def jpeg_bytes(*, progressive: bool = False, exif_thumbnail: bool = False) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    stream = io.BytesIO()
    extra = {}
    if exif_thumbnail:  # an APP1 segment carrying a whole small JPEG, with its own end-of-image marker
        thumbnail = io.BytesIO()
        image.resize((16, 12)).save(thumbnail, format="JPEG")
        payload = b"Exif\x00\x00" + thumbnail.getvalue()
        extra["extra"] = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    image.save(stream, format="JPEG", quality=90, progressive=progressive)
    data = stream.getvalue()
    if exif_thumbnail:  # insert the APP1 segment right after the start-of-image marker
        data = data[:2] + extra["extra"] + data[2:]
    return data


@pytest.mark.parametrize("kind", ["baseline", "progressive", "exif_thumbnail"])
def test_a_truncated_jpeg_is_detected_and_a_complete_one_is_not(tmp_path: Path, kind: str) -> None:
    data = jpeg_bytes(progressive=kind == "progressive", exif_thumbnail=kind == "exif_thumbnail")
    assert data[-2:] == b"\xff\xd9" and not jpeg_is_truncated(data)
    assert not jpeg_is_truncated(data + b"trailing bytes some cameras append")
    for cut in (len(data) - 2, len(data) * 2 // 3, len(data) // 3, 40):
        assert jpeg_is_truncated(data[:cut]), cut
    assert not jpeg_is_truncated(b"\x89PNG\r\n\x1a\n")  # not a JPEG: left to the decoder

    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert read_image_rgb(tmp_path / "whole.jpg").shape == (64, 96, 3)
    # OpenCV alone would return a (64, 96, 3) image with the missing part grey
    assert cv2.imread(str(tmp_path / "cut.jpg")).shape == (64, 96, 3)
    with pytest.raises(BadImageError, match=r"truncated JPEG .*cut\.jpg"):
        read_image_rgb(tmp_path / "cut.jpg")


def test_map_image_refuses_empty_and_grayscale_arrays() -> None:
    mapper = DatasetMapper(min_size=[64], max_size=100, is_train=False)
    with pytest.raises(ValueError, match=r"the image is empty: 0x0 \(HxW\)"):
        mapper.map_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"the image is empty: 0x5"):
        mapper.map_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(4, 5\) and dtype uint8 \(a grayscale image\?"):
        mapper.map_image(np.zeros((4, 5), np.uint8))


def test_training_draws_come_from_the_generator_passed_in(landscape: dict) -> None:
    mapper = DatasetMapper(min_size=[100, 200, 300], max_size=1000, hflip_prob=0.5, is_train=True)
    rng = np.random.default_rng(11)
    expected_size = [100, 200, 300][rng.integers(3)]
    expected_flip = rng.random() < 0.5
    out = mapper(landscape, rng=np.random.default_rng(11))
    assert min(out["image"].shape[1:]) == expected_size
    left_is_red = out["image"][0, 0, 0].item() == 255
    assert left_is_red != expected_flip


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


def test_multi_scale_inputs_carry_the_image_at_each_test_scale(landscape: dict) -> None:
    """480 x 640 at test size 300 (cap 500): 300 x 400. Scales 150 / 300 / 450 with caps 250 / 500 / 750 give
    150 x 200, the input itself, and 450 x 600."""
    mapper = DatasetMapper(min_size=300, max_size=500, is_train=False, test_scales=[150, 300, 450])
    out = mapper(landscape)
    assert out["image"].shape == (3, 300, 400)
    assert [tuple(im.shape) for im in out["pyramid"]] == [(3, 150, 200), (3, 300, 400), (3, 450, 600)]
    assert out["pyramid"][1] is out["image"]
    assert out["pyramid"][2][:, 0, 0].tolist() == [255, 0, 0] and out["pyramid"][0][:, -1, -1].tolist() == [0, 0, 255]
    capped = DatasetMapper(min_size=300, max_size=350, is_train=False, test_scales=[600])(landscape)
    assert capped["image"].shape == (3, 263, 350) and capped["pyramid"][0].shape == (3, 525, 700)  # cap 700
    image = np.zeros((480, 640, 3), np.uint8)
    assert [tuple(im.shape) for im in mapper.map_image(image)["pyramid"]] == [(3, 150, 200), (3, 300, 400), (3, 450, 600)]
    assert "pyramid" not in DatasetMapper(min_size=300, max_size=500, is_train=False)(landscape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"is_train": True, "test_scales": [300]}, "for inference"),
        ({"is_train": False, "test_scales": [300, 0]}, r"positive ints, got \[300, 0\]"),
    ],
)
def test_bad_test_scales(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatasetMapper(min_size=[300], max_size=500, **kwargs)
