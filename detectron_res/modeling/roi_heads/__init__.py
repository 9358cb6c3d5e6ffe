"""The C4 RoI head: res5 per RoI and the Fast R-CNN classifier / box regressor."""

from .fast_rcnn import FastRCNNOutputLayers
from .res5_head import Res5ROIHeads

__all__ = ["FastRCNNOutputLayers", "Res5ROIHeads"]
