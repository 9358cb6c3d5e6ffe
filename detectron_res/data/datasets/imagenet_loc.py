"""ILSVRC CLS-LOC data in its CSV form (the paper's Appendix C): the synset mapping, the ``LOC_*_solution.csv``
ground truth, and data set records for the detector's data pipeline.

    LOC_synset_mapping.txt   line i (1-based) is class i: ``wnid name, other names``
    LOC_*_solution.csv       ``ImageId,PredictionString``; the string holds groups ``wnid x1 y1 x2 y2``

The boxes of the CSV (as of the ImageNet XMLs) are inclusive 0-based pixel indices: a box covering the whole of a
500-pixel-wide image has x1 = 0 and x2 = 499. Records hold continuous coordinates, ``[x1, y1, x2 + 1, y2 + 1]``.

`load_imagenet_loc_xml` reads the same ground truth from ILSVRC's own layout, one PASCAL-style XML per image
(``Annotations/CLS-LOC/<split>/...``), and makes the same records.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...structures.boxes import usable_ground_truth
from .base import DetectionDataset
from .voc import read_voc_annotation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocGroundTruth:
    """One image's ground truth: each object's class (1-based label) and box (x1, y1, x2, y2) as in the file."""

    labels: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float64


def read_text_file(path: str | os.PathLike, *, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark at its start is dropped, as spreadsheet programs write one),
    line endings as in the file.

    Raises:
        ValueError naming the file and `what` it should be (e.g. "a submission file"): bytes that are not UTF-8, as
        in a binary file.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not a UTF-8 text file (byte 0x{data[error.start]:02x} at offset {error.start}); expected {what}"
        ) from None


def read_synsets(path: str | os.PathLike) -> list[str]:
    """The wnids of LOC_synset_mapping.txt in file order: label i (1-based) is entry i - 1."""
    wnids = []
    for number, line in enumerate(read_text_file(path, what="a synset mapping").splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            raise ValueError(f"{path}, line {number}: empty line in a synset mapping")
        wnids.append(fields[0])
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: a wnid appears twice")
    return wnids


def read_loc_solution(path: str | os.PathLike, synsets: list[str]) -> dict[str, LocGroundTruth]:
    """The ground truth of a LOC_*_solution.csv, by image id, labels numbered as in `synsets`. A UTF-8 byte-order
    mark is allowed; each image has one row, holding all its boxes.

    Raises:
        ValueError naming the file (and line): not UTF-8 text, a wrong header, a malformed row, an unknown wnid, an
        image id on several rows (which ids: one of them would silently lose the other's boxes).
    """
    index = {wnid: number for number, wnid in enumerate(synsets, start=1)}
    truth = {}
    first_line: dict[str, int] = {}
    repeated: dict[str, list[int]] = {}
    text = read_text_file(path, what="a CSV 'ImageId,PredictionString' ground truth (LOC_*_solution.csv)")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None
    header = rows[0] if rows else None
    if header != ["ImageId", "PredictionString"]:
        raise ValueError(f"{path}, line 1: expected the header 'ImageId,PredictionString', got {header!r}")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"{path}, line {number}: expected 'ImageId,PredictionString', got {row!r}")
        tokens = row[1].split()
        if not tokens or len(tokens) % 5:
            raise ValueError(f"{path}, line {number}: expected groups of 'wnid x1 y1 x2 y2', got {row[1]!r}")
        groups = [tokens[i : i + 5] for i in range(0, len(tokens), 5)]
        unknown = [g[0] for g in groups if g[0] not in index]
        if unknown:
            raise ValueError(f"{path}, line {number}: wnid {unknown[0]!r} is not in the synset mapping")
        try:
            boxes = np.array([[float(v) for v in g[1:]] for g in groups], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}, line {number}: a box coordinate is not a number: {row[1]!r}") from None
        labels = np.array([index[g[0]] for g in groups], dtype=np.int64)
        if row[0] in first_line:
            repeated.setdefault(row[0], [first_line[row[0]]]).append(number)
            continue
        first_line[row[0]] = number
        truth[row[0]] = LocGroundTruth(labels=labels, boxes=boxes)
    if repeated:
        shown = [f"{i!r} (lines {', '.join(map(str, lines))})" for i, lines in list(repeated.items())[:3]]
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        raise ValueError(
            f"{path}: {len(repeated)} image id{'s' if len(repeated) > 1 else ''} on several rows: {', '.join(shown)}"
            f"{more}; one row per image, with all its boxes in one PredictionString"
        )
    return truth


def read_synset_names(path: str | os.PathLike) -> list[str]:
    """The first name of each class of LOC_synset_mapping.txt (``tench`` for ``n01440764 tench, Tinca tinca``),
    the wnid where a line has no name."""
    names = []
    for line in read_text_file(path, what="a synset mapping").splitlines():
        fields = line.split(maxsplit=1)
        names.append(fields[1].split(",")[0].strip() if len(fields) > 1 else fields[0])
    return names


def image_candidates(image_dir: Path, image_id: str) -> list[Path]:
    """Where an image may lie: ``<image_dir>/<ImageId>.JPEG``, else ``<image_dir>/<wnid>/<ImageId>.JPEG`` (the
    training layout, ImageId ``<wnid>_<number>``). Public because ``tools/check_data.py`` checks the same places
    the loaders read."""
    return [image_dir / f"{image_id}.JPEG", image_dir / image_id.split("_")[0] / f"{image_id}.JPEG"]


def _find_image(candidates: list[Path]) -> Path | None:
    """The first of `candidates` that is a file, None when none is."""
    return next((path for path in candidates if path.is_file()), None)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image, from its header."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def _loc_record(path: Path, image_id: str, gt: LocGroundTruth, *, height: int, width: int) -> tuple[dict, int]:
    """The record of one image whose ground truth holds inclusive 0-based boxes, and the number of its boxes
    dropped as empty after clipping: boxes become continuous ``[x1, y1, x2 + 1, y2 + 1]`` and go through
    `usable_ground_truth`; category ids are the 0-based labels."""
    continuous = gt.boxes + np.array([0.0, 0.0, 1.0, 1.0])
    boxes, keep = usable_ground_truth(continuous, height=height, width=width)
    record = {
        "file_name": str(path),
        "image_id": image_id,
        "height": height,
        "width": width,
        "annotations": [
            {"bbox": box.tolist(), "category_id": int(label) - 1, "iscrowd": 0}
            for box, label in zip(boxes[keep], gt.labels[keep])
        ],
    }
    return record, int((~keep).sum())


def _loc_dataset(
    name: str, records: list[dict], synsets_file: str | os.PathLike, wnids: list[str], source: dict
) -> DetectionDataset:
    """The data set of ILSVRC LOC records: classes from the synset mapping, `source` (where the ground truth came
    from) added to ``extra``."""
    return DetectionDataset(
        name=name,
        records=records,
        class_names=read_synset_names(synsets_file),
        category_ids=list(range(1, len(wnids) + 1)),
        extra={"wnids": wnids, **source, "synsets": str(synsets_file)},
    )


def load_imagenet_loc_csv(
    csv_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    synsets_file: str | os.PathLike,
    *,
    name: str | None = None,
) -> DetectionDataset:
    """Records of the images of `image_dir` that the CSV annotates: ``<image_dir>/<ImageId>.JPEG``, or
    ``<image_dir>/<wnid>/<ImageId>.JPEG`` for the training layout (ImageId ``<wnid>_<number>``). Rows whose image
    file is absent are left out and counted in the log (e.g. a 200-image sample of the 50,000 val images). Image
    sizes come from the file headers; boxes go through `usable_ground_truth`. Class i - 1 is line i of the synset
    mapping; ``class_names`` are the first names, ``extra["wnids"]`` the wnids.
    """
    wnids = read_synsets(synsets_file)
    truth = read_loc_solution(csv_file, wnids)
    image_dir = Path(image_dir)
    records, absent, dropped = [], 0, 0
    for image_id in sorted(truth):
        path = _find_image(image_candidates(image_dir, image_id))
        if path is None:
            absent += 1
            continue
        height, width = _image_size(path)
        record, record_dropped = _loc_record(path, image_id, truth[image_id], height=height, width=width)
        dropped += record_dropped
        records.append(record)
    logger.info(
        "ILSVRC LOC data set %r: %d images with %d boxes from %s (%d annotated images not in %s; %d boxes dropped "
        "as empty after clipping)",
        name or str(csv_file), len(records), sum(len(r["annotations"]) for r in records), csv_file, absent,
        image_dir, dropped,
    )
    return _loc_dataset(name or str(csv_file), records, synsets_file, wnids, {"loc_csv": str(csv_file)})


def _xml_ground_truth(xml_path: Path, index: dict[str, int]) -> tuple[LocGroundTruth, int | None, int | None]:
    """One ILSVRC box XML: its objects (1-based labels, boxes as in the file: inclusive 0-based pixel indices)
    and the ``<size>`` it states (height, width; None when missing or zero)."""
    annotation = read_voc_annotation(xml_path)  # the boxes exactly as written, unlike `load_voc`'s 1-based shift
    unknown = [obj.name for obj in annotation.objects if obj.name not in index]
    if unknown:
        raise ValueError(f"{xml_path}: wnid {unknown[0]!r} is not in the synset mapping")
    labels = np.array([index[obj.name] for obj in annotation.objects], dtype=np.int64)
    boxes = np.array([obj.bbox for obj in annotation.objects], dtype=np.float64).reshape(-1, 4)
    return LocGroundTruth(labels=labels, boxes=boxes), annotation.height, annotation.width


def load_imagenet_loc_xml(
    annotation_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    synsets_file: str | os.PathLike,
    *,
    name: str | None = None,
) -> DetectionDataset:
    """Records from ILSVRC CLS-LOC's own layout: one PASCAL-style XML per image under `annotation_dir`
    (``Annotations/CLS-LOC/train/<wnid>/<wnid>_<number>.xml``, ``Annotations/CLS-LOC/val/ILSVRC2012_val_<n>.xml``),
    read recursively and sorted by image id (the file stem). The image of ``<annotation_dir>/<path>.xml`` is
    ``<image_dir>/<path>.JPEG``, else ``<image_dir>/<ImageId>.JPEG`` or ``<image_dir>/<wnid>/<ImageId>.JPEG``; XMLs
    whose image is absent are left out (not parsed) and counted in the log. Each object's ``<name>`` is a wnid of
    the synset mapping; its ``<bndbox>`` holds the same inclusive 0-based pixel indices as the CSV form, so the
    records are exactly those `load_imagenet_loc_csv` makes from a CSV with the same numbers. Image sizes come from
    the file headers and must agree with the XML's ``<size>`` where it states one (a missing or zero size is not
    checked). An XML with no object gives a record with no annotations.

    Raises:
        FileNotFoundError: `annotation_dir` is not a folder.
        ValueError: malformed XML, an unknown wnid, a ``<size>`` that disagrees with the image, or two XMLs with
            the same image id; the message names the XML file.
    """
    annotation_dir, image_dir = Path(annotation_dir), Path(image_dir)
    if not annotation_dir.is_dir():
        raise FileNotFoundError(f"ILSVRC annotation folder not found: {annotation_dir}")
    wnids = read_synsets(synsets_file)
    index = {wnid: number for number, wnid in enumerate(wnids, start=1)}
    xml_files: dict[str, Path] = {}
    for xml_path in annotation_dir.rglob("*.xml"):
        if xml_path.stem in xml_files:
            raise ValueError(f"{xml_path}: image id {xml_path.stem!r} is also annotated by {xml_files[xml_path.stem]}")
        xml_files[xml_path.stem] = xml_path
    records, absent, dropped = [], 0, 0
    for image_id in sorted(xml_files):
        xml_path = xml_files[image_id]
        relative = xml_path.relative_to(annotation_dir).with_suffix(".JPEG")
        path = _find_image([image_dir / relative, *image_candidates(image_dir, image_id)])
        if path is None:  # not parsed: a sample of the images need not pay for all 544,546 training XMLs
            absent += 1
            continue
        gt, xml_height, xml_width = _xml_ground_truth(xml_path, index)
        height, width = _image_size(path)
        if xml_height is not None and (xml_height, xml_width) != (height, width):
            raise ValueError(
                f"{xml_path}: <size> is {xml_width}x{xml_height} (width x height) but the image {path} is "
                f"{width}x{height}"
            )
        record, record_dropped = _loc_record(path, image_id, gt, height=height, width=width)
        dropped += record_dropped
        records.append(record)
    logger.info(
        "ILSVRC LOC data set %r: %d images with %d boxes from the XMLs of %s (%d annotated images not in %s; %d "
        "boxes dropped as empty after clipping)",
        name or str(annotation_dir), len(records), sum(len(r["annotations"]) for r in records), annotation_dir,
        absent, image_dir, dropped,
    )
    source = {"loc_xml_dir": str(annotation_dir)}
    return _loc_dataset(name or str(annotation_dir), records, synsets_file, wnids, source)
