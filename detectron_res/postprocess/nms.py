"""Per-class NMS over class-specific boxes: score threshold, NMS per class, best `max_detections` overall; and the
mask of boxes with a positive area."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def nonempty_boxes(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """(R, 4) XYXY -> (R,) mask of boxes whose width and height are both larger than `min_size`."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > min_size) & (heights > min_size)


def per_class_nms(
    boxes: Tensor, scores: Tensor, *, score_thresh: float, nms_thresh: float, max_detections: int
) -> tuple[Tensor, Tensor, Tensor]:
    """
    Args:
        boxes: (R, K, 4) one box per RoI and class, XYXY.
        scores: (R, K) class probabilities (background excluded).
        score_thresh: (RoI, class) pairs scoring at or below this are dropped, and so are empty boxes (zero width
            or height, e.g. clipped to the image border) and non-finite ones.
        nms_thresh: IoU threshold of the NMS, run independently for each class.
        max_detections: detections kept, highest score first; negative keeps all.
    Returns:
        boxes (D, 4), scores (D,), labels (D,) int64 class indices, sorted by descending score.
    """
    keep = (scores > score_thresh) & torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    roi_index, labels = keep.nonzero(as_tuple=True)
    boxes, scores = boxes[roi_index, labels], scores[roi_index, labels]
    nonempty = nonempty_boxes(boxes)
    boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
    keep = batched_nms(boxes, scores, labels, nms_thresh)  # sorted by descending score
    if max_detections >= 0:
        keep = keep[:max_detections]
    return boxes[keep], scores[keep], labels[keep]
