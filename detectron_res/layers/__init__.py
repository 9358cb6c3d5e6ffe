"""Thin layers over torch/torchvision: normalisation choice, frozen BatchNorm conversion, RoI pooling (with a
vectorised RoIAlign for the CPU)."""

from .norm import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm
from . import roi_align
from .roi_pooler import ROIPooler

__all__ = ["FrozenBatchNorm2d", "ROIPooler", "convert_frozen_batchnorm", "get_norm", "roi_align"]
