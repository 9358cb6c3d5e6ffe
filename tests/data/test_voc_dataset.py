"""Tests of the PASCAL VOC loader on a tiny VOCdevkit written into tmp_path and on the real sample."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron_res.data.datasets.voc import (
    VOC_CLASSES,
    load_voc,
    read_voc_annotation,
    voc_dataset_names,
)

# ../shared/data beside the checkout (this file is <checkout>/tests/data/...)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOC_SAMPLE = SHARED_DATA / "voc2012_sample"


def _object(name: str, box: tuple, difficult: int | None = 0, truncated: int | None = 0) -> str:
    flags = ""
    if difficult is not None:
        flags += f"<difficult>{difficult}</difficult>"
    if truncated is not None:
        flags += f"<truncated>{truncated}</truncated>"
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><pose>Left</pose>{flags}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _write_image(voc_root: Path, image_id: str, width: int, height: int) -> None:
    (voc_root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(voc_root / "JPEGImages" / f"{image_id}.jpg")


def _write_xml(voc_root: Path, image_id: str, objects: list[str], size: tuple[int, int] | None) -> None:
    (voc_root / "Annotations").mkdir(parents=True, exist_ok=True)
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    text = f"<annotation><filename>{image_id}.jpg</filename>{size_xml}{''.join(objects)}</annotation>"
    (voc_root / "Annotations" / f"{image_id}.xml").write_text(text)


def _write_split(voc_root: Path, split: str, ids: list[str]) -> None:
    (voc_root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc_root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2007 with 3 images: flags, a missing <size>, a clipped and a degenerate box."""
    voc_root = tmp_path / "VOCdevkit" / "VOC2007"
    _write_image(voc_root, "000001", 40, 30)
    _write_xml(
        voc_root,
        "000001",
        [
            _object("person", (1, 2, 10, 20), difficult=1, truncated=1),
            _object("dog", (5, 5, 5, 5), difficult=None, truncated=None),  # flags missing -> 0; one pixel
        ],
        size=(40, 30),
    )
    _write_image(voc_root, "000002", 32, 24)
    _write_xml(voc_root, "000002", [_object("car", (3, 4, 50, 24))], size=None)  # size from the JPEG header
    _write_image(voc_root, "000003", 20, 20)
    _write_xml(
        voc_root,
        "000003",
        [
            _object("cat", (0, -3, 12.5, 30)),
            _object("bird", (15, 2, 10, 9)),
            _object("bird", (2, 2, 6, 9)),
            _object("bird", ("nan", 2, 6, 9)),  # kept (as NaN) before the shared ground-truth rule
        ],
        size=(20, 20),
    )
    _write_split(voc_root, "trainval", ["000001", "000002", "000003"])
    _write_split(voc_root, "test", ["000002"])
    return voc_root


def test_load_voc_boxes_flags_and_metadata(tiny_voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="detectron_res.data.datasets.voc"):
        dataset = load_voc(tiny_voc, "trainval", name="tiny")
    assert dataset.name == "tiny"
    assert dataset.class_names == list(VOC_CLASSES)
    assert dataset.category_ids == list(range(1, 21))
    assert len(dataset) == 3
    r1, r2, r3 = dataset.records
    assert r1["image_id"] == "000001"
    assert r1["file_name"] == str(tiny_voc / "JPEGImages" / "000001.jpg")
    assert (r1["height"], r1["width"]) == (30, 40)
    # 1-based inclusive XML -> 0-based continuous: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax
    assert r1["annotations"] == [
        {"bbox": [0.0, 1.0, 10.0, 20.0], "category_id": 14, "iscrowd": 0, "difficult": 1, "truncated": 1},
        {"bbox": [4.0, 4.0, 5.0, 5.0], "category_id": 11, "iscrowd": 0, "difficult": 0, "truncated": 0},
    ]
    # no <size>: read from the image header (32 x 24); xmax 50 clipped to the width 32
    assert (r2["height"], r2["width"]) == (24, 32)
    assert r2["annotations"][0]["bbox"] == [2.0, 3.0, 32.0, 24.0]
    assert r2["annotations"][0]["category_id"] == 6
    # cat: x1 -1 -> 0, y1 -4 -> 0, y2 30 -> 20 (one clipped box); first bird x2 < x1 and the NaN bird: dropped
    assert [a["bbox"] for a in r3["annotations"]] == [[0.0, 0.0, 12.5, 20.0], [1.0, 1.0, 6.0, 9.0]]
    assert [a["category_id"] for a in r3["annotations"]] == [7, 2]
    assert dataset.extra == {
        "voc_root": str(tiny_voc),
        "split": "trainval",
        "year": 2007,
        "clipped_boxes": 2,
        "dropped_boxes": 2,
    }
    summary = [r.getMessage() for r in caplog.records if r.name == "detectron_res.data.datasets.voc"]
    assert len(summary) == 1
    assert "5 boxes (1 difficult)" in summary[0]
    assert "2 boxes clipped" in summary[0] and "2 degenerate boxes dropped" in summary[0]


