"""Data: data set loading (``datasets``), the per-image mapper, samplers and data loaders."""

from .datasets import (
    DATASET_CATALOG,
    DetectionDataset,
    ensure_shapes,
    generate_shapes,
    get_dataset,
    load_coco_json,
    load_shapes,
    register_dataset,
)
from .loader import build_test_loader, build_train_loader
from .mapper import DatasetMapper, read_image_rgb, resize_shortest_edge_shape
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids

__all__ = [
    "DATASET_CATALOG",
    "DatasetMapper",
    "DetectionDataset",
    "GroupedBatchSampler",
    "InferenceSampler",
    "TrainingSampler",
    "aspect_ratio_group_ids",
    "build_test_loader",
    "build_train_loader",
    "ensure_shapes",
    "generate_shapes",
    "get_dataset",
    "load_coco_json",
    "load_shapes",
    "read_image_rgb",
    "register_dataset",
    "resize_shortest_edge_shape",
]
