"""Per-class precision-recall curves after COCO and VOC evaluation: the numbers against hand-worked cases, the
PNGs the evaluators write beside their results, and evaluation without matplotlib or with a failing plot."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GroundTruthModel, read_png
from pycocotools.cocoeval import COCOeval

from detectron_res.config import load_config
from detectron_res.data.datasets import generate_shapes
from detectron_res.data.datasets.base import DetectionDataset
from detectron_res.engine.runner import evaluate
from detectron_res.evaluation.build import build_evaluator
from detectron_res.evaluation.coco import (
    COCOEvaluator,
    coco_pr_curves,
    detections_to_coco_results,
    load_coco_ground_truth,
    records_to_coco_dict,
)
from detectron_res.evaluation.voc import VOCDetectionEvaluator, eval_class, voc_pr_curves
from detectron_res.utils import plots

REPO = Path(__file__).resolve().parents[2]
COCO_PNGS = {"coco_pr_curves.png", "coco_ap_per_class.png"}
VOC_PNGS = {"voc_pr_curves.png", "voc_ap_per_class.png"}


def hide_matplotlib(monkeypatch) -> None:
    """Make `import matplotlib` (and any of its modules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def pngs(folder: Path) -> set[str]:
    return {path.name for path in folder.rglob("*.png")}


# -- COCO ---------------------------------------------------------------------------------------------------------
def two_image_dataset() -> DetectionDataset:
    """Two 100x100 images, each with one "ball" at [0, 0, 10, 10]; no "cube" anywhere."""
    records = [
        {"file_name": f"{i}.png", "image_id": i, "height": 100, "width": 100,
         "annotations": [{"bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 0, "iscrowd": 0}]}
        for i in (1, 2)
    ]
    return DetectionDataset(name="two", records=records, class_names=["ball", "cube"], category_ids=[1, 2])


def two_image_outputs() -> list[dict[str, torch.Tensor]]:
    """Image 1: the ball (0.9) and a cube (0.5). Image 2: a miss (0.8), then the ball cut to IoU 0.72 (0.7)."""
    return [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]]), "scores": torch.tensor([0.9, 0.5]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 7.2, 10.0]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 0])},
    ]


