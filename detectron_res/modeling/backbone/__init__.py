"""The ResNet trunk (stem..res4) and res5, and ImageNet weight loading."""

from .resnet import RESNET_SPECS, ResNetTrunk, build_res5
from .weights import WeightLoadReport, load_resnet_weights, read_resnet_state_dict, read_resnet_weights

__all__ = [
    "RESNET_SPECS",
    "ResNetTrunk",
    "WeightLoadReport",
    "build_res5",
    "load_resnet_weights",
    "read_resnet_state_dict",
    "read_resnet_weights",
]
