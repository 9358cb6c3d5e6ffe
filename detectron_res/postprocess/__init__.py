"""Pure tensor post-processing of detections: candidates, per-class NMS and top-k, box voting, and the scale choice
of multi-scale testing."""

from .multiscale import adjacent_scale_pairs, pyramid_max_size
from .nms import EMPTY_BOX_RULES, detection_candidates, nonempty_boxes, per_class_nms, select_detections
from .vote import box_voting

__all__ = [
    "EMPTY_BOX_RULES",
    "adjacent_scale_pairs",
    "box_voting",
    "detection_candidates",
    "nonempty_boxes",
    "per_class_nms",
    "pyramid_max_size",
    "select_detections",
]