def test_coco_pr_curves_hand_worked():
    dataset = two_image_dataset()
    coco_gt = load_coco_ground_truth(records_to_coco_dict(dataset))
    results = [entry for image_id, out in zip((1, 2), two_image_outputs())
               for entry in detections_to_coco_results(out, image_id=image_id, category_ids=[1, 2])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    ball, cube = coco_pr_curves(coco_eval)
    # Ranked by score: TP (0.9), FP (0.8), then the IoU-0.72 box (0.7): a TP at the IoU thresholds 0.50 ... 0.70
    # (5 of 10), a FP at 0.75 ... 0.95. Two balls.
    # At IoU 0.5: recall .5 .5 1, precision 1 .5 2/3, made monotone 1 2/3 2/3; read at recall 0, .01, ..., 1:
    #   1 up to recall .50 (51 thresholds), 2/3 from .51 to 1 (50 thresholds).
    # At IoU >= 0.75: recall .5 .5 .5: 1 up to .50, 0 beyond (recall never reached).
    # Mean over the 10 IoUs: 1 up to .50, (5 * 2/3 + 5 * 0) / 10 = 1/3 beyond.
    recall, at_50 = ball.curves["IoU 0.50"]
    np.testing.assert_allclose(recall, np.arange(101) / 100, atol=1e-12)
    np.testing.assert_allclose(at_50, [1.0] * 51 + [2 / 3] * 50, atol=1e-12)
    np.testing.assert_allclose(ball.curves["IoU 0.50:0.95"][1], [1.0] * 51 + [1 / 3] * 50, atol=1e-12)
    assert ball.name == "ball"
    assert ball.ap["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100, abs=1e-9)  # 83.50
    assert ball.ap["AP"] == pytest.approx((51 + 50 / 3) / 101 * 100, abs=1e-9)  # 67.00
    # no cube in the ground truth: undefined, though a cube was detected
    assert cube.name == "cube" and cube.curves == {} and cube.ap == {"AP50": None, "AP": None}


def test_coco_evaluator_writes_the_plots_beside_its_results(tmp_path):
    evaluator = COCOEvaluator(dataset=two_image_dataset(), output_dir=tmp_path / "out")
    evaluator.reset()
    evaluator.process([{"image_id": 1}, {"image_id": 2}], two_image_outputs())
    metrics = evaluator.evaluate()["bbox"]
    assert metrics["AP-ball"] == pytest.approx((51 + 50 / 3) / 101 * 100, abs=1e-9)  # the curves' AP
    assert metrics["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100, abs=1e-9)
    assert pngs(tmp_path) == COCO_PNGS
    assert read_png(tmp_path / "out" / "coco_pr_curves.png").shape[:2] == (350, 640)  # 2 classes of 3.2 x 2.9 in
    read_png(tmp_path / "out" / "coco_ap_per_class.png")


# -- VOC ----------------------------------------------------------------------------------------------------------
def test_voc_pr_curves_hand_worked():
    ground_truth = {image: {"boxes": [[1, 1, 10, 10]], "difficult": [0]} for image in ("a", "b", "c")}
    detections = [
        ("a", 0.9, 1, 1, 10, 10),  # TP
        ("a", 0.8, 50, 50, 60, 60),  # FP
        ("b", 0.7, 1, 1, 10, 10),  # TP
        ("b", 0.6, 1, 1, 10, 10),  # the same cat again: FP
    ]
    ranked = eval_class(detections, ground_truth, use_07_metric=False)
    cat, dog, bird = voc_pr_curves({"cat": (ranked["recall"], ranked["precision"]), "dog": None,
                                    "bird": (np.zeros(0), np.zeros(0))})
    # npos 3: recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2; envelope (max to the right) 1 2/3 2/3 1/2.
    # area: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9; 11-point: t = 0 .. .3 -> 1, t = .4 .. .6 -> 2/3, t = .7 .. 1 -> 0:
    #   (4 + 3 * 2/3) / 11 = 6/11
    recall, precision = cat.curves["precision"]
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5], atol=1e-12)
    np.testing.assert_allclose(cat.curves["envelope"][0], recall, atol=1e-12)
    np.testing.assert_allclose(cat.curves["envelope"][1], [1.0, 2 / 3, 2 / 3, 0.5], atol=1e-12)
    assert cat.ap["AP"] == pytest.approx(500 / 9, abs=1e-9)
    assert cat.ap["AP07"] == pytest.approx(600 / 11, abs=1e-9)
    assert dog.curves == {} and dog.ap == {"AP": None, "AP07": None}  # no ground truth
    assert bird.ap == {"AP": 0.0, "AP07": 0.0} and bird.curves["precision"][0].size == 0  # nothing detected


def voc_like_dataset(tmp_path) -> DetectionDataset:
    records = [
        {"file_name": "a.jpg", "image_id": "a", "height": 50, "width": 50,
         "annotations": [{"bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 0, "difficult": 0}]},
        {"file_name": "b.jpg", "image_id": "b", "height": 50, "width": 50,
         "annotations": [{"bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 0, "difficult": 0},
                         {"bbox": [20.0, 20.0, 40.0, 40.0], "category_id": 1, "difficult": 0}]},
    ]
    return DetectionDataset(name="voc_like", records=records, class_names=["cat", "dog"], category_ids=[0, 1],
                            extra={"voc_root": str(tmp_path / "VOC2007")})


VOC_OUTPUTS = [
    {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
    {"boxes": torch.tensor([[30.0, 0.0, 40.0, 10.0], [20.0, 20.0, 40.0, 40.0]]), "scores": torch.tensor([0.8, 0.7]),
     "labels": torch.tensor([0, 1])},
]


def test_voc_evaluator_draws_into_plot_dir_and_build_evaluator_puts_both_beside_the_results(tmp_path):
    dataset = voc_like_dataset(tmp_path)
    evaluator = VOCDetectionEvaluator(dataset=dataset, output_dir=tmp_path / "devkit", plot_dir=tmp_path / "plots")
    evaluator.process([{"image_id": "a"}, {"image_id": "b"}], VOC_OUTPUTS)
    result = evaluator.evaluate()["voc"]
    assert result["per_class"]["cat"]["AP_area"] == pytest.approx(0.5)  # TP then FP, 2 cats: recall .5
    assert pngs(tmp_path / "devkit") == set() and pngs(tmp_path / "plots") == VOC_PNGS
    for name in VOC_PNGS:
        read_png(tmp_path / "plots" / name)

    group = build_evaluator(dataset, output_dir=tmp_path / "inference")
    group.reset()
    group.process([{"image_id": "a"}, {"image_id": "b"}], VOC_OUTPUTS)
    metrics = group.evaluate()
    assert set(metrics) == {"bbox", "voc"}
    assert pngs(tmp_path / "inference") == COCO_PNGS | VOC_PNGS
    assert {path.parent.name for path in (tmp_path / "inference").rglob("*.png")} == {"inference"}
    assert len(list((tmp_path / "inference" / "voc_results").glob("comp4_det_test_*.txt"))) == 2


# -- optional and fallible ----------------------------------------------------------------------------------------
def test_without_matplotlib_evaluation_gives_the_same_metrics_and_no_plots(tmp_path, monkeypatch, caplog):
    dataset = voc_like_dataset(tmp_path)
    hide_matplotlib(monkeypatch)
    group = build_evaluator(dataset, output_dir=tmp_path / "inference")
    group.reset()
    group.process([{"image_id": "a"}, {"image_id": "b"}], VOC_OUTPUTS)
    with caplog.at_level(logging.DEBUG, logger="detectron_res"):
        metrics = group.evaluate()
    assert metrics["voc"]["per_class"]["cat"]["AP_area"] == pytest.approx(0.5)
    assert metrics["bbox"]["AP-dog"] == pytest.approx(100.0)
    assert pngs(tmp_path) == set()
    assert (tmp_path / "inference" / "coco_instances_results.json").is_file()
    assert "matplotlib is not installed: no coco evaluation plots" in caplog.text
    assert "matplotlib is not installed: no voc evaluation plots" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_failing_plot_is_a_warning_not_a_failed_evaluation(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(plots, "plot_pr_curves", broken)
    evaluator = COCOEvaluator(dataset=two_image_dataset(), output_dir=tmp_path)
    evaluator.process([{"image_id": 1}, {"image_id": 2}], two_image_outputs())
    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        metrics = evaluator.evaluate()
    assert metrics["bbox"]["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100, abs=1e-9)
    assert f"Could not write the coco evaluation plots to {tmp_path}: OSError: No space left on device" in caplog.text
    assert pngs(tmp_path) == set()


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_runner_evaluate_writes_metrics_json_and_plots_only_with_matplotlib(tmp_path, monkeypatch, with_matplotlib):
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=0, num_val=3, image_size=64, seed=3)
    test_set = f"{root}/annotations/instances_val.json:{root}/val"
    cfg = load_config(REPO / "configs" / "shapes_r18.yaml", [
        f"DATASETS.TEST=[{test_set}]", f"OUTPUT_DIR={tmp_path / 'run'}", "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0",
        "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=64",
    ])
    from detectron_res.data.build import load_dataset

    model = GroundTruthModel(load_dataset(cfg, test_set))
    if not with_matplotlib:
        hide_matplotlib(monkeypatch)
    metrics = evaluate(cfg, model, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bbox"]["AP"] == pytest.approx(100.0)
    results_dir = tmp_path / "run" / "inference" / "instances_val"
    assert (results_dir / "coco_instances_results.json").is_file()
    assert pngs(tmp_path / "run") == (COCO_PNGS if with_matplotlib else set())
    if with_matplotlib:
        for name in COCO_PNGS:
            read_png(results_dir / name)
