"""Load a COCO-format instances json into a :class:`DetectionDataset` of XYXY records."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from numbers import Real

import numpy as np

from detectron_res.structures.boxes import usable_ground_truth, xywh_to_xyxy

from .base import DetectionDataset

logger = logging.getLogger(__name__)

_MAX_LISTED_MISSING = 5


def load_coco_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    name: str,
    check_files: bool = True,
) -> DetectionDataset:
    """Read a COCO instances json and return its images as records (see ``base.py``).

    Categories sorted by their COCO id become the contiguous classes ``0..K-1``. Boxes go through
    :func:`~detectron_res.structures.boxes.usable_ground_truth` (the rule evaluation applies too): partly outside
    their image they are clipped to it; malformed (not 4 numbers), non-finite or empty after clipping they are
    dropped. The counts are logged in one line and kept in ``extra["clipped_boxes"]`` and
    ``extra["dropped_boxes"]``. Images without annotations are kept with an empty list.

    Args:
        json_file: path of the COCO json.
        image_root: folder the images' ``file_name`` entries are relative to.
        name: the data set's name, stored in the result.
        check_files: raise if an image listed in the json does not exist on disk.

    Raises:
        FileNotFoundError: the json, or (with ``check_files``) some of its images, do not exist.
        ValueError: the json is malformed or an annotation refers to an unknown category or image.
    """
    json_path = os.fspath(json_file)
    image_root = os.fspath(image_root)
    data = _read_json(json_path)

    category_ids, class_names = _parse_categories(data["categories"], json_path)
    contiguous_id = {category_id: index for index, category_id in enumerate(category_ids)}
    records = _parse_images(data["images"], json_path, image_root)
    record_index = {record["image_id"]: index for index, record in enumerate(records)}

    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{json_path}: 'annotations' must be a list, got {type(annotations).__name__}")

    owners: list[int] = []
    xywh: list[list[float]] = []
    classes: list[int] = []
    crowd: list[int] = []
    malformed = 0
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ValueError(f"{json_path}: annotation #{position} is not an object")
        ann_id = ann.get("id", f"#{position}")
        image_id = ann.get("image_id")
        if image_id not in record_index:
            raise ValueError(
                f"{json_path}: annotation {ann_id} refers to image_id {image_id!r}, which is not in 'images'"
            )
        category_id = ann.get("category_id")
        if category_id not in contiguous_id:
            raise ValueError(
                f"{json_path}: annotation {ann_id} has category_id {category_id!r}, which is not in 'categories' "
                f"(known ids: {category_ids})"
            )
        bbox = ann.get("bbox")
        if not _is_four_numbers(bbox):
            malformed += 1
            continue
        owners.append(record_index[image_id])
        xywh.append([float(value) for value in bbox])
        classes.append(contiguous_id[category_id])
        crowd.append(int(bool(ann.get("iscrowd", 0))))

    heights = np.array([record["height"] for record in records], dtype=np.float64)
    widths = np.array([record["width"] for record in records], dtype=np.float64)
    owner_array = np.array(owners, dtype=np.int64)
    boxes = xywh_to_xyxy(np.array(xywh, dtype=np.float64).reshape(-1, 4))
    clipped, keep = usable_ground_truth(boxes, height=heights[owner_array], width=widths[owner_array])
    was_clipped = keep & np.any(clipped != boxes, axis=1)
    num_clipped = int(was_clipped.sum())
    num_dropped = malformed + int((~keep).sum())

    for index in np.flatnonzero(keep):
        records[owners[index]]["annotations"].append(
            {"bbox": clipped[index].tolist(), "category_id": classes[index], "iscrowd": crowd[index]}
        )

    if check_files:
        _check_files_exist(records, json_path, image_root)

    num_boxes = int(keep.sum())
    num_crowd = int(np.array(crowd, dtype=np.int64)[keep].sum()) if num_boxes else 0
    logger.info(
        "Data set %r: %d images, %d boxes (%d crowd), %d classes from %s; clipped %d boxes to their image, "
        "dropped %d degenerate or malformed boxes",
        name, len(records), num_boxes, num_crowd, len(class_names), json_path, num_clipped, num_dropped,
    )
    return DetectionDataset(
        name=name,
        records=records,
        class_names=class_names,
        category_ids=category_ids,
        json_file=json_path,
        extra={"image_root": image_root, "clipped_boxes": num_clipped, "dropped_boxes": num_dropped},
    )


def _read_json(json_path: str) -> dict:
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"COCO annotation file not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: a COCO json must be an object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_path}: a COCO json needs a list under {key!r}")
    return data


def _parse_categories(categories: list, json_path: str) -> tuple[list[int], list[str]]:
    by_id: dict[int, str] = {}
    for position, category in enumerate(categories):
        if not (isinstance(category, dict) and _is_int(category.get("id")) and isinstance(category.get("name"), str)):
            raise ValueError(f"{json_path}: category #{position} needs an int 'id' and a str 'name', got {category!r}")
        if category["id"] in by_id:
            raise ValueError(f"{json_path}: category id {category['id']} appears twice")
        by_id[category["id"]] = category["name"]
    if not by_id:
        raise ValueError(f"{json_path}: 'categories' is empty")
    category_ids = sorted(by_id)
    return category_ids, [by_id[category_id] for category_id in category_ids]


def _parse_images(images: list, json_path: str, image_root: str) -> list[dict]:
    records: list[dict] = []
    seen: set = set()
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            raise ValueError(f"{json_path}: image #{position} is not an object")
        missing = [key for key in ("id", "file_name", "height", "width") if key not in image]
        if missing:
            raise ValueError(f"{json_path}: image #{position} ({image.get('id')!r}) lacks {missing}")
        image_id = image["id"]
        if not (_is_int(image_id) or isinstance(image_id, str)):
            raise ValueError(f"{json_path}: image #{position} has an id that is not an int: {image_id!r}")
        if image_id in seen:
            raise ValueError(f"{json_path}: image id {image_id!r} appears twice")
        seen.add(image_id)
        height, width = image["height"], image["width"]
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise ValueError(f"{json_path}: image {image_id!r} has an invalid size height={height!r} width={width!r}")
        records.append(
            {
                "file_name": os.path.join(image_root, image["file_name"]),
                "image_id": image_id,
                "height": height,
                "width": width,
                "annotations": [],
            }
        )
    return records


def _check_files_exist(records: list[dict], json_path: str, image_root: str) -> None:
    """Raise if some image files are missing; lists each folder once rather than stat-ing every file."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_folder[os.path.dirname(record["file_name"])].append(record["file_name"])
    missing: list[str] = []
    for folder, files in by_folder.items():
        try:
            names = set(os.listdir(folder or "."))
        except OSError:
            names = set()
        missing.extend(path for path in files if os.path.basename(path) not in names)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED_MISSING])
        more = f" and {len(missing) - _MAX_LISTED_MISSING} more" if len(missing) > _MAX_LISTED_MISSING else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(records)} images listed in {json_path} are missing under {image_root}: "
            f"{shown}{more}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_four_numbers(bbox: object) -> bool:
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(value, Real) and not isinstance(value, bool) for value in bbox)
    )
