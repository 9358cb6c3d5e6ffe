"""Tests of the synthetic shapes data set (generation, tight boxes, ensure_shapes) and the data set catalog."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectron_res.data import datasets
from detectron_res.data.datasets import shapes
from detectron_res.data.datasets.shapes import ensure_shapes, generate_shapes, load_shapes

SMALL = {"num_train": 6, "num_val": 3, "image_size": 96, "seed": 5}


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(root, **SMALL)
    return root


@pytest.fixture
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the catalog's default shapes parameters small, so that tests generate in milliseconds."""
    monkeypatch.setitem(shapes.DEFAULT_PARAMS, "num_train", 4)
    monkeypatch.setitem(shapes.DEFAULT_PARAMS, "num_val", 2)
    monkeypatch.setitem(shapes.DEFAULT_PARAMS, "image_size", 64)


def test_layout_and_coco_fields(small_shapes: Path) -> None:
    assert sorted(path.name for path in (small_shapes / "train").iterdir()) == [f"00000{i}.png" for i in range(1, 7)]
    assert len(list((small_shapes / "val").iterdir())) == 3
    coco = json.loads((small_shapes / "annotations" / "instances_train.json").read_text())
    assert coco["categories"] == [
        {"id": 1, "name": "circle", "supercategory": "shape"},
        {"id": 2, "name": "square", "supercategory": "shape"},
        {"id": 3, "name": "triangle", "supercategory": "shape"},
    ]
    assert [image["id"] for image in coco["images"]] == [1, 2, 3, 4, 5, 6]
    assert all(image["height"] == image["width"] == 96 for image in coco["images"])
    ids = [ann["id"] for ann in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    per_image = np.bincount([ann["image_id"] for ann in coco["annotations"]], minlength=7)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
        assert 0.16 * 96 - 1 <= max(w, h) <= 0.45 * 96 + 1
        assert 0.3 * w * h < ann["area"] <= w * h
        assert 0 <= x and x + w <= 96 and 0 <= y and y + h <= 96


def test_boxes_are_tight_around_the_drawn_pixels(small_shapes: Path) -> None:
    coco = json.loads((small_shapes / "annotations" / "instances_train.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    for ann in coco["annotations"]:
        image = cv2.imread(str(small_shapes / "train" / names[ann["image_id"]]))
        x, y, w, h = ann["bbox"]
        # the box grown by one pixel: its ring holds no pixel of the object's colour
        top, left = max(y - 1, 0), max(x - 1, 0)
        region = image[top : y + h + 1, left : x + w + 1]
        colours, counts = np.unique(region.reshape(-1, 3), axis=0, return_counts=True)
        extents = []
        for colour in colours[counts == ann["area"]]:
            rows, cols = np.nonzero((region == colour).all(axis=2))
            width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
            extents.append([left + cols.min(), top + rows.min(), width, height])
        assert [x, y, w, h] in extents, f"annotation {ann['id']}: no colour with area {ann['area']} spans its box"


def test_same_seed_same_json_other_seed_other_json(small_shapes: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "again", **SMALL)
    generate_shapes(tmp_path / "other", **{**SMALL, "seed": 6})
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "again" / name).read_bytes() == (small_shapes / name).read_bytes()
        assert (tmp_path / "other" / name).read_bytes() != (small_shapes / name).read_bytes()
    image = "train/000003.png"
    assert (tmp_path / "again" / image).read_bytes() == (small_shapes / image).read_bytes()


def test_load_shapes(small_shapes: Path) -> None:
    dataset = load_shapes(small_shapes, "val", name="shapes_val")
    assert len(dataset) == 3 and dataset.class_names == ["circle", "square", "triangle"]
    assert dataset.category_ids == [1, 2, 3]
    assert dataset.records[0]["file_name"] == str(small_shapes / "val" / "000001.png")
    ann = json.loads((small_shapes / "annotations" / "instances_val.json").read_text())["annotations"][0]
    x, y, w, h = ann["bbox"]
    assert dataset.records[0]["annotations"][0] == {
        "bbox": [x, y, x + w, y + h], "category_id": ann["category_id"] - 1, "iscrowd": 0
    }
    with pytest.raises(ValueError, match="unknown shapes split 'test'"):
        load_shapes(small_shapes, "test", name="x")


def test_ensure_shapes_generates_once_and_again_when_parameters_change(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    params = {"num_train": 3, "num_val": 1, "image_size": 64}
    assert ensure_shapes(root, **params) == root
    marker = root / "params.json"
    first_mtime = marker.stat().st_mtime_ns
    image_mtime = (root / "train" / "000001.png").stat().st_mtime_ns
    ensure_shapes(root, **params)
    assert marker.stat().st_mtime_ns == first_mtime
    assert (root / "train" / "000001.png").stat().st_mtime_ns == image_mtime

    ensure_shapes(root, **{**params, "num_train": 2})
    assert len(list((root / "train").iterdir())) == 2
    assert json.loads(marker.read_text())["num_train"] == 2
    assert [path.name for path in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left behind


def test_ensure_shapes_regenerates_an_incomplete_folder(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    (root / "train").mkdir(parents=True)
    (root / "train" / "junk.png").write_bytes(b"half written")
    ensure_shapes(root, num_train=2, num_val=1, image_size=48)
    assert sorted(path.name for path in (root / "train").iterdir()) == ["000001.png", "000002.png"]
    with pytest.raises(ValueError, match=r"unknown shapes parameters \['colour'\]"):
        ensure_shapes(root, colour=3)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        ensure_shapes(root, image_size=8)


def test_catalog_builtin_shapes_and_env_override(
    tmp_path: Path, tiny_defaults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(datasets.DATASETS_ENV_VAR, raising=False)
    train = datasets.get_dataset("shapes_train", root=tmp_path)
    assert train.name == "shapes_train" and len(train) == 4
    assert (tmp_path / "shapes" / "params.json").is_file()
    assert train.records[0]["file_name"] == str(tmp_path / "shapes" / "train" / "000001.png")

    monkeypatch.setenv(datasets.DATASETS_ENV_VAR, str(tmp_path))
    val = datasets.get_dataset("shapes_val", root=tmp_path / "ignored")
    assert len(val) == 2 and not (tmp_path / "ignored").exists()


def test_catalog_json_pair_relative_to_cwd(
    small_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(small_shapes)
    dataset = datasets.get_dataset("annotations/instances_val.json:val", root=tmp_path / "unused")
    assert dataset.name == "annotations/instances_val.json:val"
    assert dataset.json_file == "annotations/instances_val.json"
    assert dataset.records[0]["file_name"] == "val/000001.png"
    assert len(dataset) == 3


def test_catalog_unknown_name_suggests_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'shapes_trian' \(did you mean 'shapes_train'\?\)") as error:
        datasets.get_dataset("shapes_trian", root=tmp_path)
    assert "coco_2017_val" in str(error.value) and "ANNOTATIONS.json:IMAGE_DIR" in str(error.value)


def test_catalog_coco_names_resolve_under_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.DATASETS_ENV_VAR, raising=False)
    expected = {
        "coco_2017_train": "instances_train2017.json",
        "coco_2017_val": "instances_val2017.json",
        "coco_2014_minival": "instances_minival2014.json",
        "coco_2014_valminusminival": "instances_valminusminival2014.json",
    }
    for name, json_name in expected.items():
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "coco" / "annotations" / json_name)):
            datasets.get_dataset(name, root=tmp_path)


def test_register_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DATASET_CATALOG", dict(datasets.DATASET_CATALOG))
    seen = []

    def load(root: Path, name: str) -> datasets.DetectionDataset:
        seen.append((root, name))
        return datasets.DetectionDataset(name=name, records=[], class_names=["a"], category_ids=[1])

    datasets.register_dataset("mine", load)
    assert datasets.get_dataset("mine", root=tmp_path).name == "mine"
    assert seen == [(tmp_path, "mine")]
    datasets.register_dataset("mine", load)  # the same function again (a notebook cell run twice): nothing happens
    assert datasets.DATASET_CATALOG["mine"] is load
    with pytest.raises(ValueError, match="must not contain"):
        datasets.register_dataset("x.json:y", load)


def _parts(root: Path, name: str) -> datasets.DetectionDataset:
    return datasets.DetectionDataset(name=name, records=[], class_names=["part"], category_ids=[1])


def test_register_dataset_refuses_a_different_function_unless_overwrite(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "DATASET_CATALOG", dict(datasets.DATASET_CATALOG))
    datasets.register_dataset("mine", _parts)

    def other(root: Path, name: str) -> datasets.DetectionDataset:
        return datasets.DetectionDataset(name=name, records=[], class_names=["x", "y"], category_ids=[1, 2])

    with pytest.raises(ValueError) as info:
        datasets.register_dataset("mine", other)
    assert str(info.value) == (
        f"data set 'mine' is already registered to {__name__}._parts; to replace it with "
        f"{__name__}.test_register_dataset_refuses_a_different_function_unless_overwrite.<locals>.other, "
        "call register_dataset('mine', fn, overwrite=True)"
    )
    assert datasets.DATASET_CATALOG["mine"] is _parts
    datasets.register_dataset("mine", other, overwrite=True)
    assert datasets.get_dataset("mine", root=tmp_path).class_names == ["x", "y"]
    with pytest.raises(ValueError, match="'voc_2007_train' is already registered to "):  # built-ins too
        datasets.register_dataset("voc_2007_train", other)


def test_register_dataset_same_def_run_again_is_a_no_op_but_a_changed_one_is_not(tmp_path, monkeypatch) -> None:
    """A notebook cell that defines the function and registers it, run twice, makes a new function object with the
    same code; an edited cell or a factory's second function (same code, other closure) is a different data set."""
    monkeypatch.setattr(datasets, "DATASET_CATALOG", dict(datasets.DATASET_CATALOG))
    cell = (
        "def load(root, name, classes=('bolt',), *, first_id=1):\n"
        "    return DetectionDataset(name=name, records=[], class_names=list(classes), category_ids=[first_id])\n"
        "register_dataset('cell', load)\n"
    )
    namespace = {"__name__": "__main__", "DetectionDataset": datasets.DetectionDataset,
                 "register_dataset": datasets.register_dataset}
    exec(compile(cell, "<cell 1>", "exec"), namespace)
    first = datasets.DATASET_CATALOG["cell"]
    exec(compile(cell, "<cell 2>", "exec"), namespace)  # run again: no error
    assert datasets.DATASET_CATALOG["cell"] is namespace["load"] is not first
    assert datasets.get_dataset("cell", root=tmp_path).class_names == ["bolt"]
    with pytest.raises(ValueError, match=r"^data set 'cell' is already registered to __main__\.load; to replace it"):
        exec(compile(cell.replace("'bolt',", "'nut',"), "<cell 3>", "exec"), namespace)  # other defaults
    for edited in (cell.replace("first_id=1", "first_id=2"), cell.replace("list(classes)", "sorted(classes)")):
        with pytest.raises(ValueError, match="overwrite=True"):  # other keyword default, other body
            exec(compile(edited, "<cell 4>", "exec"), namespace)
    other_namespace = {**namespace, "DetectionDataset": None}  # the same cell elsewhere reads other globals
    with pytest.raises(ValueError, match="overwrite=True"):
        exec(compile(cell, "<cell 5>", "exec"), other_namespace)
    assert datasets.get_dataset("cell", root=tmp_path).class_names == ["bolt"]

    def factory(classes: list[str]):
        def load(root: Path, name: str) -> datasets.DetectionDataset:
            return datasets.DetectionDataset(name=name, records=[], class_names=classes, category_ids=[1])
        return load

    datasets.register_dataset("made", factory(["a"]))
    with pytest.raises(ValueError, match="'made' is already registered"):
        datasets.register_dataset("made", factory(["b"]))
    assert datasets.get_dataset("made", root=tmp_path).class_names == ["a"]
