"""ILSVRC CLS-LOC submissions (the paper's Appendix C): the detector's boxes turned into the devkit's pixels and
written as a submission file or in the CSV form of ``LOC_*_solution.csv``.

Inside the package boxes are continuous ``[x1, y1, x2, y2)`` (a box over the whole of a W-wide image is
``[0, W]``); the ILSVRC files hold inclusive 0-based integer pixels (the same box is ``x1 = 0, x2 = W - 1``).
`inclusive_boxes` converts, inverting the data reader's ``(a, b) -> (a, b + 1)``.

Two forms are written, both atomically (`detectron_res.utils.io.atomic_write_text`):

    submission.txt   line i belongs to image i of the image list: up to 5 groups ``label x1 y1 x2 y2``, labels
                     1-based in synset-mapping order (read by `detectron_res.evaluation.imagenet_loc`); an image
                     without guesses is an empty line
    submission.csv   ``ImageId,PredictionString``, the string holding groups ``wnid x1 y1 x2 y2`` (the form of
                     ``LOC_*_solution.csv``, read back by ``read_submission_csv`` and scored by
                     ``evaluate_submission_file``); an image without guesses has an empty PredictionString, which
                     ``read_loc_solution`` (a ground-truth reader) and ``read_class_predictions`` refuse
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..evaluation.imagenet_loc import MAX_GUESSES, format_submission_line
from ..utils.io import atomic_write_text

__all__ = ["inclusive_boxes", "write_submission", "write_submission_csv"]

Guesses = tuple["np.ndarray | torch.Tensor | Sequence[int]", "np.ndarray | torch.Tensor | Sequence[Sequence[int]]"]


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def inclusive_boxes(boxes, *, width: int, height: int) -> np.ndarray:
    """Continuous ``[x1, y1, x2, y2)`` boxes (G, 4) (numpy or torch) of a ``width`` x ``height`` image as the
    devkit's inclusive integer pixels, (G, 4) int64.

    ``x1 = round(x1)`` and ``x2 = round(x2) - 1`` (numpy's rounding: halves go to the even integer, 10.5 -> 10,
    11.5 -> 12), the same for y; then x clipped to [0, width - 1] and y to [0, height - 1], and ``x2 >= x1``,
    ``y2 >= y1`` enforced, so an empty or inverted box (or one wholly outside the image) becomes a one-pixel-wide
    (or -high) box at its clipped x1 (y1). ``[0, 0, W, H]`` gives ``[0, 0, W - 1, H - 1]``.

    Raises:
        ValueError: boxes not of shape (G, 4), a coordinate that is not finite, a width or height below 1.
    """
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"the image size must be positive integers, got width={width!r}, height={height!r}")
    array = _as_numpy(boxes).astype(np.float64)
    if array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (G, 4), got {array.shape}")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"box {bad} has a coordinate that is not finite: {array[bad].tolist()}")
    rounded = np.round(array)
    x1 = np.clip(rounded[:, 0], 0, width - 1)
    y1 = np.clip(rounded[:, 1], 0, height - 1)
    x2 = np.maximum(np.clip(rounded[:, 2] - 1, 0, width - 1), x1)
    y2 = np.maximum(np.clip(rounded[:, 3] - 1, 0, height - 1), y1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


def _checked_guesses(index: int, guesses: Guesses, *, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One image's (labels (G,), inclusive boxes (G, 4)) as int64 arrays, or a ValueError naming the line."""
    where = f"submission line {index + 1} (image index {index})"
    try:
        labels, boxes = guesses
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a pair (labels, boxes), got {type(guesses).__name__}") from None
    labels = _as_numpy(labels)
    boxes = _as_numpy(boxes)
    if labels.size == 0:
        labels = labels.reshape(0)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if labels.ndim != 1 or boxes.ndim != 2 or boxes.shape[1] != 4 or len(labels) != len(boxes):
        raise ValueError(f"{where}: expected labels (G,) and boxes (G, 4), got {labels.shape} and {boxes.shape}")
    if len(labels) > MAX_GUESSES:
        raise ValueError(f"{where}: {len(labels)} guesses, at most {MAX_GUESSES} per image")
    for name, values in (("label", labels), ("box coordinate", boxes)):
        numeric = np.issubdtype(values.dtype, np.number)
        if not numeric or not np.isfinite(values).all() or (values != np.round(values)).any():
            raise ValueError(
                f"{where}: a {name} is not an integer ({values.tolist()}); boxes must be inclusive integer pixels "
                "(see inclusive_boxes)"
            )
    labels = labels.astype(np.int64)
    boxes = boxes.astype(np.int64)
    top = num_classes if num_classes is not None else np.inf
    if ((labels < 1) | (labels > top)).any():
        bad = labels[(labels < 1) | (labels > top)][0]
        allowed = f"1..{num_classes}" if num_classes is not None else "1-based"
        raise ValueError(f"{where}: label {bad} is not a {allowed} label of the synset mapping")
    if (boxes < 0).any() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        bad = boxes[((boxes < 0).any(axis=1)) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])][0]
        raise ValueError(
            f"{where}: box {bad.tolist()} is not an inclusive pixel box (0 <= x1 <= x2, 0 <= y1 <= y2)"
        )
    return labels, boxes


