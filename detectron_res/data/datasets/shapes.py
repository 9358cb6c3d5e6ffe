"""The synthetic *shapes* data set: filled circles, squares and triangles, generated offline as COCO json + PNG.

It is the project's built-in default for smoke tests and demos; nothing is ever downloaded. Every image is
generated from its own seed (data set seed, split, index), so the same parameters always give the same data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ...utils.io import build_folder_atomically
from .base import DetectionDataset
from .coco import load_coco_json

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_PARAMS: dict[str, int] = {"num_train": 1000, "num_val": 200, "image_size": 256, "seed": 0}
SPLITS: tuple[str, ...] = ("train", "val")
PARAMS_FILE = "params.json"

_FORMAT_VERSION = 1  # bump when the generator changes, so that ensure_shapes regenerates old copies
_MIN_IMAGE_SIZE = 32
_OBJECT_SIDE_RANGE = (0.16, 0.45)  # object side as a fraction of the image side
_MAX_OBJECTS = 4
_PLACEMENT_TRIES = 50
_GAP = 2  # pixels kept free between the squares that hold two objects
_MIN_COLOUR_DISTANCE = 48  # per-channel distance that an object colour keeps from every nearby background pixel
_POLYGON_SHIFT = 4  # fractional bits of the polygon vertices given to cv2.fillPoly


def generate_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = DEFAULT_PARAMS["num_train"],
    num_val: int = DEFAULT_PARAMS["num_val"],
    image_size: int = DEFAULT_PARAMS["image_size"],
    seed: int = DEFAULT_PARAMS["seed"],
) -> None:
    """Write the shapes data set under ``root``.

    Layout: ``root/{train,val}/NNNNNN.png``, ``root/annotations/instances_{train,val}.json`` and, written
    last as the marker of a complete data set, ``root/params.json``. Images are ``image_size`` square with
    1-4 non-overlapping objects; each box is the tight extent of the object's drawn pixels.
    """
    params = _validated_params(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_code, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        coco = _generate_split(image_dir, split_code=split_code, count=count, image_size=image_size, seed=seed)
        coco["info"]["description"] = f"detectron_res synthetic shapes, {split} split"
        coco["info"]["params"] = params
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    (root / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")


def ensure_shapes(root: str | os.PathLike, **params: int) -> Path:
    """Return ``root`` after making sure it holds the shapes data set generated with ``params``.

    Generates only when ``root/params.json`` is missing or records other parameters (defaults fill the
    ones not given). Generation happens in a temporary sibling folder that is renamed to ``root`` when
    complete, so an interrupted run never leaves a data set that looks complete.
    """
    return ensure_generated(
        root, params, kind="shapes", defaults=DEFAULT_PARAMS, validate=_validated_params, generate=generate_shapes
    )


def ensure_generated(
    root: str | os.PathLike,
    params: dict[str, int],
    *,
    kind: str,
    defaults: dict[str, int],
    validate: Callable[..., dict[str, int]],
    generate: Callable[..., None],
) -> Path:
    """``root`` after making sure it holds the `kind` data set made by ``generate(folder, **wanted)``, the wanted
    parameters being ``validate(**defaults updated with params)``. Generates only when ``root/params.json`` (which
    ``generate`` writes last) is missing or records other parameters, atomically (`build_folder_atomically`)."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} parameters {unknown}; known: {sorted(defaults)}")
    wanted = validate(**{**defaults, **params})
    root = Path(root)
    if _read_params(root) == wanted:
        return root
    logger.info("Generating the %s data set in %s with %s", kind, root, wanted)
    return build_folder_atomically(
        root,
        lambda folder: generate(folder, **{key: wanted[key] for key in defaults}),
        done=lambda: _read_params(root) == wanted,  # another process finished the same data set first
    )


