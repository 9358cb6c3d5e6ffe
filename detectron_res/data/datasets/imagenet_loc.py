"""ILSVRC CLS-LOC data in its CSV form (the paper's Appendix C): the synset mapping, the ``LOC_*_solution.csv``
ground truth, and data set records for the detector's data pipeline.

    LOC_synset_mapping.txt   line i (1-based) is class i: ``wnid name, other names``
    LOC_*_solution.csv       ``ImageId,PredictionString``; the string holds groups ``wnid x1 y1 x2 y2``

The boxes of the CSV (as of the ImageNet XMLs) are inclusive 0-based pixel indices: a box covering the whole of a
500-pixel-wide image has x1 = 0 and x2 = 499. Records hold continuous coordinates, ``[x1, y1, x2 + 1, y2 + 1]``.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...structures.boxes import usable_ground_truth
from .base import DetectionDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocGroundTruth:
    """One image's ground truth: each object's class (1-based label) and box (x1, y1, x2, y2) as in the file."""

    labels: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float64


def read_synsets(path: str | os.PathLike) -> list[str]:
    """The wnids of LOC_synset_mapping.txt in file order: label i (1-based) is entry i - 1."""
    wnids = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split(maxsplit=1)
            if not fields:
                raise ValueError(f"{path}, line {number}: empty line in a synset mapping")
            wnids.append(fields[0])
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: a wnid appears twice")
    return wnids


def read_loc_solution(path: str | os.PathLike, synsets: list[str]) -> dict[str, LocGroundTruth]:
    """The ground truth of a LOC_*_solution.csv, by image id, labels numbered as in `synsets`."""
    index = {wnid: number for number, wnid in enumerate(synsets, start=1)}
    truth = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}, line 1: expected the header 'ImageId,PredictionString', got {header!r}")
        for number, row in enumerate(rows, start=2):
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
            truth[row[0]] = LocGroundTruth(labels=labels, boxes=boxes)
    return truth


def read_synset_names(path: str | os.PathLike) -> list[str]:
    """The first name of each class of LOC_synset_mapping.txt (``tench`` for ``n01440764 tench, Tinca tinca``),
    the wnid where a line has no name."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=1)
            names.append(fields[1].split(",")[0].strip() if len(fields) > 1 else fields[0])
    return names


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
        path = image_dir / f"{image_id}.JPEG"
        if not path.is_file():
            path = image_dir / image_id.split("_")[0] / f"{image_id}.JPEG"
        if not path.is_file():
            absent += 1
            continue
        with Image.open(path) as image:
            width, height = image.size
        gt = truth[image_id]
        continuous = gt.boxes + np.array([0.0, 0.0, 1.0, 1.0])
        boxes, keep = usable_ground_truth(continuous, height=height, width=width)
        dropped += int((~keep).sum())
        records.append(
            {
                "file_name": str(path),
                "image_id": image_id,
                "height": height,
                "width": width,
                "annotations": [
                    {"bbox": box.tolist(), "category_id": int(label) - 1, "iscrowd": 0}
                    for box, label in zip(boxes[keep], gt.labels[keep])
                ],
            }
        )
    logger.info(
        "ILSVRC LOC data set %r: %d images with %d boxes from %s (%d annotated images not in %s; %d boxes dropped "
        "as empty after clipping)",
        name or str(csv_file), len(records), sum(len(r["annotations"]) for r in records), csv_file, absent,
        image_dir, dropped,
    )
    return DetectionDataset(
        name=name or str(csv_file),
        records=records,
        class_names=read_synset_names(synsets_file),
        category_ids=list(range(1, len(wnids) + 1)),
        extra={"wnids": wnids, "loc_csv": str(csv_file), "synsets": str(synsets_file)},
    )
