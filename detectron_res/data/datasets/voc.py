"""PASCAL VOC loader: a VOCdevkit folder (``ImageSets/Main``, ``Annotations``, ``JPEGImages``) to records.

Box convention (the same as detectron2's): the XML holds 1-based inclusive pixel indices
``xmin, ymin, xmax, ymax``; records hold 0-based continuous coordinates
``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (so a one pixel box ``xmin == xmax`` has width 1).
The devkit metric (``detectron_res.evaluation.voc``) applies the inverse ``xmin = x1 + 1, ..., xmax = x2``.
"""

from __future__ import annotations

import functools
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.structures.boxes import usable_ground_truth

__all__ = [
    "VOC_CLASSES",
    "VOCObject",
    "VOCAnnotation",
    "read_voc_annotation",
    "read_voc_split",
    "load_voc",
    "voc_dataset_names",
]

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
_YEARS = ("2007", "2012")
_SPLITS = ("trainval", "train", "val", "test")


@dataclass(frozen=True)
class VOCObject:
    """One ``<object>`` of an annotation file, box exactly as written (devkit 1-based inclusive pixels)."""

    name: str
    bbox: tuple[float, float, float, float]
    difficult: int
    truncated: int


@dataclass(frozen=True)
class VOCAnnotation:
    """One annotation file; ``height``/``width`` are None when ``<size>`` is missing or zero."""

    height: int | None
    width: int | None
    objects: list[VOCObject]


def _flag(obj: ET.Element, tag: str, xml_path: Path) -> int:
    """A 0/1 flag such as ``<difficult>``; a missing or empty tag counts as 0."""
    node = obj.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return 0
    try:
        value = int(float(node.text.strip()))
    except ValueError:
        raise ValueError(f"{xml_path}: <{tag}> is {node.text.strip()!r}, expected 0 or 1") from None
    if value not in (0, 1):
        raise ValueError(f"{xml_path}: <{tag}> is {value}, expected 0 or 1")
    return value


def _size(root: ET.Element, xml_path: Path) -> tuple[int | None, int | None]:
    size = root.find("size")
    if size is None:
        return None, None
    values = []
    for tag in ("height", "width"):
        node = size.find(tag)
        if node is None or node.text is None or not node.text.strip():
            return None, None
        try:
            values.append(int(float(node.text.strip())))
        except ValueError:
            raise ValueError(f"{xml_path}: <size><{tag}> is {node.text.strip()!r}, not a number") from None
    if values[0] <= 0 or values[1] <= 0:
        return None, None
    return values[0], values[1]