def test_read_voc_annotation_keeps_devkit_boxes(tiny_voc: Path) -> None:
    annotation = read_voc_annotation(tiny_voc / "Annotations" / "000001.xml")
    assert (annotation.height, annotation.width) == (30, 40)
    assert [(o.name, o.bbox, o.difficult, o.truncated) for o in annotation.objects] == [
        ("person", (1.0, 2.0, 10.0, 20.0), 1, 1),
        ("dog", (5.0, 5.0, 5.0, 5.0), 0, 0),
    ]


def test_malformed_xml_names_the_file(tiny_voc: Path) -> None:
    bad = tiny_voc / "Annotations" / "000002.xml"
    bad.write_text("<annotation><object><name>car</name>")
    with pytest.raises(ValueError, match=r"malformed VOC annotation XML .*000002\.xml"):
        load_voc(tiny_voc, "trainval", name="tiny")


def test_missing_box_coordinate_names_the_file(tiny_voc: Path) -> None:
    _write_xml(tiny_voc, "000002", ["<object><name>car</name><bndbox><xmin>1</xmin></bndbox></object>"], (32, 24))
    with pytest.raises(ValueError, match=r"000002\.xml.*\(car\) has no <bndbox><ymin>"):
        load_voc(tiny_voc, "test", name="tiny")


def test_unknown_class_names_file_and_class(tiny_voc: Path) -> None:
    _write_xml(tiny_voc, "000002", [_object("unicorn", (1, 1, 5, 5))], (32, 24))
    with pytest.raises(ValueError, match=r"000002\.xml: class 'unicorn' is not one of the 20 class names"):
        load_voc(tiny_voc, "test", name="tiny")


def test_custom_class_list(tiny_voc: Path) -> None:
    dataset = load_voc(tiny_voc, "test", name="cars", class_names=["car"])
    assert dataset.class_names == ["car"] and dataset.category_ids == [1]
    assert dataset.records[0]["annotations"][0]["category_id"] == 0
    with pytest.raises(ValueError, match=r"000001\.xml: class 'person'"):
        load_voc(tiny_voc, "trainval", name="cars", class_names=["car"])


def test_missing_files_raise_file_not_found(tiny_voc: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/val\.txt"):
        load_voc(tiny_voc, "val", name="tiny")
    (tiny_voc / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/000002\.jpg"):
        load_voc(tiny_voc, "test", name="tiny")
    _write_xml(tiny_voc, "000002", [_object("car", (3, 4, 20, 24))], size=(32, 24))
    dataset = load_voc(tiny_voc, "test", name="tiny", check_files=False)  # size known: image not needed
    assert dataset.records[0]["annotations"][0]["bbox"] == [2.0, 3.0, 20.0, 24.0]
    (tiny_voc / "Annotations" / "000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"Annotations/000002\.xml"):
        load_voc(tiny_voc, "test", name="tiny", check_files=False)


def test_duplicate_id_in_split(tiny_voc: Path) -> None:
    _write_split(tiny_voc, "test", ["000002", "000001", "000002"])
    with pytest.raises(ValueError, match=r"test\.txt lists image '000002' more than once"):
        load_voc(tiny_voc, "test", name="tiny")


def test_voc_dataset_names_resolve_under_root(tiny_voc: Path) -> None:
    names = voc_dataset_names()
    assert sorted(names) == sorted(
        f"voc_{year}_{split}" for year in (2007, 2012) for split in ("trainval", "train", "val", "test")
    )
    root = tiny_voc.parents[1]
    dataset = names["voc_2007_test"](root)
    assert dataset.name == "voc_2007_test"
    assert [r["image_id"] for r in dataset.records] == ["000002"]
    assert dataset.extra["year"] == 2007 and dataset.extra["split"] == "test"
    with pytest.raises(FileNotFoundError, match=r"voc_2012_val.*VOCdevkit/VOC2012.*ImageSets/Main/val\.txt.*DATASETS\.ROOT"):
        names["voc_2012_val"](root)


def test_catalog_names_and_a_root_holding_the_year_folders(tiny_voc: Path) -> None:
    from detectron_res.data.datasets import get_dataset

    devkit = tiny_voc.parent  # .../VOCdevkit, which holds VOC2007 directly
    by_devkit_parent = get_dataset("voc_2007_test", root=devkit.parent)
    by_year_parent = get_dataset("voc_2007_test", root=devkit)
    assert by_devkit_parent.records == by_year_parent.records
    assert by_devkit_parent.extra["voc_root"] == str(tiny_voc)


def test_real_voc2012_sample(shared_data) -> None:
    shared_data("voc2012_sample")
    dataset = load_voc(VOC_SAMPLE / "VOC2012", "val", name="voc2012_sample")
    assert len(dataset) == 100
    annotations = [a for r in dataset.records for a in r["annotations"]]
    assert len(annotations) == 273
    assert sum(a["difficult"] for a in annotations) == 38
    assert dataset.extra["year"] == 2012
    assert dataset.extra["clipped_boxes"] == 0 and dataset.extra["dropped_boxes"] == 0
    first = dataset.records[0]
    # 2007_000027.xml: 486 x 500, one person at xmin 174, ymin 101, xmax 349, ymax 351
    assert (first["image_id"], first["width"], first["height"]) == ("2007_000027", 486, 500)
    assert first["annotations"] == [
        {"bbox": [173.0, 100.0, 349.0, 351.0], "category_id": 14, "iscrowd": 0, "difficult": 0, "truncated": 0}
    ]
