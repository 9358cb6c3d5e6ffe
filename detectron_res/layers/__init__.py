"""Thin layers over torch/torchvision: normalisation choice, frozen BatchNorm conversion, RoI pooling."""

from .norm import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm
from .roi_pooler import ROIPooler

__all__ = ["FrozenBatchNorm2d", "ROIPooler", "convert_frozen_batchnorm", "get_norm"]
