"""ILSVRC CLS-LOC records from ILSVRC's own layout (one PASCAL-style box XML per image): the same records as the CSV
form for the same numbers (train layout with wnid folders, flat val layout), inclusive boxes made continuous, absent
images, unknown wnids, sizes that disagree with the image, grayscale JPEGs, and the catalog's fallback."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectron_res.data.datasets import get_dataset, load_imagenet_loc_csv, load_imagenet_loc_xml

SYNSETS = "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n"


def write_jpeg(path: Path, width: int, height: int, *, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if gray else (height, width, 3)
    assert cv2.imwrite(str(path), np.full(shape, 120, dtype=np.uint8))


def write_xml(path: Path, folder: str, width: int, height: int, objects: list[tuple]) -> None:
    """An XML as ILSVRC writes them; `objects` are (wnid, xmin, ymin, xmax, ymax)."""
    body = "".join(
        f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for wnid, x1, y1, x2, y2 in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><folder>{folder}</folder><filename>{path.stem}</filename><source><database>ILSVRC_2012"
        f"</database></source><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{body}</annotation>"
    )


def write_csv(path: Path, truth: dict[str, list[tuple]]) -> Path:
    """The CSV form of the same ground truth."""
    lines = ["ImageId,PredictionString"]
    for image_id, objects in truth.items():
        lines.append(image_id + "," + "".join(" ".join(str(v) for v in obj) + " " for obj in objects))
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same_records(xml_dataset, csv_dataset) -> None:
    assert len(xml_dataset.records) == len(csv_dataset.records)
    for from_xml, from_csv in zip(xml_dataset.records, csv_dataset.records):
        assert from_xml.keys() == from_csv.keys()
        for key in from_csv:
            assert from_xml[key] == from_csv[key], key
    assert xml_dataset.class_names == csv_dataset.class_names
    assert xml_dataset.category_ids == csv_dataset.category_ids
    assert xml_dataset.extra["wnids"] == csv_dataset.extra["wnids"]
    assert xml_dataset.extra["synsets"] == csv_dataset.extra["synsets"]


TRAIN = {  # image id -> (width, height, objects)
    "n01440764_10026": (50, 30, [("n01440764", 0, 5, 49, 29), ("n01440764", 10, 2, 60, 20)]),  # 2nd is clipped
    "n01440764_7": (20, 16, [("n01440764", 3, 4, 3, 4)]),  # one pixel
    "n01443537_2": (24, 18, [("n01443537", 1, 1, 22, 16)]),
}


def make_train_layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    annotations, images = tmp_path / "Annotations" / "train", tmp_path / "Data" / "train"
    for image_id, (width, height, objects) in TRAIN.items():
        wnid = image_id.split("_")[0]
        write_xml(annotations / wnid / f"{image_id}.xml", wnid, width, height, objects)
        write_jpeg(images / wnid / f"{image_id}.JPEG", width, height)
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text(SYNSETS)
    return annotations, images, synsets


def test_train_layout_gives_the_records_of_the_csv_form(tmp_path: Path):
    annotations, images, synsets = make_train_layout(tmp_path)
    dataset = load_imagenet_loc_xml(annotations, images, synsets, name="xml_train")
    csv_file = write_csv(tmp_path / "LOC_train_solution.csv", {k: v[2] for k, v in TRAIN.items()})
    assert_same_records(dataset, load_imagenet_loc_csv(csv_file, images, synsets))
    assert [r["image_id"] for r in dataset.records] == sorted(TRAIN)
    assert dataset.name == "xml_train" and dataset.class_names == ["tench", "goldfish", "great white shark"]
    assert dataset.category_ids == [1, 2, 3] and dataset.extra["loc_xml_dir"] == str(annotations)
    first = dataset.records[0]
    assert first["image_id"] == "n01440764_10026" and (first["width"], first["height"]) == (50, 30)
    assert first["file_name"] == str(images / "n01440764" / "n01440764_10026.JPEG")
    # xmin..xmax 0..49 and ymin..ymax 5..29 are inclusive pixel indices: continuous [0, 5, 50, 30]
    assert first["annotations"] == [
        {"bbox": [0.0, 5.0, 50.0, 30.0], "category_id": 0, "iscrowd": 0},
        {"bbox": [10.0, 2.0, 50.0, 21.0], "category_id": 0, "iscrowd": 0},  # x2 61 clipped to the width 50
    ]
    assert dataset.records[1]["annotations"][0]["bbox"] == [3.0, 4.0, 4.0, 5.0]
    assert dataset.records[2]["annotations"][0]["category_id"] == 1


def test_val_layout_absent_images_and_grayscale(tmp_path: Path, caplog):
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text(SYNSETS)
    annotations, images = tmp_path / "Annotations" / "val", tmp_path / "Data" / "val"
    truth = {
        "ILSVRC2012_val_00000001": (40, 30, [("n01484850", 2, 3, 30, 20)]),
        "ILSVRC2012_val_00000002": (32, 24, [("n01443537", 0, 0, 31, 23), ("n01440764", 5, 6, 7, 8)]),
        "ILSVRC2012_val_00000003": (40, 30, [("n01440764", 1, 1, 2, 2)]),  # no image: left out
    }
    for image_id, (width, height, objects) in truth.items():
        write_xml(annotations / f"{image_id}.xml", "val", width, height, objects)
    write_jpeg(images / "ILSVRC2012_val_00000001.JPEG", 40, 30)
    write_jpeg(images / "ILSVRC2012_val_00000002.JPEG", 32, 24, gray=True)
    with caplog.at_level(logging.INFO, logger="detectron_res"):
        dataset = load_imagenet_loc_xml(annotations, images, synsets)
    assert "2 images with 3 boxes" in caplog.text and "(1 annotated images not in" in caplog.text
    assert [r["image_id"] for r in dataset.records] == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]
    csv_file = write_csv(tmp_path / "LOC_val_solution.csv", {k: v[2] for k, v in truth.items()})
    assert_same_records(dataset, load_imagenet_loc_csv(csv_file, images, synsets))
    gray = dataset.records[1]
    assert (gray["width"], gray["height"]) == (32, 24)
    assert [a["bbox"] for a in gray["annotations"]] == [[0.0, 0.0, 32.0, 24.0], [5.0, 6.0, 8.0, 9.0]]
    assert [a["category_id"] for a in gray["annotations"]] == [1, 0]
    assert dataset.name == str(annotations)


def test_unknown_wnid_and_size_mismatch_name_the_file(tmp_path: Path):
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text(SYNSETS)
    images = tmp_path / "Data"
    write_jpeg(images / "v_1.JPEG", 40, 30)
    unknown = tmp_path / "unknown" / "v_1.xml"
    write_xml(unknown, "val", 40, 30, [("n01440764", 1, 1, 5, 5), ("n09999999", 1, 1, 5, 5)])
    with pytest.raises(ValueError, match=r"v_1\.xml.*'n09999999'"):
        load_imagenet_loc_xml(unknown.parent, images, synsets)
    swapped = tmp_path / "swapped" / "v_1.xml"
    write_xml(swapped, "val", 30, 40, [("n01440764", 1, 1, 5, 5)])  # width and height swapped
    with pytest.raises(ValueError, match=r"swapped.v_1\.xml.*<size> is 30x40.*40x30"):
        load_imagenet_loc_xml(swapped.parent, images, synsets)


def test_catalog_falls_back_to_the_xml_layout(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"LOC_val_solution\.csv or .*Annotations.CLS-LOC.val"):
        get_dataset("imagenet_loc_val", root=tmp_path)
    base = tmp_path / "imagenet"
    (base / "LOC_synset_mapping.txt").parent.mkdir()
    (base / "LOC_synset_mapping.txt").write_text(SYNSETS)
    image_id = "ILSVRC2012_val_00000001"
    write_xml(base / "ILSVRC" / "Annotations" / "CLS-LOC" / "val" / f"{image_id}.xml", "val", 16, 12,
              [("n01443537", 1, 1, 8, 8)])  # fmt: skip
    write_jpeg(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"{image_id}.JPEG", 16, 12)
    dataset = get_dataset("imagenet_loc_val", root=tmp_path)
    assert dataset.name == "imagenet_loc_val" and len(dataset) == 1 and "loc_xml_dir" in dataset.extra
    assert dataset.records[0]["annotations"] == [{"bbox": [1.0, 1.0, 9.0, 9.0], "category_id": 1, "iscrowd": 0}]
    with pytest.raises(FileNotFoundError, match=r"imagenet_loc_train.*LOC_train_solution\.csv or "):
        get_dataset("imagenet_loc_train", root=tmp_path)
