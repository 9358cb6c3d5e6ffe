"""Evaluation: the evaluator protocol, the inference loop, COCO box evaluation, TIDE's error breakdown and metric
reporting."""

from .coco import (
    COCOEvaluator,
    detections_to_coco_results,
    evaluate_coco_results,
    load_coco_ground_truth,
    load_coco_results,
    records_to_coco_dict,
    validate_coco_results,
)
from .errors import ErrorAssignment, tide_assignment, tide_breakdown, tide_errors
from .evaluator import DatasetEvaluator, InferenceTiming, inference_on_dataset
from .metrics import format_per_category_table, json_safe, per_category_values, write_metrics_json

__all__ = [
    "COCOEvaluator",
    "DatasetEvaluator",
    "ErrorAssignment",
    "InferenceTiming",
    "detections_to_coco_results",
    "evaluate_coco_results",
    "format_per_category_table",
    "inference_on_dataset",
    "json_safe",
    "load_coco_ground_truth",
    "load_coco_results",
    "per_category_values",
    "records_to_coco_dict",
    "tide_assignment",
    "tide_breakdown",
    "tide_errors",
    "validate_coco_results",
    "write_metrics_json",
]
