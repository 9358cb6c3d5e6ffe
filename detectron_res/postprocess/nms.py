"""From class-specific boxes and scores to detections: the candidates (score threshold, empty and non-finite boxes
dropped, or detectron2's rule: see `EMPTY_BOX_RULES`), then per-class NMS and the best `max_detections`, optionally
with box voting; and the mask of boxes with a positive area."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .vote import box_voting

# MODEL.ROI_HEADS.EMPTY_BOXES: when the detections whose box is empty (zero width or height, e.g. clipped to the image
# border) are dropped. "before_nms": from the candidates (also after the rescale to the original image), so they never
# take one of the `max_detections` places. "after_rescale": detectron2's rule (fast_rcnn_inference_single_image, then
# detector_postprocess): kept through the NMS and the top-k, dropped only once scaled to the original image and
# clipped, so an image can end with fewer detections; a RoI any of whose boxes or scores is non-finite is dropped whole
# there, where "before_nms" drops only its non-finite (RoI, class) pairs.
EMPTY_BOX_RULES = ("before_nms", "after_rescale")


def nonempty_boxes(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """(R, 4) XYXY -> (R,) mask of boxes whose width and height are both larger than `min_size`."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > min_size) & (heights > min_size)


def detection_candidates(
    boxes: Tensor, scores: Tensor, *, score_thresh: float, empty_boxes: str = "before_nms"
) -> tuple[Tensor, Tensor, Tensor]:
    """
    Args:
        boxes: (R, K, 4) one box per RoI and class, XYXY.
        scores: (R, K) class probabilities (background excluded).
        score_thresh: (RoI, class) pairs scoring at or below this are dropped, and so are non-finite ones.
        empty_boxes: "before_nms": empty boxes (zero width or height, e.g. clipped to the image border) are dropped
            here too. "after_rescale" (detectron2): they are kept (`rescale_detections` drops them after the NMS),
            and a RoI with any non-finite box or score loses all its pairs. See `EMPTY_BOX_RULES`.
    Returns:
        the remaining pairs as boxes (C, 4), scores (C,), labels (C,) int64 class indices, RoI by RoI.
    """
    if empty_boxes == "after_rescale":
        finite_rois = torch.isfinite(boxes).flatten(1).all(dim=1) & torch.isfinite(scores).all(dim=1)
        keep = (scores > score_thresh) & finite_rois[:, None]
        roi_index, labels = keep.nonzero(as_tuple=True)
        return boxes[roi_index, labels], scores[roi_index, labels], labels
    if empty_boxes != "before_nms":
        raise ValueError(f"empty_boxes must be one of {list(EMPTY_BOX_RULES)}, got {empty_boxes!r}")
    keep = (scores > score_thresh) & torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    roi_index, labels = keep.nonzero(as_tuple=True)
    boxes, scores = boxes[roi_index, labels], scores[roi_index, labels]
    nonempty = nonempty_boxes(boxes)
    return boxes[nonempty], scores[nonempty], labels[nonempty]


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    nms_thresh: float,
    max_detections: int,
    vote_iou_thresh: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """
    Args:
        boxes (C, 4), scores (C,), labels (C,): candidates, e.g. from `detection_candidates`.
        nms_thresh: IoU threshold of the NMS, run independently for each label.
        max_detections: detections kept, highest score first; negative keeps all.
        vote_iou_thresh: when given, each kept box is replaced by `box_voting` over all the candidates.
    Returns:
        boxes (D, 4), scores (D,), labels (D,), sorted by descending score.
    """
    keep = batched_nms(boxes, scores, labels, nms_thresh)  # sorted by descending score
    if max_detections >= 0:
        keep = keep[:max_detections]
    kept_boxes, kept_scores, kept_labels = boxes[keep], scores[keep], labels[keep]
    if vote_iou_thresh is not None:
        kept_boxes = box_voting(
            kept_boxes, kept_scores, kept_labels, boxes, scores, labels, iou_thresh=vote_iou_thresh
        )
    return kept_boxes, kept_scores, kept_labels


def per_class_nms(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    empty_boxes: str = "before_nms",
) -> tuple[Tensor, Tensor, Tensor]:
    """`detection_candidates` of (R, K, 4) boxes and (R, K) scores, then `select_detections` without voting:
    boxes (D, 4), scores (D,), labels (D,) int64 class indices, sorted by descending score (with
    ``empty_boxes="after_rescale"`` empty boxes among them, for the rescale to drop)."""
    candidates = detection_candidates(boxes, scores, score_thresh=score_thresh, empty_boxes=empty_boxes)
    return select_detections(*candidates, nms_thresh=nms_thresh, max_detections=max_detections)
