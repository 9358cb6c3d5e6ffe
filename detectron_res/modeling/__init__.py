"""The Faster R-CNN C4 model and its builders."""

from .build import build_backbone, build_model, build_roi_heads, build_rpn, count_parameters, resolve_device
from .detector import FasterRCNN

__all__ = [
    "FasterRCNN",
    "build_backbone",
    "build_model",
    "build_roi_heads",
    "build_rpn",
    "count_parameters",
    "resolve_device",
]
