"""tools/check_data.py on small COCO, VOC and CLS-LOC folders built here: complete ones pass with one line per data
set; missing, corrupt, truncated and wrongly sized images are each named, in the built-in and the pair forms."""

import ast
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import load_tool, write_voc_annotations

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "coco_r50.yaml")
check_data = load_tool("check_data")


def write_jpeg(path: Path, height: int = 40, width: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[5:30, 10:50] = (30, 160, 220)
    assert cv2.imwrite(str(path), image)


def make_coco(root: Path, count: int = 4) -> None:
    """<root>/coco/annotations/instances_val2017.json with `count` 40 x 60 images in <root>/coco/val2017."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 40, "width": 60} for i in range(1, count + 1)]
    for image in images:
        write_jpeg(root / "coco" / "val2017" / image["file_name"])
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 5, 40, 25], "iscrowd": 0, "area": 1000}
                   for i in range(1, count + 1)]
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    write_voc_annotations(voc, {"000001": [("dog", (10, 10, 50, 60), 0)], "000002": [("cat", (5, 5, 90, 90), 0)]})
    for image_id in ("000001", "000002"):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", 100, 100)
    return voc


def make_loc(root: Path) -> Path:
    """<root>/imagenet in Kaggle's layout: 3 val images in the CSV, 2 classes."""
    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    ids = [f"ILSVRC2012_val_0000000{i}" for i in (1, 2, 3)]
    (base / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{i},n01440764 3 4 30 20 \n" for i in ids))
    for image_id in ids:
        write_jpeg(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"{image_id}.JPEG")
    train_ids = ["n01440764_10026", "n01443537_2"]  # the training layout: train/<wnid>/<wnid>_<n>.JPEG
    (base / "LOC_train_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{i},{i.split('_')[0]} 3 4 30 20 \n" for i in train_ids))
    for image_id in train_ids:
        write_jpeg(base / "ILSVRC" / "Data" / "CLS-LOC" / "train" / image_id.split("_")[0] / f"{image_id}.JPEG")
    return base


def run(capsys, root: Path, train: list[str], test: list[str], *extra: str) -> tuple[int, list[str], str]:
    status = check_data.main(["--cfg", CONFIG, f"DATASETS.ROOT={root}", f"DATASETS.TRAIN=[{','.join(train)}]",
                              f"DATASETS.TEST=[{','.join(test)}]", *extra])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.strip()


def test_complete_coco_voc_and_cls_loc_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DETECTRON_RES_DATASETS", raising=False)
    make_coco(tmp_path)
    voc = make_voc(tmp_path)
    base = make_loc(tmp_path)
    status, lines, err = run(capsys, tmp_path, ["voc_2007_test", "imagenet_loc_val"], ["coco_2017_val"])
    assert (status, err) == (0, "")
    assert lines == [
        f"voc_2007_test: complete, 2 images ({voc}, split test)",
        f"imagenet_loc_val: complete, 3 images ({base / 'LOC_val_solution.csv'}, images in "
        f"{base / 'ILSVRC/Data/CLS-LOC/val'})",
        f"coco_2017_val: complete, 4 images ({tmp_path / 'coco/annotations/instances_val2017.json'}, images in "
        f"{tmp_path / 'coco/val2017'})",
    ]
    # the pair forms name the same files
    pair = f"{tmp_path}/coco/annotations/instances_val2017.json:{tmp_path}/coco/val2017"
    csv_pair = f"{base}/LOC_val_solution.csv:{base}/ILSVRC/Data/CLS-LOC/val"
    status, lines, err = run(capsys, tmp_path, [pair], [csv_pair])
    assert status == 0 and [line.split(" (")[0] for line in lines] == [
        f"{pair}: complete, 4 images", f"{csv_pair}: complete, 3 images"]


def test_incomplete_coco_names_every_bad_image(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DETECTRON_RES_DATASETS", raising=False)
    make_coco(tmp_path, count=5)
    images = tmp_path / "coco" / "val2017"
    (images / "000000000001.jpg").unlink()                                      # missing
    data = (images / "000000000002.jpg").read_bytes()
    (images / "000000000002.jpg").write_bytes(data[: len(data) - 40])           # truncated: no end-of-image marker
    (images / "000000000003.jpg").write_bytes(b"not an image at all")           # unreadable
    write_jpeg(images / "000000000004.jpg", height=41)                          # another size than the json says
    status, lines, err = run(capsys, tmp_path, ["coco_2017_val"], [])
    assert status == 1
    assert err == "check_data.py: error: 1 of 1 data sets incomplete: coco_2017_val"
    assert lines[0].startswith("coco_2017_val: INCOMPLETE, 4 of 5 images cannot be used (1 missing, 1 truncated, "
                               "1 unreadable, 1 wrong size; ")
    assert lines[1:] == [
        f"  missing: {images / '000000000001.jpg'}",
        f"  truncated: truncated JPEG (its data stops before the end-of-image marker): {images / '000000000002.jpg'}",
        f"  unreadable: corrupt or unsupported image: {images / '000000000003.jpg'}",
        f"  wrong size: {images / '000000000004.jpg'}: decoded 41x60 (HxW) but the annotations say 40x60",
    ]
    status, lines, err = run(capsys, tmp_path, ["coco_2017_val"], [], "--show", "1")
    assert status == 1 and lines[1:] == [f"  missing: {images / '000000000001.jpg'}",
                                         "  ... and 3 more (--show 4 lists them all)"]


def test_incomplete_voc_and_cls_loc(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DETECTRON_RES_DATASETS", raising=False)
    voc = make_voc(tmp_path)
    base = make_loc(tmp_path)
    (voc / "JPEGImages" / "000002.jpg").unlink()
    loc_images = base / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    (loc_images / "ILSVRC2012_val_00000001.JPEG").unlink()
    (loc_images / "ILSVRC2012_val_00000003.JPEG").write_bytes(b"")
    status, lines, err = run(capsys, tmp_path, ["imagenet_loc_train"], [])
    assert (status, lines[0].split(" (")[0]) == (0, "imagenet_loc_train: complete, 2 images")
    train_image = base / "ILSVRC/Data/CLS-LOC/train/n01443537/n01443537_2.JPEG"
    train_image.unlink()
    status, lines, err = run(capsys, tmp_path, ["imagenet_loc_train"], [])
    assert (status, lines[1:]) == (1, [f"  missing: {train_image}"])  # the path of its layout is named
    status, lines, err = run(capsys, tmp_path, ["voc_2007_test"], ["imagenet_loc_val"])
    assert status == 1
    assert err == "check_data.py: error: 2 of 2 data sets incomplete: voc_2007_test, imagenet_loc_val"
    assert lines == [
        f"voc_2007_test: INCOMPLETE, 1 of 2 images cannot be used (1 missing; {voc}, split test)",
        f"  missing: {voc / 'JPEGImages/000002.jpg'}",
        f"imagenet_loc_val: INCOMPLETE, 2 of 3 images cannot be used (1 missing, 1 unreadable; "
        f"{base / 'LOC_val_solution.csv'}, images in {loc_images})",
        f"  missing: {loc_images / 'ILSVRC2012_val_00000001.JPEG'}",
        f"  unreadable: corrupt or unsupported image: {loc_images / 'ILSVRC2012_val_00000003.JPEG'}",
    ]


def test_a_data_set_that_cannot_be_read_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DETECTRON_RES_DATASETS", raising=False)
    make_voc(tmp_path)
    status, lines, err = run(capsys, tmp_path, ["voc_2007_test", "coco_2017_val"], [])
    assert status == 1
    assert lines[0] == f"voc_2007_test: complete, 2 images ({tmp_path / 'VOCdevkit/VOC2007'}, split test)"
    coco = tmp_path / "coco"
    assert lines[1] == (f"coco_2017_val: error: data set 'coco_2017_val' needs "
                        f"{coco / 'annotations/instances_val2017.json'} (images in {coco / 'val2017'}); "
                        f"set DATASETS.ROOT or $DETECTRON_RES_DATASETS to the folder holding coco/")
    assert err == "check_data.py: error: 1 of 2 data sets incomplete: coco_2017_val"
    status, lines, err = run(capsys, tmp_path, ["voc_2007"], [])
    assert status == 1 and lines[0].startswith("voc_2007: error: unknown data set 'voc_2007' (did you mean 'voc_2007_")
    status = check_data.main(["--cfg", str(tmp_path / "none.yaml")])
    _, err = capsys.readouterr()
    assert status == 1 and err.startswith("check_data.py: error: ") and "none.yaml" in err and "\n" not in err.strip()


def test_tools_import_no_private_name_of_the_package():
    """A tool using a private helper (check_data.py used imagenet_loc._image_candidates) breaks silently when the
    helper is renamed or changed for its module's own needs: the tools import public names only."""
    private = []
    for tool in sorted((REPO / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(tool.read_text(), filename=str(tool))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "detectron_res":
                private += [f"{tool.name}: {node.module}.{alias.name}" for alias in node.names if alias.name[0] == "_"]
    assert private == []
    assert (REPO / "tools" / "check_data.py").is_file()
