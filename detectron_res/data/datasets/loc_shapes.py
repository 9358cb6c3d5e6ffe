"""The synthetic *loc_shapes* data set: one filled shape per image, written in the ILSVRC CLS-LOC CSV form.

It is the offline default of the ImageNet-localization pipeline: small enough to train on a CPU in minutes, and
laid out exactly like Kaggle's ILSVRC CLS-LOC data, so that `load_imagenet_loc_csv` reads it unchanged:

    LOC_synset_mapping.txt                  ``n90000001 circle`` ... ``n90000005 ring`` (fake wnids, 5 classes)
    train/<wnid>/<wnid>_<n>.JPEG            n = 1, 2, ... within the class
    val/LOCSHAPES_val_<00000001>.JPEG
    LOC_{train,val}_solution.csv            ``ImageId,PredictionString``; groups ``wnid x1 y1 x2 y2``
    params.json                             the parameters, written last as the marker of a complete data set

Like ImageNet, every image shows one class: one object covering a large part of a non-square image (width and
height each in [112, 176]), and in about one image in ten a second, non-overlapping object of the same class. The
boxes are inclusive 0-based pixel indices (x2 is the last column of the object), the tight extent of the object's
drawn pixels. Image i of a split has class i % 5, so the classes are balanced. Nothing is ever downloaded: every
image is generated from its own seed (data set seed, split, index), so the same parameters give the same bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .base import DetectionDataset
from .imagenet_loc import load_imagenet_loc_csv
from .shapes import (
    _GAP,
    _POLYGON_SHIFT,
    PARAMS_FILE,
    _apart,
    _background,
    _distinct_colour,
    _shape_mask,
    ensure_generated,
)

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
WNIDS: tuple[str, ...] = tuple(f"n9{k:07d}" for k in range(1, len(CLASS_NAMES) + 1))  # n90000001 ... n90000005
DEFAULT_PARAMS: dict[str, int] = {"num_train": 600, "num_val": 100, "seed": 0}
SPLITS: tuple[str, ...] = ("train", "val")
SYNSETS_FILE = "LOC_synset_mapping.txt"
CSV_HEADER: tuple[str, str] = ("ImageId", "PredictionString")
VAL_PREFIX = "LOCSHAPES_val_"

_FORMAT_VERSION = 1  # bump when the generator changes, so that ensure_loc_shapes regenerates old copies
_IMAGE_SIDE_RANGE = (112, 176)  # width and height, each drawn independently, inclusive
_OBJECT_SIDE_RANGE = (0.3, 0.85)  # object side as a fraction of the shorter image side
_PAIR_SIDE_RANGE = (0.3, 0.45)  # the same, for images with two objects (small enough for both to fit)
_PAIR_FRACTION = 0.1  # share of the images that try to hold a second object of their class
_PLACEMENT_TRIES = 50
_JPEG_QUALITY = 95
_CROSS_ARM = 1 / 3  # arm width of the cross (plus sign) as a fraction of its side
_RING_HOLE = 0.55  # inner radius of the ring as a fraction of its outer radius


@dataclass(frozen=True)
class DrawnImage:
    """One generated image before JPEG compression, with the exact extent of its objects."""

    image: np.ndarray  # (H, W, 3) uint8, RGB
    class_index: int  # 0-based, into CLASS_NAMES / WNIDS
    masks: list[np.ndarray]  # one (H, W) bool mask of the drawn pixels per object
    boxes: list[tuple[int, int, int, int]]  # one inclusive (x1, y1, x2, y2) box per object, tight around its mask


def generate_loc_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = DEFAULT_PARAMS["num_train"],
    num_val: int = DEFAULT_PARAMS["num_val"],
    seed: int = DEFAULT_PARAMS["seed"],
) -> None:
    """Write the loc_shapes data set under ``root`` (layout in the module docstring); ``params.json`` last."""
    params = _validated_params(num_train=num_train, num_val=num_val, seed=seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNSETS_FILE).write_text(
        "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, CLASS_NAMES)), encoding="utf-8"
    )
    for split_code, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        rows = _generate_split(root / split, split=split, split_code=split_code, count=count, seed=seed)
        with open(root / f"LOC_{split}_solution.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            writer.writerows(sorted(rows))
    (root / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")


def ensure_loc_shapes(root: str | os.PathLike, **params: int) -> Path:
    """Return ``root`` after making sure it holds the loc_shapes data set generated with ``params``.

    Generates only when ``root/params.json`` is missing or records other parameters (``DEFAULT_PARAMS`` fill the
    ones not given). Generation happens in a temporary sibling folder that is renamed to ``root`` when complete,
    so an interrupted run never leaves a data set that looks complete.
    """
    return ensure_generated(
        root, params, kind="loc_shapes", defaults=DEFAULT_PARAMS, validate=_validated_params,
        generate=generate_loc_shapes,
    )


def load_loc_shapes(root: str | os.PathLike, split: str, *, name: str) -> DetectionDataset:
    """Load one split (``"train"`` or ``"val"``) of a loc_shapes data set generated under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown loc_shapes split {split!r}; known: {list(SPLITS)}")
    root = Path(root)
    return load_imagenet_loc_csv(root / f"LOC_{split}_solution.csv", root / split, root / SYNSETS_FILE, name=name)


