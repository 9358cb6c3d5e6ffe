"""Small pure helpers for axis-aligned boxes held as numpy arrays (conversion, clipping, validity), and the one rule
for ground-truth boxes that training and evaluation share (`usable_ground_truth`)."""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Convert (N, 4) ``[x, y, w, h]`` boxes (COCO) to ``[x1, y1, x2, y2]`` as float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def clip_boxes(
    boxes: np.ndarray, *, height: float | np.ndarray, width: float | np.ndarray
) -> np.ndarray:
    """Clip (N, 4) XYXY boxes to the image ``[0, width] x [0, height]`` (a new float64 array).

    ``height`` and ``width`` are either one image size for all boxes or (N,) arrays, one per box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width_limit, height_limit = np.broadcast_arrays(
        np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    )
    limits = np.stack([width_limit, height_limit, width_limit, height_limit], axis=-1)
    return np.minimum(np.maximum(boxes, 0.0), limits)


def finite_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boolean (N,) mask of the (N, 4) boxes whose four coordinates are all finite."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.isfinite(boxes).all(axis=1)


def nonempty_boxes(boxes: np.ndarray, *, min_side: float = 0.0) -> np.ndarray:
    """Boolean (N,) mask of the (N, 4) XYXY boxes whose width and height both exceed ``min_side``.

    Boxes with a non-finite coordinate count as empty.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore"):
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        return finite_boxes(boxes) & (widths > min_side) & (heights > min_side)


def usable_ground_truth(
    boxes: np.ndarray, *, height: float | np.ndarray, width: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The rule every ground-truth box goes through, in training (the data set loaders) and in evaluation (the COCO
    and VOC ground truth): a box with a non-finite coordinate is dropped; the others are clipped to their image
    ``[0, width] x [0, height]``; a box empty after clipping (x2 <= x1 or y2 <= y1: a negative width or height, or a
    box lying outside its image) is dropped.

    Args:
        boxes: (N, 4) XYXY boxes.
        height, width: the image size, one for all boxes or (N,) arrays.
    Returns:
        the clipped boxes (N, 4) float64 and the (N,) mask of the boxes kept.
    """
    with np.errstate(invalid="ignore"):
        clipped = clip_boxes(boxes, height=height, width=width)
    return clipped, nonempty_boxes(clipped)
