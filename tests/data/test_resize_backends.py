"""INPUT.RESIZE_BACKEND: "pil" gives detectron2's pixels (PIL bilinear on the uint8 image) and boxes, "opencv" stays
what it was; the key is validated and the d2 configs use "pil".

The detectron2 values below were recorded from detectron2 itself (commit 02b5c4e2, CPU, PIL 13.0.0) with
``T.ResizeShortestEdge([size, size], max_size).get_transform(image).apply_image(image)`` (what ``DefaultPredictor``
does) and, for the boxes, ``T.AugmentationList([T.ResizeShortestEdge([77, 77], 1000), T.RandomFlip(prob=1.0)])``
followed by ``detection_utils.transform_instance_annotations`` and ``annotations_to_instances`` (its data loader), on
the image of `_image`; detectron2 is not needed to run these tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron_res.config import ConfigError, load_config
from detectron_res.data.build import build_test_mapper
from detectron_res.data.mapper import RESIZE_BACKENDS, DatasetMapper, read_image_rgb, resize_image

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _image() -> np.ndarray:
    """A 97x131 RGB image with smooth ramps and a pattern, so that bilinear, nearest and antialiased resizes differ."""
    y, x, c = np.mgrid[0:97, 0:131, 0:3]
    return ((x * 7 + y * 13 + c * 29 + (x * y) % 17 * 5) % 256).astype(np.uint8)


def _pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """What detectron2's ResizeTransform.apply_image does to a uint8 image."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _sha256(array: np.ndarray | torch.Tensor) -> str:
    array = array.numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


@pytest.fixture
def record(tmp_path: Path) -> dict:
    """`_image` as a PNG data set record with two boxes, one of them crossing the right border."""
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), cv2.cvtColor(_image(), cv2.COLOR_RGB2BGR))
    return {
        "file_name": str(path),
        "image_id": 1,
        "height": 97,
        "width": 131,
        "annotations": [
            {"bbox": [3.3, 4.7, 50.1, 90.2], "category_id": 0, "iscrowd": 0},
            {"bbox": [100.0, 0.0, 140.0, 10.0], "category_id": 1, "iscrowd": 0},
        ],
    }


# detectron2's ResizeShortestEdge output (first 16 hex digits of the sha256 of the HWC bytes) and two pixels
D2_RESIZED = {
    (150, 1000): ((150, 203), "17dd4f3704058e3e", [213, 222, 64], [120, 149, 178]),
    (60, 1000): ((60, 81), "a1a672cc0a15205f", [185, 214, 229], [138, 167, 196]),
    (301, 1000): ((301, 407), "ddae6a58ada5171f", [93, 122, 151], [120, 149, 178]),
    (800, 1333): ((800, 1080), "b7ea2fe6df749801", [32, 61, 90], [120, 149, 178]),
}


@pytest.mark.parametrize("size", sorted(D2_RESIZED))
def test_pil_backend_gives_detectron2s_recorded_pixels(size: tuple[int, int]) -> None:
    shape, digest, pixel, corner = D2_RESIZED[size]
    mapper = DatasetMapper(min_size=size[0], max_size=size[1], is_train=False, resize_backend="pil")
    image = _hwc(mapper.map_image(_image())["image"])
    assert image.shape == (*shape, 3)
    assert image[10, 20].tolist() == pixel and image[-1, -1].tolist() == corner
    assert _sha256(image)[:16] == digest


def test_pil_backend_equals_pil_bilinear_on_every_path(record: dict) -> None:
    image = _image()
    mapper = DatasetMapper(min_size=150, max_size=1000, is_train=False, test_scales=(60, 150, 301),
                           resize_backend="pil")
    for output in (mapper.map_image(image), mapper(record)):
        assert output["image"].dtype == torch.uint8 and output["image"].is_contiguous()
        np.testing.assert_array_equal(_hwc(output["image"]), _pil(image, 150, 203))
        sizes = [(60, 81), (150, 203), (301, 407)]
        assert [tuple(level.shape) for level in output["pyramid"]] == [(3, *size) for size in sizes]
        for level, size in zip(output["pyramid"], sizes):
            np.testing.assert_array_equal(_hwc(level), _pil(image, *size))
    np.testing.assert_array_equal(resize_image(image, height=50, width=40, backend="pil"), _pil(image, 50, 40))
    # a BGR array gives the same pixels channel for channel (DefaultPredictor resizes the BGR image)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    np.testing.assert_array_equal(_pil(bgr, 150, 203)[:, :, ::-1], _pil(image, 150, 203))


def test_pil_backend_is_not_opencv_nor_nearest() -> None:
    """The recorded values tell the three resizes apart (a one-line change of the resize fails the tests above)."""
    image = _image()
    pil = resize_image(image, height=60, width=81, backend="pil")
    opencv = resize_image(image, height=60, width=81, backend="opencv")
    nearest = np.asarray(Image.fromarray(image).resize((81, 60), Image.NEAREST))
    assert (pil != opencv).mean() > 0.5 and (pil != nearest).mean() > 0.5


