"""The Faster R-CNN C4 model and its builders."""

from .build import (
    build_backbone,
    build_model,
    build_roi_heads,
    build_rpn,
    build_test_time,
    compile_for_inference,
    count_parameters,
    resolve_device,
)
from .detector import FasterRCNN
from .ensemble import DetectorEnsemble
from .test_time import TestTimeAugmentation

__all__ = [
    "DetectorEnsemble",
    "FasterRCNN",
    "TestTimeAugmentation",
    "build_backbone",
    "build_model",
    "build_roi_heads",
    "build_rpn",
    "build_test_time",
    "compile_for_inference",
    "count_parameters",
    "resolve_device",
]
