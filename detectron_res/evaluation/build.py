"""`build_evaluator(dataset)`: COCO box AP for every data set, plus the devkit metric for VOC data sets."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..data.datasets.base import DetectionDataset
from .coco import DEFAULT_COCO_BACKEND, COCOEvaluator
from .evaluator import DatasetEvaluator
from .voc import VOCDetectionEvaluator


class EvaluatorGroup(DatasetEvaluator):
    """Several evaluators fed the same outputs; their metrics are merged ({"bbox": ..., "voc": ...})."""

    def __init__(self, evaluators: list[DatasetEvaluator]):
        self.evaluators = evaluators

    def reset(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict[str, Tensor]]) -> None:
        for evaluator in self.evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict:
        results: dict = {}
        for evaluator in self.evaluators:
            results.update(evaluator.evaluate())
        return results


def build_evaluator(
    dataset: DetectionDataset, *, output_dir: str | Path, coco_backend: str = DEFAULT_COCO_BACKEND
) -> DatasetEvaluator:
    """COCO-style evaluation always (results json in `output_dir`); for a VOC data set also the VOC devkit
    metric, whose devkit result files (comp4_det_test_<class>.txt) go to `output_dir/voc_results`. With matplotlib
    installed each also draws its per-class precision-recall curves and AP bars into `output_dir`
    (coco_pr_curves.png, coco_ap_per_class.png, voc_pr_curves.png, voc_ap_per_class.png). `coco_backend` is
    TEST.COCO_BACKEND, the COCOeval implementation."""
    evaluators: list[DatasetEvaluator] = [COCOEvaluator(dataset=dataset, output_dir=output_dir, backend=coco_backend)]
    if "voc_root" in dataset.extra:
        evaluators.append(
            VOCDetectionEvaluator(dataset=dataset, output_dir=Path(output_dir) / "voc_results", plot_dir=output_dir)
        )
    return evaluators[0] if len(evaluators) == 1 else EvaluatorGroup(evaluators)
