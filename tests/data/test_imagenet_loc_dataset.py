"""ILSVRC CLS-LOC records from the CSV form: the real val sample (sizes from the headers, inclusive boxes made
continuous, grayscale JPEGs decoded to 3 channels), the training layout with wnid folders, CMYK JPEGs, absent
images, and the catalog names."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron_res.data.datasets import get_dataset, load_imagenet_loc_csv
from detectron_res.data.datasets.imagenet_loc import image_candidates
from detectron_res.data.mapper import DatasetMapper, read_image_rgb


def test_the_real_val_sample(shared_data):
    root = shared_data("ilsvrc2012_val_sample")
    dataset = load_imagenet_loc_csv(root / "LOC_val_solution.csv", root / "images", root / "LOC_synset_mapping.txt")
    assert len(dataset) == 200 and dataset.num_classes == 1000
    assert dataset.class_names[:2] == ["tench", "goldfish"] and dataset.extra["wnids"][0] == "n01440764"
    first = dataset.records[0]
    assert first["image_id"] == "ILSVRC2012_val_00000001" and (first["width"], first["height"]) == (500, 375)
    # CSV "n01751748 111 108 441 193": inclusive pixels 111..441 -> continuous [111, 108, 442, 194]
    assert first["annotations"] == [{"bbox": [111.0, 108.0, 442.0, 194.0], "category_id": 65, "iscrowd": 0}]
    assert dataset.class_names[65] == "sea snake"
    assert any(len(r["annotations"]) > 1 for r in dataset.records)
    gray = next(r for r in dataset.records if r["image_id"] == "ILSVRC2012_val_00000034")
    image = read_image_rgb(gray["file_name"])  # a grayscale JPEG
    assert image.shape == (gray["height"], gray["width"], 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    mapped = DatasetMapper(min_size=224, max_size=1000, is_train=False)(gray)
    assert mapped["image"].shape[0] == 3 and mapped["gt_boxes"].shape == (1, 4)


def test_image_candidates_flat_then_wnid_folder():
    """The places the loaders try, in order (tools/check_data.py checks the same ones)."""
    root = Path("imgs")
    assert image_candidates(root, "n01440764_10026") == [
        Path("imgs/n01440764_10026.JPEG"), Path("imgs/n01440764/n01440764_10026.JPEG")
    ]
    assert image_candidates(root, "ILSVRC2012_val_00000001") == [
        Path("imgs/ILSVRC2012_val_00000001.JPEG"), Path("imgs/ILSVRC2012/ILSVRC2012_val_00000001.JPEG")
    ]


def test_training_layout_cmyk_images_and_absent_files(tmp_path: Path):
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n001 cat, house cat\nn002 dog\n")
    train = tmp_path / "train"
    (train / "n001").mkdir(parents=True)
    (train / "n002").mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(train / "n001" / "n001_1.JPEG", quality=95)
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(train / "n002" / "n002_7.JPEG", quality=95)  # red in CMYK
    csv_file = tmp_path / "LOC_train_solution.csv"
    csv_file.write_text(
        "ImageId,PredictionString\n"
        "n001_1,n001 0 0 39 29 n001 5 5 60 60 \n"  # the second box reaches past the image: clipped
        "n002_7,n002 2 1 9 8 \n"
        "n002_9,n002 1 1 5 5 \n"  # no such file: left out
    )
    dataset = load_imagenet_loc_csv(csv_file, train, synsets, name="tiny")
    assert [r["image_id"] for r in dataset.records] == ["n001_1", "n002_7"]
    assert dataset.class_names == ["cat", "dog"] and dataset.category_ids == [1, 2]
    assert [a["bbox"] for a in dataset.records[0]["annotations"]] == [[0.0, 0.0, 40.0, 30.0], [5.0, 5.0, 40.0, 30.0]]
    assert dataset.records[1]["annotations"][0] == {"bbox": [2.0, 1.0, 10.0, 9.0], "category_id": 1, "iscrowd": 0}
    cmyk = read_image_rgb(dataset.records[1]["file_name"])
    assert cmyk.shape == (10, 20, 3)
    red, green, blue = cmyk[5, 10].astype(int)
    assert red > 200 and green < 60 and blue < 60, cmyk[5, 10]


def test_catalog_names_read_the_kaggle_layout(tmp_path: Path):
    base = tmp_path / "imagenet"
    (base / "ILSVRC" / "Data" / "CLS-LOC" / "val").mkdir(parents=True)
    (base / "LOC_synset_mapping.txt").write_text("n001 cat\n")
    Image.new("L", (16, 12), 128).save(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "v_1.JPEG")
    (base / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv_1,n001 1 1 8 8 \n")
    dataset = get_dataset("imagenet_loc_val", root=tmp_path)
    assert dataset.name == "imagenet_loc_val" and len(dataset) == 1
    with pytest.raises(FileNotFoundError, match=r"imagenet_loc_train.*LOC_train_solution\.csv"):
        get_dataset("imagenet_loc_train", root=tmp_path)
    assert np.isclose(dataset.records[0]["annotations"][0]["bbox"][2], 9.0)


def test_an_image_on_two_rows_of_the_csv_is_refused_for_training_and_a_bom_is_read(tmp_path: Path):
    """Issue 21, item 8: with an image on two rows the last one won, so the image trained without its first box."""
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n001 cat\nn002 dog\n")
    (tmp_path / "train" / "n001").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "train" / "n001" / "n001_1.JPEG", quality=95)
    csv_file = tmp_path / "LOC_train_solution.csv"
    csv_file.write_text("ImageId,PredictionString\nn001_1,n001 0 0 9 9 \nn001_1,n001 20 10 29 19 \n")
    with pytest.raises(ValueError) as info:
        load_imagenet_loc_csv(csv_file, tmp_path / "train", synsets)
    assert str(info.value) == (
        f"{csv_file}: 1 image id on several rows: 'n001_1' (lines 2, 3); one row per image, with all its boxes in one "
        "PredictionString"
    )
    # the same boxes on one row, saved with a UTF-8 byte-order mark: both boxes kept
    csv_file.write_bytes(b"\xef\xbb\xbfImageId,PredictionString\r\nn001_1,n001 0 0 9 9 n001 20 10 29 19\r\n")
    synsets.write_bytes(b"\xef\xbb\xbfn001 cat\r\nn002 dog\r\n")
    dataset = load_imagenet_loc_csv(csv_file, tmp_path / "train", synsets)
    assert dataset.extra["wnids"] == ["n001", "n002"] and dataset.class_names == ["cat", "dog"]
    assert [a["bbox"] for a in dataset.records[0]["annotations"]] == [[0.0, 0.0, 10.0, 10.0], [20.0, 10.0, 30.0, 20.0]]
