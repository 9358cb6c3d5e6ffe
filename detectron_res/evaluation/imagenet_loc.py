"""The ILSVRC CLS-LOC metric (the paper's Appendix C, Tables 13-14) and the files it reads: the synset mapping, the
ground truth in its CSV form and submission files.

An image is localised correctly when one of its guesses (at most 5; 1 for top-1) has a ground-truth class and an
IoU >= 0.5 with one of that class's ground-truth boxes, the IoU in the devkit's inclusive-pixel convention (+1 in
widths and heights). An image with several ground-truth classes scores the mean over them (the devkit's rule).
The classification error counts the class alone.

A submission has one line per image: up to 5 groups ``label x1 y1 x2 y2``, label in 1..C of the synset mapping
(the ground-truth files are read by ``detectron_res.data.datasets.imagenet_loc``); or, in the CSV form that
``tools/localize.py --csv-out`` writes, one row ``ImageId,PredictionString`` per image, the string holding groups
``wnid x1 y1 x2 y2``. Every file is read as UTF-8 (a byte-order mark allowed); a file that is not text, an image
listed twice, an image id on two rows and an empty list of images are errors naming the file.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from ..data.datasets.imagenet_loc import LocGroundTruth, read_loc_solution, read_synsets, read_text_file

__all__ = [
    "LocGroundTruth",
    "evaluate_localization",
    "evaluate_submission_file",
    "format_submission_line",
    "image_errors",
    "inclusive_iou",
    "is_submission_csv",
    "read_image_list",
    "read_loc_solution",
    "read_submission",
    "read_submission_csv",
    "read_synsets",
]

MAX_GUESSES = 5
IOU_THRESH = 0.5


def _parse_guesses(values: np.ndarray, tokens: list[str], *, where: str, num_classes: int, label_of) -> np.ndarray:
    """Checks one line's (G, 5) groups ``label x1 y1 x2 y2`` (already floats); `label_of(g)` is group g's label as
    written. Raises a ValueError naming `where` and the group at fault: a non-finite coordinate, or a label that is
    not an integer in 1..num_classes."""
    finite = np.isfinite(values[:, 1:]).all(axis=1)
    if not finite.all():
        group = int(np.flatnonzero(~finite)[0])
        written = tokens[5 * group + 1 : 5 * group + 5]
        coordinate = next(t for t, v in zip(written, values[group, 1:]) if not np.isfinite(v))
        raise ValueError(
            f"{where}: group {group + 1} has the box coordinate {coordinate!r}; box coordinates are finite numbers"
        )
    labels = values[:, 0]
    bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 1) | (labels > num_classes)
    if bad.any():
        group = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: group {group + 1} has label {label_of(group)!r}; labels are the integers 1..{num_classes} of "
            "the synset mapping"
        )
    return values


def read_submission(
    path: str | os.PathLike, *, num_images: int, num_classes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The guesses of a submission file, one (labels (G,), boxes (G, 4)) per line, G <= 5: the devkit reads the
    first five groups of a line and ignores the rest.

    Raises:
        ValueError naming the file (and line): not UTF-8 text, a wrong number of lines, a label outside
        1..num_classes, a box coordinate that is not a finite number, a malformed group.
    """
    lines = read_text_file(path, what="a submission file (lines of 'label x1 y1 x2 y2' groups)").splitlines()
    if len(lines) != num_images:
        raise ValueError(f"{path}: {len(lines)} lines, but there are {num_images} images (one line per image)")
    guesses = []
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        where = f"{path}, line {number}"
        if len(tokens) % 5:
            raise ValueError(f"{where}: {len(tokens)} numbers, not groups of 5 'label x1 y1 x2 y2': {line!r}")
        try:
            values = np.array([float(t) for t in tokens], dtype=np.float64).reshape(-1, 5)[:MAX_GUESSES]
        except ValueError:
            raise ValueError(f"{where}: not a number in {line!r}") from None
        values = _parse_guesses(values, tokens, where=where, num_classes=num_classes, label_of=lambda g: tokens[5 * g])
        guesses.append((values[:, 0].astype(np.int64), values[:, 1:]))
    return guesses


def is_submission_csv(path: str | os.PathLike) -> bool:
    """Whether a submission file is in the CSV form (its first line starts with the header's ``ImageId,``), as
    ``tools/localize.py --csv-out`` writes it; else it is the devkit's text form."""
    with open(path, "rb") as f:
        start = f.read(64)
    return start.removeprefix(b"\xef\xbb\xbf").startswith(b"ImageId,")


