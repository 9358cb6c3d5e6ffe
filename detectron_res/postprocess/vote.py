"""Box voting (Gidaris & Komodakis' iterative localization, as the ResNet paper's Appendix B uses it): each detection
kept by the NMS moves to the score-weighted mean of the candidate boxes of its class that overlap it."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import box_iou


def box_voting(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    pool_boxes: Tensor,
    pool_scores: Tensor,
    pool_labels: Tensor,
    *,
    iou_thresh: float = 0.5,
) -> Tensor:
    """
    Args:
        boxes (D, 4), scores (D,), labels (D,): the detections kept by the NMS, XYXY.
        pool_boxes (P, 4), pool_scores (P,), pool_labels (P,): the candidates that vote, normally every
            (RoI, class) pair that went into the NMS, so each detection's own box is among them.
        iou_thresh: a pool box votes for a detection of the same label when their IoU (torchvision's `box_iou`,
            no +1) is >= this.
    Returns:
        (D, 4): each detection's box replaced by the mean of its voters' boxes weighted by their scores; a detection
        without voters (or whose voters' scores sum to 0) keeps its box. Scores and labels are not changed.
    """
    if len(boxes) == 0 or len(pool_boxes) == 0:
        return boxes.clone()
    # (D, P) weight of pool box p in detection d's vote: its score where it overlaps enough and has d's label
    votes = (box_iou(boxes, pool_boxes) >= iou_thresh) & (labels[:, None] == pool_labels[None, :])
    weights = votes.to(pool_scores.dtype) * pool_scores[None, :]
    total = weights.sum(dim=1, keepdim=True)  # (D, 1)
    voted = (weights @ pool_boxes.to(weights.dtype)) / total.clamp(min=1e-12)  # (D, P) @ (P, 4) -> (D, 4)
    return voted.where(total > 0, boxes).to(boxes.dtype)
