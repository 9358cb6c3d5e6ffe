"""detectron_res: the ResNet paper's Faster R-CNN C4 detection and localization systems."""

__version__ = "0.1.0"