def test_pil_backend_training_flip_and_boxes_match_detectron2(record: dict) -> None:
    mapper = DatasetMapper(min_size=[77], max_size=1000, hflip_prob=1.0, is_train=True, resize_backend="pil")
    output = mapper(record, rng=np.random.default_rng(1))
    # detectron2 resizes, then flips
    np.testing.assert_array_equal(_hwc(output["image"]), _pil(_image(), 77, 104)[:, ::-1])
    assert _sha256(_hwc(output["image"]))[:16] == "8b97facbc6ff674d"
    # detectron2's boxes (float32): x * 104/131 and y * 77/97, then x -> 104 - x, clipped to the resized image
    expected = [[64.2259521484375, 3.7309279441833496, 101.3801498413086, 71.60205841064453],
                [0.0, 0.0, 24.610687255859375, 7.938144207000732]]
    assert output["gt_boxes"].dtype == torch.float32 and output["gt_boxes"].tolist() == expected
    assert output["gt_classes"].tolist() == [0, 1]


def test_pil_backend_boxes_without_flip_hand_computed(record: dict) -> None:
    mapper = DatasetMapper(min_size=[194], max_size=1000, hflip_prob=0.0, is_train=True, resize_backend="pil")
    output = mapper(record, rng=np.random.default_rng(0))
    assert tuple(output["image"].shape) == (3, 194, 262)  # 97 -> 194, 131 -> 262: a scale of exactly 2
    # the second box's x2 = 140 * 2 = 280 is clipped to the resized width 262
    assert output["gt_boxes"].tolist() == [[6.599999904632568, 9.399999618530273, 100.19999694824219,
                                            180.39999389648438], [200.0, 0.0, 262.0, 20.0]]


# the OpenCV path's outputs before INPUT.RESIZE_BACKEND existed (sha256 of the CHW bytes, first 16 hex digits)
OPENCV_BEFORE = {"image": "2baf47097912f3b7", "pyramid": ["0c1b88bf5898b5d6", "2baf47097912f3b7", "871f9a7f6912967d"],
                 "train": "014549fb7bca8821"}


def test_opencv_backend_is_unchanged(record: dict) -> None:
    image = _image()
    for backend in ({}, {"resize_backend": "opencv"}):
        mapper = DatasetMapper(min_size=150, max_size=1000, is_train=False, test_scales=(60, 150, 301), **backend)
        output = mapper.map_image(image)
        assert _sha256(output["image"])[:16] == OPENCV_BEFORE["image"]
        assert [_sha256(level)[:16] for level in output["pyramid"]] == OPENCV_BEFORE["pyramid"]
        for level in output["pyramid"]:
            height, width = level.shape[-2:]
            expected = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(_hwc(level), expected)
        train = DatasetMapper(min_size=[77], max_size=1000, hflip_prob=1.0, is_train=True, **backend)
        output = train(record, rng=np.random.default_rng(1))
        assert _sha256(output["image"])[:16] == OPENCV_BEFORE["train"]
        assert output["gt_boxes"].tolist() == [[64.2259521484375, 3.7309277057647705, 101.3801498413086,
                                                71.60205841064453], [0.0, 0.0, 24.610687255859375, 7.938144207000732]]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError) as error:
        DatasetMapper(min_size=600, max_size=1000, is_train=False, resize_backend="cv2")
    assert str(error.value) == "resize_backend must be one of ['opencv', 'pil'], got 'cv2'"
    with pytest.raises(ValueError, match=r"resize backend must be one of \['opencv', 'pil'\], got 'PIL'"):
        resize_image(_image(), height=10, width=10, backend="PIL")


def test_config_key_is_validated_and_the_d2_configs_use_pil() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "d2_r50_c4.yaml", overrides=["INPUT.RESIZE_BACKEND=cv2"])
    assert "INPUT.RESIZE_BACKEND='cv2' must be one of 'opencv', 'pil'" in str(error.value)
    assert RESIZE_BACKENDS == ("opencv", "pil")
    for name in ("d2_r50_c4.yaml", "d2_r101_c4.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.INPUT.RESIZE_BACKEND == "pil" and build_test_mapper(cfg).resize_backend == "pil"
    for name in ("base_c4.yaml", "shapes_r18.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.INPUT.RESIZE_BACKEND == "opencv" and build_test_mapper(cfg).resize_backend == "opencv"


@pytest.mark.parametrize(
    ("size", "expected"),
    [((480, 640, 800, 1333), (800, 1067)), ((333, 500, 600, 1000), (600, 901)), ((2, 3, 3, 1000), (3, 5)),
     ((427, 640, 800, 1333), (800, 1199)), ((640, 359, 800, 1333), (1333, 748)), ((6, 1, 5, 1000), (30, 5)),
     ((375, 500, 600, 1000), (600, 800))],
)
def test_output_size_is_detectron2s(size: tuple[int, int, int, int], expected: tuple[int, int]) -> None:
    """detectron2's ResizeShortestEdge.get_output_shape(h, w, short, max) for these, recorded (4.5 rounds to 5)."""
    height, width, short, max_size = size
    mapper = DatasetMapper(min_size=short, max_size=max_size, is_train=False, resize_backend="pil")
    image = np.zeros((height, width, 3), dtype=np.uint8)
    assert tuple(mapper.map_image(image)["image"].shape[-2:]) == expected


def test_opencv_and_pil_decode_a_jpeg_alike(tmp_path: Path) -> None:
    """detectron2's loader decodes with PIL, detectron_res with OpenCV: the same pixels for a baseline JPEG here."""
    path = tmp_path / "image.jpg"
    Image.fromarray(np.repeat(np.repeat(_image(), 3, axis=0), 3, axis=1)).save(path, quality=90)
    with Image.open(path) as decoded:
        np.testing.assert_array_equal(read_image_rgb(path), np.asarray(decoded.convert("RGB")))
