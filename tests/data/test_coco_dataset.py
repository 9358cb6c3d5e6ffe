"""Tests of load_coco_json: class mapping, box clipping and dropping, errors, and the real coco128 sample."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from detectron_res.data.datasets.coco import load_coco_json

# ../shared/data beside the checkout (this file is <checkout>/tests/data/...)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

CATEGORIES = [  # deliberately unsorted and non-contiguous
    {"id": 12, "name": "zebra"},
    {"id": 3, "name": "cat"},
    {"id": 7, "name": "dog"},
]
IMAGES = [
    {"id": 42, "file_name": "a.jpg", "height": 80, "width": 100},
    {"id": 43, "file_name": "b.jpg", "height": 50, "width": 60},  # no annotations
    {"id": 44, "file_name": "sub/c.jpg", "height": 30, "width": 40},
]
ANNOTATIONS = [
    {"id": 1, "image_id": 42, "category_id": 7, "bbox": [10, 20, 30, 40], "iscrowd": 0},
    {"id": 2, "image_id": 42, "category_id": 12, "bbox": [0, 0, 50, 50], "iscrowd": 1},
    {"id": 3, "image_id": 42, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width: dropped
    {"id": 4, "image_id": 44, "category_id": 3, "bbox": [30, -5, 20, 15], "iscrowd": 0},  # clipped
    {"id": 5, "image_id": 44, "category_id": 3, "bbox": [1, 2, 3], "iscrowd": 0},  # malformed: dropped
    {"id": 6, "image_id": 44, "category_id": 3, "bbox": [math.nan, 2, 3, 4], "iscrowd": 0},  # NaN: dropped
    {"id": 7, "image_id": 44, "category_id": 7, "bbox": [50, 5, 10, 10], "iscrowd": 0},  # outside: dropped
    {"id": 8, "image_id": 44, "category_id": 12, "bbox": [1.5, 2.5, 3.0, 4.0]},  # no iscrowd key
]


def write_coco(tmp_path: Path, *, annotations: list[dict] = ANNOTATIONS, touch_images: bool = True) -> Path:
    (tmp_path / "images" / "sub").mkdir(parents=True, exist_ok=True)
    if touch_images:
        for image in IMAGES:
            (tmp_path / "images" / image["file_name"]).write_bytes(b"")
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": IMAGES, "annotations": annotations, "categories": CATEGORIES}))
    return json_file


def test_tiny_coco_records_and_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    json_file = write_coco(tmp_path)
    with caplog.at_level(logging.INFO, logger="detectron_res.data.datasets.coco"):
        dataset = load_coco_json(json_file, tmp_path / "images", name="tiny")

    assert dataset.name == "tiny"
    assert dataset.json_file == str(json_file)
    assert dataset.category_ids == [3, 7, 12]
    assert dataset.class_names == ["cat", "dog", "zebra"]
    assert dataset.num_classes == 3
    assert [record["image_id"] for record in dataset.records] == [42, 43, 44]
    first, empty, third = dataset.records
    assert first["file_name"] == str(tmp_path / "images" / "a.jpg")
    assert (first["height"], first["width"]) == (80, 100)
    assert first["annotations"] == [
        {"bbox": [10.0, 20.0, 40.0, 60.0], "category_id": 1, "iscrowd": 0},
        {"bbox": [0.0, 0.0, 50.0, 50.0], "category_id": 2, "iscrowd": 1},
    ]
    assert empty["annotations"] == []
    assert third["file_name"] == str(tmp_path / "images" / "sub" / "c.jpg")
    assert third["annotations"] == [
        {"bbox": [30.0, 0.0, 40.0, 10.0], "category_id": 0, "iscrowd": 0},
        {"bbox": [1.5, 2.5, 4.5, 6.5], "category_id": 2, "iscrowd": 0},
    ]
    assert dataset.extra["clipped_boxes"] == 1
    assert dataset.extra["dropped_boxes"] == 4

    summary = [record.getMessage() for record in caplog.records if record.name.endswith("datasets.coco")]
    assert len(summary) == 1
    assert "clipped 1 boxes" in summary[0] and "dropped 4" in summary[0]


def test_unknown_category_is_an_error_naming_file_annotation_and_category(tmp_path: Path) -> None:
    bad = [*ANNOTATIONS, {"id": 977, "image_id": 42, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 0}]
    json_file = write_coco(tmp_path, annotations=bad)
    with pytest.raises(ValueError, match=r"instances\.json.*annotation 977.*category_id 5"):
        load_coco_json(json_file, tmp_path / "images", name="tiny")


def test_unknown_image_id_is_an_error(tmp_path: Path) -> None:
    bad = [{"id": 5, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]}]
    with pytest.raises(ValueError, match=r"annotation 5 refers to image_id 99"):
        load_coco_json(write_coco(tmp_path, annotations=bad), tmp_path / "images", name="tiny")


def test_missing_images_are_named_with_their_count(tmp_path: Path) -> None:
    json_file = write_coco(tmp_path, touch_images=False)
    (tmp_path / "images" / "b.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 images.*a\.jpg.*c\.jpg"):
        load_coco_json(json_file, tmp_path / "images", name="tiny")
    dataset = load_coco_json(json_file, tmp_path / "images", name="tiny", check_files=False)
    assert len(dataset) == 3


def test_missing_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        load_coco_json(tmp_path / "nothere.json", tmp_path, name="x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"images": [], "annotations": []}), "'categories'"),
        (json.dumps([1, 2]), "must be an object"),
        (json.dumps({"images": [{"id": 1}], "categories": CATEGORIES}), r"lacks \['file_name', 'height', 'width'\]"),
    ],
)
def test_malformed_json_is_a_value_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    json_file = tmp_path / "broken.json"
    json_file.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_coco_json(json_file, tmp_path, name="broken")
    assert "broken.json" in str(error.value)


def test_coco128_sample(shared_data) -> None:
    root = shared_data("coco128")
    dataset = load_coco_json(
        root / "annotations" / "instances_train2017.json", root / "train2017", name="coco128"
    )
    assert len(dataset) == 128
    assert dataset.num_classes == 80
    assert dataset.category_ids[:3] == [1, 2, 3] and dataset.category_ids[-1] == 90
    assert dataset.class_names[0] == "person" and dataset.class_names[45] == "bowl"
    annotations = [ann for record in dataset.records for ann in record["annotations"]]
    assert len(annotations) == 939
    assert sum(ann["iscrowd"] for ann in annotations) == 10
    assert dataset.extra["dropped_boxes"] == 0

    first = dataset.records[0]
    assert first["image_id"] == 9
    assert first["file_name"].endswith("train2017/000000000009.jpg")
    assert (first["height"], first["width"]) == (480, 640)
    assert len(first["annotations"]) == 8
    assert first["annotations"][0]["category_id"] == 45  # COCO id 51, "bowl"
    assert first["annotations"][0]["bbox"] == pytest.approx([1.08, 187.69, 612.67, 473.53])