def load_shapes(root: str | os.PathLike, split: str, *, name: str) -> DetectionDataset:
    """Load one split (``"train"`` or ``"val"``) of a shapes data set generated under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; known: {list(SPLITS)}")
    root = Path(root)
    return load_coco_json(root / "annotations" / f"instances_{split}.json", root / split, name=name)


def _validated_params(*, num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, int]:
    values = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"shapes parameter {key} must be an int, got {value!r}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"shapes image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"shapes image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"shapes seed must be >= 0, got {seed}")
    return {"format_version": _FORMAT_VERSION, **{key: int(value) for key, value in values.items()}}


def _read_params(root: Path) -> dict | None:
    try:
        return json.loads((root / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _generate_split(image_dir: Path, *, split_code: int, count: int, image_size: int, seed: int) -> dict:
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        image, objects = _draw_image(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write {image_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for class_index, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(CLASS_NAMES)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, list[int], int]]]:
    """One RGB image and its objects as ``(class index, COCO [x, y, w, h] tight box, pixel area)``."""
    image = _background(rng, size)
    occupied: list[tuple[int, int, int]] = []  # (x0, y0, side) of the squares holding the objects
    objects: list[tuple[int, list[int], int]] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _ in range(_PLACEMENT_TRIES):
            side = int(round(rng.uniform(*_OBJECT_SIDE_RANGE) * size))
            x0, y0 = (int(value) for value in rng.integers(0, size - side + 1, size=2))
            if all(_apart((x0, y0, side), other) for other in occupied):
                break
        else:
            continue
        occupied.append((x0, y0, side))
        class_index = int(rng.integers(len(CLASS_NAMES)))
        mask = _shape_mask(rng, CLASS_NAMES[class_index], side)
        surrounding = image[max(y0 - _GAP, 0) : y0 + side + _GAP, max(x0 - _GAP, 0) : x0 + side + _GAP]
        colour = _distinct_colour(rng, surrounding)
        image[y0 : y0 + side, x0 : x0 + side][mask] = colour
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        bbox = [x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        objects.append((class_index, bbox, int(mask.sum())))
    return image, objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = int(rng.integers(3))
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    if kind == 0:  # plain
        return np.broadcast_to(base.astype(np.uint8), (size, size, 3)).copy()
    if kind == 1:  # linear gradient between two colours in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        other = rng.uniform(0, 255, size=3).astype(np.float32)
        coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
        ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        pixels = base + (other - base) * ramp[..., None]
        return (pixels + 0.5).astype(np.uint8)  # stays within [0, 255]: a convex mix of two colours
    sigma = np.float32(rng.uniform(4, 16))  # plain colour with Gaussian noise
    pixels = base + sigma * rng.standard_normal(size=(size, size, 3), dtype=np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _apart(box: tuple[int, int, int], other: tuple[int, int, int]) -> bool:
    (x0, y0, side), (u0, v0, other_side) = box, other
    return (
        x0 + side + _GAP <= u0 or u0 + other_side + _GAP <= x0 or y0 + side + _GAP <= v0 or v0 + other_side + _GAP <= y0
    )


def _shape_mask(rng: np.random.Generator, shape: str, side: int) -> np.ndarray:
    """A boolean ``side x side`` mask holding one filled shape that touches the mask's borders."""
    canvas = np.zeros((side, side), dtype=np.uint8)
    if shape == "circle":
        radius = (side - 1) // 2
        cv2.circle(canvas, (radius, radius), radius, 1, thickness=-1)
        return canvas.astype(bool)
    corners = 4 if shape == "square" else 3
    angles = rng.uniform(0, 2 * math.pi) + np.arange(corners) * (2 * math.pi / corners)
    vertices = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    vertices -= vertices.min(axis=0)
    vertices *= (side - 1) / vertices.max()
    fixed_point = np.round(vertices * (1 << _POLYGON_SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [fixed_point], 1, lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)
    return canvas.astype(bool)


def _distinct_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least ``_MIN_COLOUR_DISTANCE`` away (in some channel) from every background pixel."""
    pixels = background.reshape(-1, 3).astype(np.int16)
    colour = rng.integers(0, 256, size=3)
    for _ in range(100):
        if np.abs(pixels - colour.astype(np.int16)).max(axis=1).min() >= _MIN_COLOUR_DISTANCE:
            break
        colour = rng.integers(0, 256, size=3)
    else:  # a very varied background: take the colour farthest from it in some channel
        colour = np.where(pixels.mean(axis=0) < 128, 255, 0)
    return colour.astype(np.uint8)
