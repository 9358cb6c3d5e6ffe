"""Pure tensor post-processing of detections: per-class NMS and top-k (refinement, voting and multi-scale
merging build on these)."""

from .nms import per_class_nms

__all__ = ["per_class_nms"]
