"""Tests of the synthetic loc_shapes data set: the ILSVRC CLS-LOC CSV layout, tight inclusive boxes, determinism,
loading through `load_imagenet_loc_csv`, ensure_loc_shapes and the catalog names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from detectron_res.data import datasets
from detectron_res.data.datasets import loc_shapes
from detectron_res.data.datasets.imagenet_loc import load_imagenet_loc_csv
from detectron_res.data.datasets.loc_shapes import (
    CLASS_NAMES,
    WNIDS,
    draw_image,
    ensure_loc_shapes,
    generate_loc_shapes,
    load_loc_shapes,
)

SMALL = {"num_train": 10, "num_val": 5, "seed": 3}


@pytest.fixture(scope="module")
def small_loc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loc") / "loc_shapes"
    generate_loc_shapes(root, **SMALL)
    return root


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def groups(prediction: str) -> list[tuple[str, list[int]]]:
    tokens = prediction.split()
    return [(tokens[i], [int(v) for v in tokens[i + 1 : i + 5]]) for i in range(0, len(tokens), 5)]


def test_synsets_layout_and_csv_rows(small_loc: Path) -> None:
    assert (small_loc / "LOC_synset_mapping.txt").read_text() == (
        "n90000001 circle\nn90000002 square\nn90000003 triangle\nn90000004 cross\nn90000005 ring\n"
    )
    assert WNIDS == ("n90000001", "n90000002", "n90000003", "n90000004", "n90000005")
    assert sorted(path.name for path in (small_loc / "train").iterdir()) == list(WNIDS)
    assert sorted(path.name for path in (small_loc / "train" / "n90000003").iterdir()) == [
        "n90000003_1.JPEG", "n90000003_2.JPEG"
    ]
    assert sorted(path.name for path in (small_loc / "val").iterdir()) == [
        f"LOCSHAPES_val_0000000{i}.JPEG" for i in range(1, 6)
    ]
    assert json.loads((small_loc / "params.json").read_text()) == {"format_version": 1, **SMALL}

    for split, count in (("train", 10), ("val", 5)):
        rows = read_rows(small_loc / f"LOC_{split}_solution.csv")
        assert rows[0] == ["ImageId", "PredictionString"]
        ids = [row[0] for row in rows[1:]]
        assert len(ids) == count and ids == sorted(ids)
        for image_id, prediction in rows[1:]:
            found = groups(prediction)
            assert len(found) in (1, 2) and len(prediction.split()) == 5 * len(found)
            for wnid, (x1, y1, x2, y2) in found:
                assert wnid in WNIDS and 0 <= x1 < x2 <= 175 and 0 <= y1 < y2 <= 175
            if split == "train":
                assert {wnid for wnid, _ in found} == {image_id.split("_")[0]}
    val = dict(read_rows(small_loc / "LOC_val_solution.csv")[1:])
    # class of image i is i % 5: val image 1 (index 0) is a circle, image 5 (index 4) a ring
    assert groups(val["LOCSHAPES_val_00000001"])[0][0] == "n90000001"
    assert groups(val["LOCSHAPES_val_00000005"])[0][0] == "n90000005"


def test_same_seed_same_bytes_other_seed_differs(small_loc: Path, tmp_path: Path) -> None:
    generate_loc_shapes(tmp_path / "again", **SMALL)
    generate_loc_shapes(tmp_path / "other", **{**SMALL, "seed": 4})
    for name in ("LOC_train_solution.csv", "LOC_val_solution.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (small_loc / name).read_bytes()
        assert (tmp_path / "other" / name).read_bytes() != (small_loc / name).read_bytes()
    images = sorted(path.relative_to(small_loc) for path in small_loc.rglob("*.JPEG"))
    assert len(images) == 15
    for image in images:
        assert (tmp_path / "again" / image).read_bytes() == (small_loc / image).read_bytes()
    assert (tmp_path / "other" / images[0]).read_bytes() != (small_loc / images[0]).read_bytes()


def test_loading_makes_inclusive_boxes_continuous(small_loc: Path) -> None:
    for split in ("train", "val"):
        dataset = load_loc_shapes(small_loc, split, name=f"loc_shapes_{split}")
        direct = load_imagenet_loc_csv(
            small_loc / f"LOC_{split}_solution.csv", small_loc / split, small_loc / "LOC_synset_mapping.txt"
        )
        assert dataset.records == direct.records
        assert dataset.name == f"loc_shapes_{split}" and dataset.class_names == list(CLASS_NAMES)
        assert dataset.category_ids == [1, 2, 3, 4, 5] and dataset.extra["wnids"] == list(WNIDS)
        truth = dict(read_rows(small_loc / f"LOC_{split}_solution.csv")[1:])
        assert [record["image_id"] for record in dataset.records] == sorted(truth)
        for record in dataset.records:
            assert 112 <= record["width"] <= 176 and 112 <= record["height"] <= 176
            expected = [
                {"bbox": [float(x1), float(y1), float(x2 + 1), float(y2 + 1)], "category_id": WNIDS.index(wnid),
                 "iscrowd": 0}
                for wnid, (x1, y1, x2, y2) in groups(truth[record["image_id"]])
            ]
            assert record["annotations"] == expected
            if split == "train":  # the class is the index of the image's wnid folder
                wnid = Path(record["file_name"]).parent.name
                assert {ann["category_id"] for ann in record["annotations"]} == {WNIDS.index(wnid)}
    with pytest.raises(ValueError, match="unknown loc_shapes split 'test'"):
        load_loc_shapes(small_loc, "test", name="x")


@pytest.mark.parametrize("class_index", range(5))
def test_drawn_boxes_are_the_exact_extent_of_the_drawn_pixels(class_index: int) -> None:
    for index in range(8):
        drawn = draw_image(np.random.default_rng([11, class_index, index]), class_index)
        height, width = drawn.image.shape[:2]
        assert drawn.image.dtype == np.uint8 and drawn.image.shape[2] == 3
        assert 112 <= width <= 176 and 112 <= height <= 176
        assert drawn.class_index == class_index and len(drawn.masks) == len(drawn.boxes) in (1, 2)
        for mask, box in zip(drawn.masks, drawn.boxes):
            assert mask.shape == (height, width)
            rows, cols = np.nonzero(mask)
            assert box == (cols.min(), rows.min(), cols.max(), rows.max())
            colours = np.unique(drawn.image[mask], axis=0)
            assert len(colours) == 1  # the object is one flat colour
            side = max(box[2] - box[0], box[3] - box[1]) + 1
            assert 0.3 * min(width, height) - 1 <= side <= 0.85 * min(width, height) + 1
        if len(drawn.masks) == 2:
            assert not (drawn.masks[0] & drawn.masks[1]).any()
    with pytest.raises(ValueError, match="class_index"):
        draw_image(np.random.default_rng(0), 5)


def test_new_shapes_differ_from_their_neighbours() -> None:
    """A ring has a hole where a circle has none; a cross leaves its bounding square's corners empty."""
    ring = loc_shapes._loc_shape_mask(np.random.default_rng(0), "ring", 41)
    circle = loc_shapes._loc_shape_mask(np.random.default_rng(0), "circle", 41)
    assert circle[20, 20] and not ring[20, 20] and ring[20, 2] and (ring <= circle).all()
    cross = loc_shapes._loc_shape_mask(np.random.default_rng(0), "cross", 41)
    rows, cols = np.nonzero(cross)
    assert 0.4 < cross.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)) < 0.7


