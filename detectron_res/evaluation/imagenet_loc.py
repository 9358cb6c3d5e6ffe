"""The ILSVRC CLS-LOC metric (the paper's Appendix C, Tables 13-14) and the files it reads: the synset mapping, the
ground truth in its CSV form and submission files.

An image is localised correctly when one of its guesses (at most 5; 1 for top-1) has a ground-truth class and an
IoU >= 0.5 with one of that class's ground-truth boxes, the IoU in the devkit's inclusive-pixel convention (+1 in
widths and heights). An image with several ground-truth classes scores the mean over them (the devkit's rule).
The classification error counts the class alone.

A submission has one line per image: up to 5 groups ``label x1 y1 x2 y2``, label in 1..C of the synset mapping
(the ground-truth files are read by ``detectron_res.data.datasets.imagenet_loc``).
"""

from __future__ import annotations

import os

import numpy as np

from ..data.datasets.imagenet_loc import LocGroundTruth, read_loc_solution, read_synsets

__all__ = [
    "LocGroundTruth",
    "evaluate_localization",
    "evaluate_submission_file",
    "format_submission_line",
    "image_errors",
    "inclusive_iou",
    "read_loc_solution",
    "read_submission",
    "read_synsets",
]

MAX_GUESSES = 5
IOU_THRESH = 0.5


def read_submission(
    path: str | os.PathLike, *, num_images: int, num_classes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The guesses of a submission file, one (labels (G,), boxes (G, 4)) per line, G <= 5: the devkit reads the
    first five groups of a line and ignores the rest.

    Raises:
        ValueError naming the line: a wrong number of lines, a label outside 1..num_classes, a malformed group.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != num_images:
        raise ValueError(f"{path}: {len(lines)} lines, but there are {num_images} images (one line per image)")
    guesses = []
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if len(tokens) % 5:
            raise ValueError(
                f"{path}, line {number}: {len(tokens)} numbers, not groups of 5 'label x1 y1 x2 y2': {line!r}"
            )
        try:
            values = np.array([float(t) for t in tokens], dtype=np.float64).reshape(-1, 5)[:MAX_GUESSES]
        except ValueError:
            raise ValueError(f"{path}, line {number}: not a number in {line!r}") from None
        labels = values[:, 0]
        bad = (labels != np.round(labels)) | (labels < 1) | (labels > num_classes) | ~np.isfinite(values).all(axis=1)
        if bad.any():
            group = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}, line {number}: group {group + 1} has label {tokens[5 * group]!r}; labels are the integers "
                f"1..{num_classes} of the synset mapping, boxes finite numbers"
            )
        guesses.append((labels.astype(np.int64), values[:, 1:]))
    return guesses


def inclusive_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (M, 4) boxes in the devkit's convention: a box covers the pixels x1..x2 and y1..y2
    inclusive, so widths and heights are x2 - x1 + 1 and y2 - y1 + 1."""
    widths = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + 1
    heights = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + 1
    intersection = np.clip(widths, 0, None) * np.clip(heights, 0, None)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return intersection / (area + areas - intersection)


def image_errors(labels: np.ndarray, boxes: np.ndarray, truth: LocGroundTruth, *, top: int) -> tuple[float, float]:
    """(localization error, classification error) of one image for its first `top` guesses, each the mean over the
    image's ground-truth classes of 0 (some guess right) or 1."""
    labels, boxes = labels[:top], boxes[:top]
    loc, cls = [], []
    for label in np.unique(truth.labels):
        hits = labels == label
        cls.append(0.0 if hits.any() else 1.0)
        class_boxes = truth.boxes[truth.labels == label]
        found = any(inclusive_iou(box, class_boxes).max() >= IOU_THRESH for box in boxes[hits])
        loc.append(0.0 if found else 1.0)
    return float(np.mean(loc)), float(np.mean(cls))


def evaluate_localization(
    guesses: list[tuple[np.ndarray, np.ndarray]], truth: list[LocGroundTruth]
) -> dict[str, dict[str, float]]:
    """{"loc": {"top1_loc_err", "top5_loc_err", "top5_cls_err", "num_images"}}: mean errors over the images
    (fractions), `guesses[i]` belonging to `truth[i]`."""
    if len(guesses) != len(truth):
        raise ValueError(f"{len(guesses)} submission lines for {len(truth)} images")
    top1 = [image_errors(labels, boxes, t, top=1)[0] for (labels, boxes), t in zip(guesses, truth)]
    top5 = [image_errors(labels, boxes, t, top=MAX_GUESSES) for (labels, boxes), t in zip(guesses, truth)]
    return {
        "loc": {
            "top1_loc_err": float(np.mean(top1)) if top1 else float("nan"),
            "top5_loc_err": float(np.mean([loc for loc, _ in top5])) if top5 else float("nan"),
            "top5_cls_err": float(np.mean([cls for _, cls in top5])) if top5 else float("nan"),
            "num_images": len(truth),
        }
    }


def evaluate_submission_file(
    submission: str | os.PathLike,
    *,
    ground_truth: str | os.PathLike,
    synsets: str | os.PathLike,
    image_list: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Scores a submission file: line i belongs to line i of `image_list` (image ids, e.g.
    ILSVRC2012_val_00000001, a file extension allowed), or without one to the ground truth's ids in sorted order."""
    wnids = read_synsets(synsets)
    truth = read_loc_solution(ground_truth, wnids)
    if image_list is None:
        ids = sorted(truth)
    else:
        with open(image_list, encoding="utf-8") as f:
            ids = [os.path.splitext(line.strip())[0] for line in f if line.strip()]
        missing = [(n, i) for n, i in enumerate(ids, start=1) if i not in truth]
        if missing:
            raise ValueError(f"{image_list}, line {missing[0][0]}: image {missing[0][1]!r} is not in {ground_truth}")
    guesses = read_submission(submission, num_images=len(ids), num_classes=len(wnids))
    return evaluate_localization(guesses, [truth[i] for i in ids])


def format_submission_line(labels: np.ndarray, boxes: np.ndarray) -> str:
    """One submission line: up to 5 groups `label x1 y1 x2 y2`, integer pixels (rounded)."""
    groups = [
        " ".join(str(int(v)) for v in (label, *np.round(box))) for label, box in zip(labels[:MAX_GUESSES], boxes)
    ]
    return " ".join(groups)
