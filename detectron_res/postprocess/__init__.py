"""Pure tensor post-processing of detections: per-class NMS and top-k (refinement, voting and multi-scale
merging build on these)."""

from .nms import nonempty_boxes, per_class_nms

__all__ = ["nonempty_boxes", "per_class_nms"]