def test_some_images_hold_two_objects_of_their_class(tmp_path: Path) -> None:
    generate_loc_shapes(tmp_path, num_train=40, num_val=1, seed=0)
    rows = read_rows(tmp_path / "LOC_train_solution.csv")[1:]
    pairs = [row for row in rows if len(groups(row[1])) == 2]
    assert len(pairs) == 3  # the exact count of this fixed seed (about 10%)
    for image_id, prediction in pairs:
        (first, a), (second, b) = groups(prediction)
        assert first == second == image_id.split("_")[0]
        # disjoint boxes: separated along x or along y
        assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_ensure_generates_once_and_again_when_parameters_change(tmp_path: Path) -> None:
    root = tmp_path / "loc_shapes"
    params = {"num_train": 5, "num_val": 2}
    assert ensure_loc_shapes(root, **params) == root
    marker, image = root / "params.json", root / "train" / "n90000001" / "n90000001_1.JPEG"
    marker_mtime, image_mtime = marker.stat().st_mtime_ns, image.stat().st_mtime_ns
    ensure_loc_shapes(root, **params)
    assert marker.stat().st_mtime_ns == marker_mtime and image.stat().st_mtime_ns == image_mtime

    ensure_loc_shapes(root, **{**params, "num_train": 3})
    assert len(read_rows(root / "LOC_train_solution.csv")) == 4
    assert json.loads(marker.read_text())["num_train"] == 3
    assert not (root / "train" / "n90000004").exists()  # nothing left of the old generation
    assert [path.name for path in tmp_path.iterdir()] == ["loc_shapes"]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"num_train": 0}, "num_train must be >= 1"),
        ({"num_val": -2}, "num_val must be >= 1"),
        ({"num_val": 2.5}, "num_val must be an int"),
        ({"num_train": True}, "num_train must be an int"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": "0"}, "seed must be an int"),
    ],
)
def test_invalid_parameters_name_the_parameter(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_loc_shapes(tmp_path / "direct", **params)
    with pytest.raises(ValueError, match=message):
        ensure_loc_shapes(tmp_path / "ensured", **params)
    assert list(tmp_path.iterdir()) == []


def test_ensure_rejects_unknown_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown loc_shapes parameters \['image_size'\]"):
        ensure_loc_shapes(tmp_path, image_size=64)


def test_catalog_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.DATASETS_ENV_VAR, raising=False)
    monkeypatch.setitem(loc_shapes.DEFAULT_PARAMS, "num_train", 10)
    monkeypatch.setitem(loc_shapes.DEFAULT_PARAMS, "num_val", 5)
    val = datasets.get_dataset("loc_shapes_val", root=tmp_path)
    assert val.name == "loc_shapes_val" and len(val) == 5 and val.num_classes == 5
    assert val.records[0]["file_name"] == str(tmp_path / "loc_shapes" / "val" / "LOCSHAPES_val_00000001.JPEG")
    marker_mtime = (tmp_path / "loc_shapes" / "params.json").stat().st_mtime_ns
    train = datasets.get_dataset("loc_shapes_train", root=tmp_path)
    assert len(train) == 10 and train.records[0]["image_id"] == "n90000001_1"
    assert (tmp_path / "loc_shapes" / "params.json").stat().st_mtime_ns == marker_mtime  # generated once
    assert json.loads((tmp_path / "loc_shapes" / "params.json").read_text()) == {
        "format_version": 1, "num_train": 10, "num_val": 5, "seed": 0
    }
    assert datasets.ensure_loc_shapes is ensure_loc_shapes
    assert {"ensure_loc_shapes", "generate_loc_shapes", "load_loc_shapes"} <= set(datasets.__all__)