def draw_image(rng: np.random.Generator, class_index: int) -> DrawnImage:
    """One RGB image of class ``class_index``: a random size, a background from `_background`, one object (two,
    non-overlapping, in about ``_PAIR_FRACTION`` of the images) of a colour distinct from its surroundings."""
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    width, height = (int(value) for value in rng.integers(_IMAGE_SIDE_RANGE[0], _IMAGE_SIDE_RANGE[1] + 1, size=2))
    image = _background(rng, max(width, height))[:height, :width].copy()  # a crop of a square background

    wants_pair = rng.random() < _PAIR_FRACTION
    side_range = _PAIR_SIDE_RANGE if wants_pair else _OBJECT_SIDE_RANGE
    occupied = [_random_square(rng, side_range, width, height)]  # (x0, y0, side) of the squares holding objects
    if wants_pair:
        for _ in range(_PLACEMENT_TRIES):
            candidate = _random_square(rng, side_range, width, height)
            if _apart(candidate, occupied[0]):
                occupied.append(candidate)
                break  # no room after all the tries: the image keeps a single object

    masks: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []
    for x0, y0, side in occupied:
        mask = _loc_shape_mask(rng, CLASS_NAMES[class_index], side)
        surrounding = image[max(y0 - _GAP, 0) : y0 + side + _GAP, max(x0 - _GAP, 0) : x0 + side + _GAP]
        colour = _distinct_colour(rng, surrounding)
        image[y0 : y0 + side, x0 : x0 + side][mask] = colour
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + side, x0 : x0 + side] = mask
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes.append((x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]), y0 + int(rows[-1])))
        masks.append(full)
    return DrawnImage(image=image, class_index=class_index, masks=masks, boxes=boxes)


def _validated_params(*, num_train: int, num_val: int, seed: int) -> dict[str, int]:
    values = {"num_train": num_train, "num_val": num_val, "seed": seed}
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"loc_shapes parameter {key} must be an int, got {value!r}")
    for key in ("num_train", "num_val"):
        if values[key] < 1:
            raise ValueError(f"loc_shapes parameter {key} must be >= 1, got {values[key]}")
    if seed < 0:
        raise ValueError(f"loc_shapes parameter seed must be >= 0, got {seed}")
    return {"format_version": _FORMAT_VERSION, **{key: int(value) for key, value in values.items()}}


def _generate_split(image_dir: Path, *, split: str, split_code: int, count: int, seed: int) -> list[list[str]]:
    """Write the images of one split; return its CSV rows ``[ImageId, PredictionString]`` in image order."""
    rows: list[list[str]] = []
    for index in range(count):
        class_index = index % len(CLASS_NAMES)
        wnid = WNIDS[class_index]
        if split == "train":
            image_id = f"{wnid}_{index // len(CLASS_NAMES) + 1}"
            folder = image_dir / wnid
        else:
            image_id = f"{VAL_PREFIX}{index + 1:08d}"
            folder = image_dir
        folder.mkdir(parents=True, exist_ok=True)
        drawn = draw_image(np.random.default_rng([seed, split_code, index]), class_index)
        path = folder / f"{image_id}.JPEG"
        if not cv2.imwrite(str(path), drawn.image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]):
            raise OSError(f"could not write {path}")
        rows.append([image_id, " ".join(f"{wnid} {x1} {y1} {x2} {y2}" for x1, y1, x2, y2 in drawn.boxes)])
    return rows


def _random_square(
    rng: np.random.Generator, side_range: tuple[float, float], width: int, height: int
) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of a square lying fully inside the image, its side a fraction of the shorter side."""
    side = round(rng.uniform(*side_range) * min(width, height))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    return x0, y0, side


def _loc_shape_mask(rng: np.random.Generator, shape: str, side: int) -> np.ndarray:
    """A boolean ``side x side`` mask holding one filled shape: shapes.py's three, plus a cross and a ring."""
    if shape == "ring":  # an annulus: the filled circle of `_shape_mask` with a hole in the middle
        canvas = np.zeros((side, side), dtype=np.uint8)
        radius = (side - 1) // 2
        cv2.circle(canvas, (radius, radius), radius, 1, thickness=-1)
        cv2.circle(canvas, (radius, radius), max(round(_RING_HOLE * radius), 1), 0, thickness=-1)
        return canvas.astype(bool)
    if shape == "cross":  # a plus sign at a random angle, scaled like the polygons of `_shape_mask`
        canvas = np.zeros((side, side), dtype=np.uint8)
        a, b = _CROSS_ARM / 2, 0.5  # half the arm width, half the arm length
        outline = np.array(
            [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]
        )
        angle = rng.uniform(0, 2 * math.pi)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        vertices = outline @ rotation.T
        vertices -= vertices.min(axis=0)
        vertices *= (side - 1) / vertices.max()
        fixed_point = np.round(vertices * (1 << _POLYGON_SHIFT)).astype(np.int32)
        cv2.fillPoly(canvas, [fixed_point], 1, lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)
        return canvas.astype(bool)
    return _shape_mask(rng, shape, side)