def write_submission(path: str | os.PathLike, lines: Sequence[Guesses]) -> None:
    """Writes a devkit submission file atomically: line i holds ``lines[i] = (labels, boxes)``, labels 1-based ints
    (G,) and boxes inclusive integer pixels (G, 4) (from `inclusive_boxes`), G <= 5, as groups
    ``label x1 y1 x2 y2`` (`format_submission_line`); every line ends with a newline, and an image without guesses
    (G = 0) is an empty line, which ``read_submission`` reads as no guesses.

    Raises:
        ValueError naming the line (1-based) and image index (0-based): more than 5 guesses, a label below 1, a
        coordinate that is not an integer, a box with x2 < x1 or y2 < y1 or a negative coordinate, labels and
        boxes of different lengths. Nothing is written then.
    """
    text = []
    for index, guesses in enumerate(lines):
        labels, boxes = _checked_guesses(index, guesses, num_classes=None)
        text.append(format_submission_line(labels, boxes) + "\n")
    atomic_write_text(path, "".join(text))


def write_submission_csv(
    path: str | os.PathLike, image_ids: Sequence[str], lines: Sequence[Guesses], *, wnids: Sequence[str]
) -> None:
    """Writes the CSV form ``ImageId,PredictionString`` atomically: a header, then one row per image in the given
    order, ``image_ids[i]`` with the groups ``wnid x1 y1 x2 y2`` of ``lines[i] = (labels, boxes)`` (labels 1-based
    into ``wnids``, boxes inclusive integer pixels, at most 5), single spaces between values. The file reads back
    with ``read_submission_csv(path, wnids=wnids)``, and with ``read_loc_solution(path, wnids)`` and
    ``read_class_predictions``, except that an image without guesses gets an empty PredictionString, which those
    two refuse.

    Raises:
        ValueError: ``image_ids`` and ``lines`` of different lengths, an empty or repeated image id, and the errors
        of `write_submission` (naming the line of ``lines``), a label outside 1..len(wnids) included.
    """
    if len(image_ids) != len(lines):
        raise ValueError(f"{len(image_ids)} image ids but {len(lines)} lines of guesses")
    seen: dict[str, int] = {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "PredictionString"])
    for index, (image_id, guesses) in enumerate(zip(image_ids, lines)):
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"image index {index}: the image id must be a non-empty string, got {image_id!r}")
        if image_id in seen:
            raise ValueError(f"image index {index}: image id {image_id!r} already at index {seen[image_id]}")
        seen[image_id] = index
        labels, boxes = _checked_guesses(index, guesses, num_classes=len(wnids))
        groups = [" ".join([wnids[label - 1], *map(str, box)]) for label, box in zip(labels.tolist(), boxes.tolist())]
        writer.writerow([image_id, " ".join(groups)])
    atomic_write_text(path, buffer.getvalue())
