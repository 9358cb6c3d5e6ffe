"""Tests of the PASCAL VOC devkit metric: hand-worked APs, matching rules, evaluator, devkit files, real sample."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import write_voc_annotations

from detectron_res.data.datasets.voc import VOC_CLASSES, load_voc
from detectron_res.evaluation.voc import (
    VOCDetectionEvaluator,
    eval_class,
    evaluate_voc_devkit_results,
    format_voc_table,
    voc_ap,
)

# ../shared/data beside the checkout (this file is <checkout>/tests/evaluation/...)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOC_SAMPLE = SHARED_DATA / "voc2012_sample"


def test_voc_ap_hand_worked() -> None:
    # A ranked list TP, TP, FP, TP, FP with 5 positives:
    #   recall    = .2, .4, .4, .6, .6      precision = 1, 1, 2/3, 3/4, 3/5
    # area: envelope (max to the right) = 1, 1, 1, 3/4, 3/5; steps of recall 0->.2->.4->.6->1 weigh
    #   .2*1 + .2*1 + .2*3/4 + .4*0 = 0.55
    # 11-point: t = 0, .1, .2, .3, .4 -> 1; t = .5, .6 -> 3/4 (recall 3/5 reaches t = 0.6); t = .7 .. 1 -> 0
    #   (5 + 2 * 3/4) / 11 = 6.5 / 11; py-faster-rcnn's np.arange threshold 0.6000000000000001 would give 5.75/11.
    recall = [0.2, 0.4, 0.4, 0.6, 0.6]
    precision = [1.0, 1.0, 2 / 3, 0.75, 0.6]
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.55, abs=1e-12)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6.5 / 11, abs=1e-12)
    assert voc_ap([], [], use_07_metric=True) == 0.0
    assert voc_ap([], [], use_07_metric=False) == 0.0
    with pytest.raises(ValueError, match="recall has 2 values, precision 1"):
        voc_ap([0.1, 0.2], [1.0], use_07_metric=True)
    with pytest.raises(ValueError, match="finite"):
        voc_ap([math.nan], [1.0], use_07_metric=False)


def test_eval_class_difficult_is_ignored_and_duplicate_is_false_positive() -> None:
    ground_truth = {
        "a": {"boxes": [[1, 1, 10, 10], [21, 21, 30, 30]], "difficult": [0, 1]},
        "b": {"boxes": [[1, 1, 10, 10]], "difficult": [0]},
    }
    detections = [
        ("a", 0.9, 1, 1, 10, 10),  # TP
        ("a", 0.8, 1, 1, 10, 10),  # same object again: FP
        ("a", 0.7, 21, 21, 30, 30),  # on the difficult box: neither TP nor FP
        ("b", 0.6, 1, 1, 10, 10),  # TP
    ]
    # cumulative tp 1,1,1,2 fp 0,1,1,1; npos 2 (the difficult box does not count)
    # area: .5 * 1 + .5 * 2/3 = 5/6; 11-point: t = 0..0.5 -> 1 (6 points), t = .6..1 -> 2/3: (6 + 10/3)/11 = 28/33
    result = eval_class(detections, ground_truth, use_07_metric=False)
    assert result["npos"] == 2
    assert result["recall"].tolist() == [0.5, 0.5, 0.5, 1.0]
    assert result["precision"].tolist() == pytest.approx([1.0, 0.5, 0.5, 2 / 3], abs=1e-12)
    assert result["ap"] == pytest.approx(5 / 6, abs=1e-12)
    assert eval_class(detections, ground_truth, use_07_metric=True)["ap"] == pytest.approx(28 / 33, abs=1e-12)


def test_eval_class_ties_keep_input_order() -> None:
    ground_truth = {
        "a": {"boxes": [[1, 1, 10, 10]], "difficult": [0]},
        "b": {"boxes": [[1, 1, 10, 10]], "difficult": [0]},
    }
    first = ("a", 0.9, 1, 1, 10, 10)
    miss = ("b", 0.5, 100, 100, 110, 110)
    hit = ("b", 0.5, 1, 1, 10, 10)
    # stable ranking: TP, FP, TP -> recall .5 .5 1, precision 1 .5 2/3: area 5/6, 11-point 28/33
    ranked_miss_first = eval_class([miss, hit, first], ground_truth, use_07_metric=False)
    assert ranked_miss_first["precision"].tolist() == pytest.approx([1.0, 0.5, 2 / 3], abs=1e-12)
    assert ranked_miss_first["ap"] == pytest.approx(5 / 6, abs=1e-12)
    assert eval_class([miss, hit, first], ground_truth, use_07_metric=True)["ap"] == pytest.approx(28 / 33, abs=1e-12)
    # the tie in the other order: TP, TP, FP -> AP 1
    assert eval_class([hit, miss, first], ground_truth, use_07_metric=False)["ap"] == pytest.approx(1.0, abs=1e-12)
    assert eval_class([hit, miss, first], ground_truth, use_07_metric=True)["ap"] == pytest.approx(1.0, abs=1e-12)


def test_eval_class_without_ground_truth_is_nan() -> None:
    result = eval_class([("a", 0.9, 1, 1, 10, 10)], {}, use_07_metric=False)
    assert math.isnan(result["ap"]) and result["npos"] == 0
    assert math.isnan(result["recall"][0]) and result["precision"].tolist() == [0.0]
    # only a difficult box: the detection on it is ignored, npos stays 0
    only_difficult = {"a": {"boxes": [[1, 1, 10, 10]], "difficult": [1]}}
    result = eval_class([("a", 0.9, 1, 1, 10, 10)], only_difficult, use_07_metric=True)
    assert math.isnan(result["ap"]) and result["npos"] == 0 and result["precision"].tolist() == [0.0]


def test_eval_class_without_detections_is_zero() -> None:
    ground_truth = {"a": {"boxes": [[1, 1, 10, 10]], "difficult": [0]}}
    for use_07_metric in (True, False):
        result = eval_class([], ground_truth, use_07_metric=use_07_metric)
        assert result["ap"] == 0.0 and result["npos"] == 1 and len(result["recall"]) == 0


def test_eval_class_iou_is_strictly_greater_with_plus_one_areas() -> None:
    ground_truth = {"a": {"boxes": [[1, 1, 10, 10]], "difficult": [0]}}  # 10 x 10 = 100 pixels
    # rows 1..5 of it: 50 pixels, union 100 -> IoU exactly 0.5 -> not a match
    assert eval_class([("a", 0.9, 1, 1, 10, 5)], ground_truth, use_07_metric=False)["ap"] == 0.0
    # rows 1..6: 60 / 100 = 0.6 -> match
    assert eval_class([("a", 0.9, 1, 1, 10, 6)], ground_truth, use_07_metric=False)["ap"] == 1.0
    # +1 convention: GT 2x2 pixels, detection 3x2 pixels -> 4 / 6 = 0.67 (continuous areas: 1 / 2 = 0.5, no match)
    small = {"a": {"boxes": [[1, 1, 2, 2]], "difficult": [0]}}
    assert eval_class([("a", 0.9, 1, 1, 3, 2)], small, use_07_metric=False)["ap"] == 1.0
    # a detection in an image without ground truth of the class is a false positive
    assert eval_class([("b", 0.9, 1, 1, 10, 10)], ground_truth, use_07_metric=False)["precision"].tolist() == [0.0]


# ---------------------------------------------------------------- evaluator and devkit files on a tiny VOC

CLASSES = ("cat", "dog", "bird")


def _write_tiny_voc(voc_root: Path) -> None:
    """Two 100x100 images; cat as in the hand-worked case above, dog only difficult, bird never detected."""
    objects = {
        "a": [("cat", (1, 1, 10, 10), 0), ("cat", (21, 21, 30, 30), 1), ("bird", (50, 50, 60, 60), 0)],
        "b": [("cat", (1, 1, 10, 10), 0), ("dog", (40, 40, 50, 50), 1)],
    }
    write_voc_annotations(voc_root, objects)


def _tiny_outputs() -> tuple[list[dict], list[dict]]:
    """Predictions in 0-based continuous coordinates (devkit box minus 1 on x1, y1)."""
    inputs = [{"image_id": "a"}, {"image_id": "b"}]
    outputs = [
        {
            "boxes": torch.tensor(
                [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [39, 39, 50, 50]], dtype=torch.float32
            ),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.5], dtype=torch.float64),
            "labels": torch.tensor([0, 0, 0, 1]),
        },
        {
            "boxes": torch.tensor([[0, 0, 10, 10]], dtype=torch.float32),
            "scores": torch.tensor([0.6], dtype=torch.float64),
            "labels": torch.tensor([0]),
        },
    ]
    return inputs, outputs


@pytest.fixture
def tiny_dataset(tmp_path: Path):
    voc_root = tmp_path / "VOC2007"
    _write_tiny_voc(voc_root)
    return voc_root, load_voc(voc_root, "test", name="tiny", class_names=CLASSES, check_files=False)


def test_evaluator_writes_devkit_files_and_matches_them(tiny_dataset, tmp_path: Path) -> None:
    voc_root, dataset = tiny_dataset
    evaluator = VOCDetectionEvaluator(dataset=dataset, output_dir=tmp_path / "dets")
    inputs, outputs = _tiny_outputs()
    evaluator.process(inputs[:1], outputs[:1])
    evaluator.process(inputs[1:], outputs[1:])
    result = evaluator.evaluate()["voc"]
    # cat: 5/6 and 28/33 (hand-worked above); dog: no non-difficult GT -> NaN, excluded; bird: no detection -> 0
    assert result["per_class"]["cat"] == pytest.approx({"AP_07": 28 / 33, "AP_area": 5 / 6}, abs=1e-12)
    assert math.isnan(result["per_class"]["dog"]["AP_07"]) and math.isnan(result["per_class"]["dog"]["AP_area"])
    assert result["per_class"]["bird"] == {"AP_07": 0.0, "AP_area": 0.0}
    assert result["mAP_07"] == pytest.approx(14 / 33, abs=1e-12)
    assert result["mAP_area"] == pytest.approx(5 / 12, abs=1e-12)
    # devkit files: 1-based boxes (x1 + 1, y1 + 1, x2, y2), in processing order
    assert (tmp_path / "dets" / "comp4_det_test_cat.txt").read_text().splitlines() == [
        "a 0.9 1.0 1.0 10.0 10.0",
        "a 0.8 1.0 1.0 10.0 10.0",
        "a 0.7 21.0 21.0 30.0 30.0",
        "b 0.6 1.0 1.0 10.0 10.0",
    ]
    assert (tmp_path / "dets" / "comp4_det_test_dog.txt").read_text() == "a 0.5 40.0 40.0 50.0 50.0\n"
    assert (tmp_path / "dets" / "comp4_det_test_bird.txt").read_text() == ""
    from_files = evaluate_voc_devkit_results(
        voc_root=voc_root, split="test", dets_dir=tmp_path / "dets", class_names=CLASSES
    )["voc"]
    assert from_files["mAP_07"] == result["mAP_07"] and from_files["mAP_area"] == result["mAP_area"]
    assert from_files["per_class"]["cat"] == result["per_class"]["cat"]
    assert format_voc_table({"voc": result}) == "\n".join(
        [
            "class     AP07 (%)  AP area (%)",
            "cat          84.85        83.33",
            "dog            n/a          n/a",
            "bird          0.00         0.00",
            "mAP          42.42        41.67",
            "mAP over 2 of 3 classes",
            "n/a: no non-difficult ground truth, left out of the mAP: dog",
        ]
    )


def test_evaluator_reset_unprocessed_images_and_bad_outputs(tiny_dataset, caplog: pytest.LogCaptureFixture) -> None:
    _, dataset = tiny_dataset
    evaluator = VOCDetectionEvaluator(dataset=dataset)
    inputs, outputs = _tiny_outputs()
    evaluator.process(inputs, outputs)
    evaluator.reset()
    evaluator.process(inputs[:1], outputs[:1])
    with caplog.at_level(logging.WARNING, logger="detectron_res.evaluation.voc"):
        result = evaluator.evaluate()["voc"]
    assert "1 of 2 images of tiny were not processed" in caplog.text
    # cat without image b: TP, FP(dup), ignored -> recall .5, precision 1 .5 .5: area .5, 11-point 6/11
    assert result["per_class"]["cat"] == pytest.approx({"AP_07": 6 / 11, "AP_area": 0.5}, abs=1e-12)
    with pytest.raises(ValueError, match="image_id 'a' was processed twice"):
        evaluator.process(inputs[:1], outputs[:1])
    with pytest.raises(ValueError, match="image_id 'zzz' is not in data set 'tiny'"):
        evaluator.process([{"image_id": "zzz"}], outputs[:1])
    bad_labels = dict(outputs[1], labels=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[3\]"):
        evaluator.process(inputs[1:], [bad_labels])
    with pytest.raises(ValueError, match="has no 'scores'"):
        evaluator.process(inputs[1:], [{"boxes": outputs[1]["boxes"], "labels": outputs[1]["labels"]}])
    with pytest.raises(ValueError, match="got 2 inputs but 1 outputs"):
        evaluator.process(inputs, outputs[:1])


def test_devkit_files_bad_input(tiny_dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    voc_root, _ = tiny_dataset
    dets = tmp_path / "devkit"
    dets.mkdir()
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 10\nb 0.6 1 1 10 10\n")
    with caplog.at_level(logging.WARNING, logger="detectron_res.evaluation.voc"):
        result = evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    assert "comp4_det_test_bird.txt: class 'bird' has no detections" in caplog.text
    assert result["voc"]["per_class"]["cat"] == {"AP_07": 1.0, "AP_area": 1.0}
    assert result["voc"]["mAP_area"] == 0.5  # cat 1, bird 0, dog excluded
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 10\n\nb 0.6 1 1 10\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_cat\.txt, line 3: expected"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 ten\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_cat\.txt, line 1: not a number"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 10\nx1 0.5 1 1 2 2\nx2 0.5 1 1 2 2\nx1 0.4 1 1 2 2\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_cat\.txt: 2 image ids are not in the split: x1, x2"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    with pytest.raises(FileNotFoundError, match="devkit result folder not found"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=tmp_path / "nope", class_names=CLASSES)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("b 0.6 0 0 9 9", r"line 2: xmin or ymin below 1 .* look like 0-based boxes"),  # used to be scored silently
        ("b 0.6 1 0.5 9 9", r"line 2: xmin or ymin below 1"),
        ("b 0.6 9 1 1 9", r"line 2: xmax < xmin or ymax < ymin"),
        ("b 0.6 1 9 9 1", r"line 2: xmax < xmin or ymax < ymin"),
        ("b 0.6 1 1 nan 9", r"line 2: non-finite number"),
    ],
)
def test_devkit_files_with_malformed_boxes_are_refused_naming_file_and_line(tiny_dataset, tmp_path, line, message):
    voc_root, _ = tiny_dataset
    dets = tmp_path / "devkit"
    dets.mkdir()
    (dets / "comp4_det_test_cat.txt").write_text(f"a 0.9 1 1 10 10\n{line}\n")
    with pytest.raises(ValueError, match=rf"comp4_det_test_cat\.txt, {message}"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)


def test_devkit_scoring_applies_the_training_rule_to_the_xml_ground_truth(tiny_dataset, tmp_path) -> None:
    """An XML box reaching past the image is clipped and a degenerate one dropped, as load_voc does for training."""
    voc_root, _ = tiny_dataset
    xml = voc_root / "Annotations" / "b.xml"
    text = xml.read_text()
    # image b is 100x100; add a cat reaching past the right border and one with xmax < xmin
    extra = (
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>41</xmin><ymin>11</ymin>"
        "<xmax>130</xmax><ymax>30</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>30</xmin><ymin>5</ymin>"
        "<xmax>20</xmax><ymax>9</ymax></bndbox></object>"
    )
    xml.write_text(text.replace("</annotation>", extra + "</annotation>"))
    dets = tmp_path / "devkit"
    dets.mkdir()
    # a's cat, b's first cat and b's clipped one (x 41..100, IoU 60/90 = 0.67 with the unclipped box, 1 clipped);
    # the dropped box needs no detection: all found, AP 1
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 10\nb 0.8 1 1 10 10\nb 0.7 41 11 100 30\n")
    result = evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    assert result["voc"]["per_class"]["cat"] == {"AP_07": 1.0, "AP_area": 1.0}


# ---------------------------------------------------------------- the real VOC2012 sample


def test_real_voc2012_sample_devkit_files_and_evaluator(voc_sample_detections, voc_sample_devkit_dir: Path) -> None:
    class_names = (VOC_SAMPLE / "voc.names").read_text().split()
    assert tuple(class_names) == VOC_CLASSES
    detections = voc_sample_detections
    assert len(detections) == 452

    from_files = evaluate_voc_devkit_results(voc_root=VOC_SAMPLE / "VOC2012", split="val", dets_dir=voc_sample_devkit_dir)["voc"]
    # Computed once with this code; an independent re-typing of py-faster-rcnn's voc_eval.py gives the same
    # per-class APs on these data to 1e-15 (it sums p/11 as it goes; no recall is exactly 0.3, 0.6 or 0.7).
    assert from_files["mAP_07"] == pytest.approx(0.6011089995807699, abs=1e-4)
    assert from_files["mAP_area"] == pytest.approx(0.6075503875223763, abs=1e-4)
    assert from_files["per_class"]["car"]["AP_area"] == pytest.approx(0.245, abs=1e-4)
    assert from_files["per_class"]["person"]["AP_07"] == pytest.approx(0.3836099530616366, abs=1e-4)
    assert from_files["per_class"]["cat"]["AP_area"] == pytest.approx(1.0, abs=1e-12)

    dataset = load_voc(VOC_SAMPLE / "VOC2012", "val", name="voc2012_sample")
    evaluator = VOCDetectionEvaluator(dataset=dataset)
    by_image: dict[str, list] = {}
    for image_id, class_index, score, box in detections:
        by_image.setdefault(image_id, []).append((class_index, score, box))
    for record in dataset.records:
        dets = by_image.get(record["image_id"], [])
        evaluator.process(
            [{"image_id": record["image_id"]}],
            [
                {
                    "boxes": torch.tensor([d[2] for d in dets], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                    "labels": torch.tensor([d[0] for d in dets], dtype=torch.int64),
                }
            ],
        )
    from_evaluator = evaluator.evaluate()["voc"]
    assert from_evaluator["mAP_07"] == pytest.approx(from_files["mAP_07"], abs=1e-12)
    assert from_evaluator["mAP_area"] == pytest.approx(from_files["mAP_area"], abs=1e-12)
    for name in class_names:
        assert from_evaluator["per_class"][name] == pytest.approx(from_files["per_class"][name], abs=1e-12)


def test_devkit_files_as_devkit_score_every_numeric_box(tiny_dataset, tmp_path, caplog) -> None:
    """`as_devkit`: the boxes the default refuses are scored as py-faster-rcnn's voc_eval scores them (issue 21 item
    12). Against b's cat (1, 1, 10, 10), area 100, with the +1 convention:
    an inverted box (9, 1, 1, 9): overlap width max(1 - 9 + 1, 0) = 0 -> IoU 0 -> FP; a NaN corner: IoU NaN, not
    > 0.5 -> FP. Ranked TP (a), FP, FP, TP (b): recall 1/2, 1/2, 1/2, 1, precision 1, 1/2, 1/3, 1/2: area AP
    1/2 * 1 + 1/2 * 1/2 = 3/4, 11-point (6 * 1 + 5 * 1/2) / 11 = 17/22."""
    voc_root, _ = tiny_dataset
    dets = tmp_path / "devkit"
    dets.mkdir()
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 1 1 10 10\nb 0.8 9 1 1 9\nb 0.7 1 1 nan 9\nb 0.6 1 1 10 10\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_cat\.txt, line 2: xmax < xmin"):
        evaluate_voc_devkit_results(voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES)
    with caplog.at_level(logging.INFO, logger="detectron_res.evaluation.voc"):
        result = evaluate_voc_devkit_results(
            voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES, as_devkit=True
        )
    assert result["voc"]["per_class"]["cat"] == pytest.approx({"AP_07": 17 / 22, "AP_area": 0.75}, abs=1e-12)
    assert "No line looked 0-based (xmin or ymin below 1)" in caplog.text

    # a 0-based line: counted, and scored unshifted: (0, 0, 10, 10) against (1, 1, 10, 10): IoU 100/121 -> TP
    (dets / "comp4_det_test_cat.txt").write_text("a 0.9 0 0 10 10\nb 0.6 1 0 10 10\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detectron_res.evaluation.voc"):
        result = evaluate_voc_devkit_results(
            voc_root=voc_root, split="test", dets_dir=dets, class_names=CLASSES, as_devkit=True
        )
    assert result["voc"]["per_class"]["cat"] == {"AP_07": 1.0, "AP_area": 1.0}
    assert (f"2 lines looked 0-based (xmin or ymin below 1), scored unshifted as the devkit scores them; the first: "
            f"{dets / 'comp4_det_test_cat.txt'}, line 1: 'a 0.9 0 0 10 10'") in caplog.text