def read_voc_annotation(xml_path: str | Path) -> VOCAnnotation:
    """Parse one VOC annotation file (``xml.etree``); boxes are returned unchanged (1-based, inclusive).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the XML is malformed, or an object lacks its name or a box coordinate, or a value is
            not a number; the message names the file.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"malformed VOC annotation XML {xml_path}: {err}") from None
    height, width = _size(root, xml_path)
    objects = []
    for index, obj in enumerate(root.findall("object")):
        name_node = obj.find("name")
        if name_node is None or name_node.text is None or not name_node.text.strip():
            raise ValueError(f"{xml_path}: <object> #{index} has no <name>")
        name = name_node.text.strip()
        box_node = obj.find("bndbox")
        if box_node is None:
            raise ValueError(f"{xml_path}: <object> #{index} ({name}) has no <bndbox>")
        coords = []
        for tag in _BOX_TAGS:
            node = box_node.find(tag)
            if node is None or node.text is None:
                raise ValueError(f"{xml_path}: <object> #{index} ({name}) has no <bndbox><{tag}>")
            try:
                coords.append(float(node.text.strip()))
            except ValueError:
                raise ValueError(
                    f"{xml_path}: <object> #{index} ({name}) <{tag}> is {node.text.strip()!r}, not a number"
                ) from None
        objects.append(
            VOCObject(
                name=name,
                bbox=(coords[0], coords[1], coords[2], coords[3]),
                difficult=_flag(obj, "difficult", xml_path),
                truncated=_flag(obj, "truncated", xml_path),
            )
        )
    return VOCAnnotation(height=height, width=width, objects=objects)


def read_voc_split(voc_root: str | Path, split: str) -> list[str]:
    """Image ids listed in ``voc_root/ImageSets/Main/{split}.txt`` (first token of each non-empty line).

    Raises:
        FileNotFoundError: the split file does not exist.
        ValueError: the split file lists no image or an image twice.
    """
    split_file = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"VOC split file not found: {split_file}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"VOC split file {split_file} lists no image")
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"VOC split file {split_file} lists image {image_id!r} more than once")
        seen.add(image_id)
    return ids


def _voc_year(voc_root: Path) -> int | None:
    match = re.fullmatch(r"VOC(\d{4})", voc_root.resolve().name)
    return int(match.group(1)) if match else None


def load_voc(
    voc_root: str | Path,
    split: str,
    *,
    name: str,
    class_names: Sequence[str] = VOC_CLASSES,
    check_files: bool = True,
) -> DetectionDataset:
    """Load one split of a VOC year folder (e.g. ``VOCdevkit/VOC2007``) as a :class:`DetectionDataset`.

    Each annotation keeps the ``difficult`` and ``truncated`` flags (0/1) and ``iscrowd = 0``. Boxes go through
    :func:`~detectron_res.structures.boxes.usable_ground_truth`, the rule evaluation applies too: a box reaching
    outside the image is clipped to it (counted in ``extra["clipped_boxes"]``); a non-finite box or one with no
    area left after clipping (``x2 <= x1`` or ``y2 <= y1``) is dropped (counted in ``extra["dropped_boxes"]``, not
    in ``clipped_boxes``). One summary line is logged per data set.

    Args:
        voc_root: the folder holding ``ImageSets``, ``Annotations`` and ``JPEGImages``.
        split: name of the file ``ImageSets/Main/{split}.txt``.
        name: the data set's name (stored in the result).
        class_names: the classes, in contiguous index order; ``category_ids`` are ``1..K``.
        check_files: also require each ``JPEGImages/{id}.jpg`` to exist.

    Raises:
        FileNotFoundError: the split file, an annotation file or (with ``check_files`` or when the XML has no
            image size) an image is missing.
        ValueError: malformed XML, or an object whose class is not in ``class_names``.
    """
    voc_root = Path(voc_root)
    class_names = list(class_names)
    class_index = {class_name: i for i, class_name in enumerate(class_names)}
    records = []
    clipped = dropped = num_boxes = num_difficult = 0
    for image_id in read_voc_split(voc_root, split):
        xml_path = voc_root / "Annotations" / f"{image_id}.xml"
        image_path = voc_root / "JPEGImages" / f"{image_id}.jpg"
        annotation = read_voc_annotation(xml_path)
        if check_files and not image_path.is_file():
            raise FileNotFoundError(f"VOC image not found: {image_path}")
        height, width = annotation.height, annotation.width
        if height is None or width is None:
            if not image_path.is_file():
                raise FileNotFoundError(f"{xml_path} has no <size> and its image is missing: {image_path}")
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
        for obj in annotation.objects:
            if obj.name not in class_index:
                raise ValueError(f"{xml_path}: class {obj.name!r} is not one of the {len(class_names)} class names")
        boxes = np.array([obj.bbox for obj in annotation.objects], dtype=np.float64).reshape(-1, 4)
        boxes -= np.array([1.0, 1.0, 0.0, 0.0])
        inside, keep = usable_ground_truth(boxes, height=height, width=width)
        dropped += int((~keep).sum())
        clipped += int((keep & np.any(inside != boxes, axis=1)).sum())
        annotations = []
        for obj, box, kept in zip(annotation.objects, inside.tolist(), keep.tolist()):
            if not kept:
                continue
            num_boxes += 1
            num_difficult += obj.difficult
            annotations.append(
                {
                    "bbox": box,
                    "category_id": class_index[obj.name],
                    "iscrowd": 0,
                    "difficult": obj.difficult,
                    "truncated": obj.truncated,
                }
            )
        records.append(
            {
                "file_name": str(image_path),
                "image_id": image_id,
                "height": int(height),
                "width": int(width),
                "annotations": annotations,
            }
        )
    extra: dict = {"voc_root": str(voc_root), "split": split}
    year = _voc_year(voc_root)
    if year is not None:
        extra["year"] = year
    extra["clipped_boxes"] = clipped
    extra["dropped_boxes"] = dropped
    log = logger.warning if clipped or dropped else logger.info
    log(
        "%s: %d images, %d boxes (%d difficult) from %s split %r; %d boxes clipped to the image, "
        "%d degenerate boxes dropped",
        name, len(records), num_boxes, num_difficult, voc_root, split, clipped, dropped,
    )  # fmt: skip
    return DetectionDataset(
        name=name,
        records=records,
        class_names=class_names,
        category_ids=list(range(1, len(class_names) + 1)),
        extra=extra,
    )


def _load_named(root: str | Path, *, name: str, year: str, split: str) -> DetectionDataset:
    """Reads ``root/VOCdevkit/VOC{year}``, or ``root/VOC{year}`` when the root holds the year folders directly."""
    candidates = [Path(root) / "VOCdevkit" / f"VOC{year}", Path(root) / f"VOC{year}"]
    for voc_root in candidates:
        if (voc_root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            return load_voc(voc_root, split, name=name)
    raise FileNotFoundError(
        f"data set {name!r} needs {candidates[0]} (or {candidates[1]}) holding ImageSets/Main/{split}.txt, "
        "Annotations/ and JPEGImages/; set DATASETS.ROOT or $DETECTRON_RES_DATASETS to the folder that holds it"
    )


def voc_dataset_names() -> dict[str, Callable[[str | Path], DetectionDataset]]:
    """``voc_{year}_{split}`` -> loader taking the data root; it reads ``root/VOCdevkit/VOC{year}`` (or ``root/VOC{year}``).

    Years 2007 and 2012, splits ``trainval``, ``train``, ``val`` and ``test``.
    """
    return {
        f"voc_{year}_{split}": functools.partial(_load_named, name=f"voc_{year}_{split}", year=year, split=split)
        for year in _YEARS
        for split in _SPLITS
    }