def read_submission_csv(
    path: str | os.PathLike, *, wnids: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The guesses of a submission in the CSV form ``ImageId,PredictionString`` (`write_submission_csv`'s), by
    image id: (labels (G,), boxes (G, 4)), labels 1-based in `wnids`' order, the first five groups
    ``wnid x1 y1 x2 y2`` of a row; an empty PredictionString is an image without guesses.

    Raises:
        ValueError naming the file and line: not UTF-8 text, a wrong header, a malformed row or group, an unknown
        wnid, a coordinate that is not a finite number, an image id on two rows.
    """
    index = {wnid: number for number, wnid in enumerate(wnids, start=1)}
    text = read_text_file(path, what="a CSV 'ImageId,PredictionString' submission")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None
    if not rows or rows[0] != ["ImageId", "PredictionString"]:
        header = rows[0] if rows else None
        raise ValueError(f"{path}, line 1: expected the header 'ImageId,PredictionString', got {header!r}")
    guesses: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    found_at: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        where = f"{path}, line {number}"
        if len(row) != 2 or not row[0]:
            raise ValueError(f"{where}: expected 'ImageId,PredictionString', got {row!r}")
        if row[0] in found_at:
            raise ValueError(f"{where}: image {row[0]!r} already on line {found_at[row[0]]}")
        found_at[row[0]] = number
        tokens = row[1].split()
        if len(tokens) % 5:
            raise ValueError(f"{where}: {len(tokens)} values, not groups of 5 'wnid x1 y1 x2 y2': {row[1]!r}")
        tokens = tokens[: 5 * MAX_GUESSES]
        unknown = [tokens[i] for i in range(0, len(tokens), 5) if tokens[i] not in index]
        if unknown:
            raise ValueError(f"{where}: wnid {unknown[0]!r} is not in the synset mapping")
        try:
            values = np.array(
                [[index[t] if i % 5 == 0 else float(t) for i, t in enumerate(tokens)]], dtype=np.float64
            ).reshape(-1, 5)
        except ValueError:
            raise ValueError(f"{where}: a box coordinate is not a number: {row[1]!r}") from None
        values = _parse_guesses(values, tokens, where=where, num_classes=len(wnids), label_of=lambda g: tokens[5 * g])
        guesses[row[0]] = (values[:, 0].astype(np.int64), values[:, 1:])
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


def read_image_list(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, image id) of each image of an image list, one id a line (a file extension is dropped, blank
    lines skipped).

    Raises:
        ValueError naming the file (and lines): not UTF-8 text, no id at all, an id on two lines (one image would
        go unscored and its line be judged against another image's truth).
    """
    numbered, found_at = [], {}
    for number, line in enumerate(read_text_file(path, what="an image list (one image id a line)").splitlines(), 1):
        if not line.strip():
            continue
        image_id = os.path.splitext(line.strip())[0]
        if image_id in found_at:
            raise ValueError(f"{path}, line {number}: image {image_id!r} is already on line {found_at[image_id]}")
        found_at[image_id] = number
        numbered.append((number, image_id))
    if not numbered:
        raise ValueError(f"{path}: no image ids: there is nothing to score")
    return numbered


def evaluate_submission_file(
    submission: str | os.PathLike,
    *,
    ground_truth: str | os.PathLike,
    synsets: str | os.PathLike,
    image_list: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Scores a submission file, of the text form or the CSV form (`is_submission_csv`).

    Text form: line i belongs to line i of `image_list` (image ids, e.g. ILSVRC2012_val_00000001, a file extension
    allowed), or without one to the ground truth's ids in sorted order. CSV form: each row names its image; the
    images scored are those of `image_list`, or without one every image of the ground truth, and each must have
    exactly one row (a row of an image not scored is an error too).

    Raises:
        ValueError naming the file: the readers' errors (`read_submission`, `read_submission_csv`,
        `read_loc_solution`, `read_image_list`), an image of the list that the ground truth lacks, nothing to score.
    """
    wnids = read_synsets(synsets)
    truth = read_loc_solution(ground_truth, wnids)
    if image_list is None:
        ids = sorted(truth)
        if not ids:
            raise ValueError(f"{ground_truth}: no images: there is nothing to score")
    else:
        numbered = read_image_list(image_list)
        missing = [(n, i) for n, i in numbered if i not in truth]
        if missing:
            raise ValueError(f"{image_list}, line {missing[0][0]}: image {missing[0][1]!r} is not in {ground_truth}")
        ids = [i for _, i in numbered]
    if is_submission_csv(submission):
        rows = read_submission_csv(submission, wnids=wnids)
        absent = [i for i in ids if i not in rows]
        if absent:
            where = f"of {image_list}" if image_list is not None else f"of the ground truth {ground_truth}"
            raise ValueError(
                f"{submission}: no row for image {absent[0]!r} ({len(absent)} of the {len(ids)} images {where} "
                "lack one)" + ("; to score a subset, pass its ids with --image-list" if image_list is None else "")
            )
        wanted = set(ids)
        extra = [i for i in rows if i not in wanted]
        if extra:
            where = f"in {image_list}" if image_list is not None else f"in the ground truth {ground_truth}"
            rows_text = "1 such row" if len(extra) == 1 else f"{len(extra)} such rows"
            raise ValueError(f"{submission}: image {extra[0]!r} is not {where} ({rows_text})")
        guesses = [rows[i] for i in ids]
    else:
        guesses = read_submission(submission, num_images=len(ids), num_classes=len(wnids))
    return evaluate_localization(guesses, [truth[i] for i in ids])


def format_submission_line(labels: np.ndarray, boxes: np.ndarray) -> str:
    """One submission line: up to 5 groups `label x1 y1 x2 y2`, integer pixels (rounded)."""
    groups = [
        " ".join(str(int(v)) for v in (label, *np.round(box))) for label, box in zip(labels[:MAX_GUESSES], boxes)
    ]
    return " ".join(groups)
