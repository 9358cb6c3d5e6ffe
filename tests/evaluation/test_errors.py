"""Tests of TIDE's error breakdown (detectron_res.evaluation.errors): hand-made cases where each error type appears
once with dAP worked out by hand, the edge cases (no detections, a class without ground truth, crowd regions, the
per-class cap), bad input, and the real COCO val2014 sample against pycocotools' AP50 and tidecv's numbers."""

from __future__ import annotations

import json

import pytest

from detectron_res.evaluation import (
    evaluate_coco_results,
    load_coco_ground_truth,
    tide_assignment,
    tide_breakdown,
    tide_errors,
)

A, B, C = 1, 2, 3


def _gt(annotations: list[tuple], *, images=(1, 2)) -> dict:
    """A COCO ground truth of 100x100 images from (annotation id, image id, category id, [x, y, w, h][, iscrowd])."""
    return {
        "images": [{"id": image_id, "height": 100, "width": 100} for image_id in images],
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}, {"id": C, "name": "c"}],
        "annotations": [
            {"id": ann[0], "image_id": ann[1], "category_id": ann[2], "bbox": ann[3], "iscrowd": ann[4] if len(ann) > 4
             else 0, "area": ann[3][2] * ann[3][3]}
            for ann in annotations
        ],
    }


def pycocotools_ap50(gt, detections, **kwargs) -> float | None:
    """evaluate_coco_results' AP50 with pycocotools, the reference TIDE's AP equals to the last bit (faster_coco_eval,
    the default backend where it is installed, agrees with it to 1e-6, not bit for bit)."""
    return evaluate_coco_results(gt, detections, backend="pycocotools", **kwargs)["bbox"]["AP50"]


def _det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# Image 1 holds five class-A boxes, image 2 one class-B box (ids g1..g6 as annotation ids 1..6).
EVERY_KIND_GT = _gt([
    (1, 1, A, [0, 0, 10, 10]),    # g1: found by d1, duplicated by d2
    (2, 1, A, [20, 0, 10, 10]),   # g2: only d3 near it (IoU 1/3) -> loc error, g2 is no miss
    (3, 1, A, [40, 0, 10, 10]),   # g3: only the class-B d4 on it (IoU 1) -> cls error, g3 is no miss
    (4, 1, A, [60, 0, 10, 10]),   # g4: nothing near it -> miss
    (6, 1, A, [0, 50, 10, 10]),   # g6: found late by d8
    (5, 2, B, [0, 0, 10, 10]),    # g5: found by d7
])
EVERY_KIND_DETS = [
    _det(1, A, [80, 80, 10, 10], 0.95),  # d6: bkg (touches nothing)
    _det(1, A, [0, 0, 10, 10], 0.9),     # d1: tp g1
    _det(1, A, [0, 0, 10, 10], 0.8),     # d2: dupe of g1
    _det(1, A, [25, 0, 10, 10], 0.7),    # d3: loc, IoU 50 / 150 with g2
    _det(1, A, [0, 50, 10, 10], 0.3),    # d8: tp g6
    _det(1, B, [40, 0, 10, 10], 0.6),    # d4: cls, IoU 1 with the class-A g3
    _det(1, B, [0, 5, 10, 10], 0.5),     # d5: both, IoU 50 / 150 with the class-A g1, no class-B box in image 1
    _det(2, B, [0, 0, 10, 10], 0.4),     # d7: tp g5
]
# COCO's AP at IoU 0.5 averages over recall r = 0, 0.01, ..., 1 the best precision at a recall >= r. Class C has no
# ground truth and is not averaged. Without fixes (F = false, T = true positive, by score):
#   A (5 boxes): F T F F T  recall 0 .2 .2 .2 .4  precision 0 1/2 1/3 1/4 2/5 -> best to the right: .5 .5 .4 .4 .4
#                r in [0, .2]: 21 points at .5, r in (.2, .4]: 20 points at .4  -> AP_A = 18.5 / 101
#   B (1 box):   F F T  -> precision 1/3 at recall 1 for all 101 points          -> AP_B = 1/3
# AP = (18.5/101 + 1/3) / 2
# cls:  d4 becomes a true positive of A at 0.6: A = F T F F T T, precision .5 at recall .6 and at every r <= .6
#       (61 points at .5: 30.5/101); B = F T: .5.          dAP = (12/101 + (1/2 - 1/3)) / 2 = 6/101 + 1/12
# loc:  d3 becomes a true positive: A = F T F T T, precision 3/5 at recall .6 -> 61 points at .6 = 36.6/101
#                                                          dAP = (36.6 - 18.5) / 101 / 2 = 18.1/202
# both: d5 removed: B = F T -> .5                          dAP = (1/2 - 1/3) / 2 = 1/12
# dupe: d2 removed: A = F T F T, precision .5 at recall .4 -> 41 points at .5 = 20.5/101
#                                                          dAP = 2/101 / 2 = 1/101
# bkg:  d6 removed: A = T F F T: 21 points at 1 (r <= .2), 20 at .5 (r in (.2, .4]) = 31/101
#                                                          dAP = 12.5/202
# miss: g4 removed, A has 4 boxes: recall 0 .25 .25 .25 .5: 26 points at .5 (r <= .25), 25 at .4 = 23/101
#                                                          dAP = 4.5/202
EVERY_KIND_AP = 100 * (18.5 / 101 + 1 / 3) / 2
EVERY_KIND_DAP = {
    "cls": 100 * (6 / 101 + 1 / 12),
    "loc": 100 * 18.1 / 202,
    "both": 100 / 12,
    "dupe": 100 / 101,
    "bkg": 100 * 12.5 / 202,
    "miss": 100 * 4.5 / 202,
}


def test_every_error_kind_once_with_hand_computed_dap():
    result = tide_errors(load_coco_ground_truth(EVERY_KIND_GT), EVERY_KIND_DETS)
    assert result["AP"] == pytest.approx(EVERY_KIND_AP, rel=1e-9)
    assert result["dAP"] == pytest.approx(EVERY_KIND_DAP, rel=1e-9)
    assert list(result["dAP"]) == ["cls", "loc", "both", "dupe", "bkg", "miss"]
    assert result["counts"] == {
        "cls": 1, "loc": 1, "both": 1, "dupe": 1, "bkg": 1, "miss": 1, "tp": 3, "gt": 6, "detections": 8
    }


def test_every_error_kind_assignment_and_ap_equal_to_pycocotools():
    gt = load_coco_ground_truth(EVERY_KIND_GT)
    assignment = tide_assignment(gt, EVERY_KIND_DETS)
    assert assignment.detection_types == ["bkg", "tp", "dupe", "loc", "tp", "cls", "both", "tp"]
    assert assignment.gt_types == {1: "tp", 2: "fn", 3: "fn", 4: "miss", 6: "tp", 5: "tp"}
    assert tide_errors(gt, EVERY_KIND_DETS)["AP"] == pycocotools_ap50(gt, EVERY_KIND_DETS)


def test_cls_and_loc_on_one_box_fix_only_the_higher_scoring_one():
    # g1 (A) found by nothing; a class-B detection on it (IoU 1, score .9, cls) and a class-A one at IoU 1/3
    # (score .8, loc). TIDE fixes the one with the higher score: fixing cls makes A = T at .9 -> AP_A 1, fixing loc
    # removes the loc detection (its box is taken) -> A has no detections, AP_A 0. AP = AP_A = 0 (B has no boxes).
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10])]))
    dets = [_det(1, B, [0, 0, 10, 10], 0.9), _det(1, A, [5, 0, 10, 10], 0.8)]
    result = tide_errors(gt, dets)
    assert result["AP"] == 0.0
    assert result["dAP"] == pytest.approx({"cls": 100.0, "loc": 0.0, "both": 0.0, "dupe": 0.0, "bkg": 0.0,
                                           "miss": 0.0}, abs=1e-9)
    # with the scores swapped the loc error wins: A = T at .9 when fixing loc, nothing when fixing cls
    dets = [_det(1, B, [0, 0, 10, 10], 0.8), _det(1, A, [5, 0, 10, 10], 0.9)]
    assert tide_errors(gt, dets)["dAP"] == pytest.approx({"cls": 0.0, "loc": 100.0, "both": 0.0, "dupe": 0.0,
                                                          "bkg": 0.0, "miss": 0.0}, abs=1e-9)


def test_no_detections_are_all_missed():
    # nothing found: AP 0; fixing the misses leaves no box and no detection to get wrong -> 100
    gt = load_coco_ground_truth(EVERY_KIND_GT)
    result = tide_errors(gt, [])
    assert result["AP"] == 0.0
    assert result["dAP"] == {"cls": 0.0, "loc": 0.0, "both": 0.0, "dupe": 0.0, "bkg": 0.0, "miss": 100.0}
    assert result["counts"] == {
        "cls": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 0, "miss": 6, "tp": 0, "gt": 6, "detections": 0
    }


def test_one_class_fully_missed_drops_out_when_misses_are_fixed():
    # A found perfectly (AP_A 1), B's only box missed without a detection (AP_B 0): AP 50; fixing the miss leaves
    # B without boxes or detections, so it drops out of the mean (as in tidecv): 100 -> dAP miss 50
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10]), (2, 2, B, [0, 0, 10, 10])]))
    result = tide_errors(gt, [_det(1, A, [0, 0, 10, 10], 0.9)])
    assert result["AP"] == pytest.approx(50.0, rel=1e-9)
    assert result["dAP"]["miss"] == pytest.approx(50.0, rel=1e-9)
    assert result["counts"]["miss"] == 1


def test_a_class_without_ground_truth_is_typed_but_not_averaged():
    # Only A has boxes (g1, g2). The class-C detection on g2 is a cls error (g2 unmatched, so no miss); the class-C
    # one far away is bkg. Averaged: A alone, as COCOeval does. A = T (.5) with 2 boxes: recall .5, precision 1
    # -> 51/101. Fixing cls puts the C detection into A as a true positive at .9: A = T T -> 1, dAP = 100 - 5100/101.
    # Fixing bkg removes a class-C detection: C is not averaged -> dAP 0.
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10]), (2, 1, A, [50, 50, 20, 20])]))
    dets = [_det(1, A, [0, 0, 10, 10], 0.5), _det(1, C, [50, 50, 20, 20], 0.9), _det(1, C, [80, 0, 10, 10], 0.95)]
    result = tide_errors(gt, dets)
    assert result["AP"] == pytest.approx(5100 / 101, rel=1e-9)
    assert result["AP"] == pycocotools_ap50(gt, dets)
    assert result["dAP"] == pytest.approx(
        {"cls": 100 - 5100 / 101, "loc": 0.0, "both": 0.0, "dupe": 0.0, "bkg": 0.0, "miss": 0.0}, abs=1e-9
    )
    assert result["counts"] == {
        "cls": 1, "loc": 0, "both": 0, "dupe": 0, "bkg": 1, "miss": 0, "tp": 1, "gt": 2, "detections": 3
    }


def test_crowd_regions_are_ignored_as_coco_does():
    # A crowd region of class A covers [0, 50)^2. The class-A detection inside it is ignored (COCO's crowd IoU:
    # intersection over the detection's area = 1), whatever its score; the class-B one inside it is typed against
    # the non-crowd boxes only (none near) -> bkg, and B has no boxes so it is not averaged. A = T -> AP 100.
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 50, 50], 1), (2, 1, A, [60, 60, 10, 10])]))
    dets = [_det(1, A, [0, 0, 10, 10], 0.9), _det(1, B, [0, 0, 10, 10], 0.8), _det(1, A, [60, 60, 10, 10], 0.5),
            _det(1, A, [0, 0, 10, 10], 0.85)]  # a crowd region takes any number of detections
    result = tide_errors(gt, dets)
    assert result["AP"] == pytest.approx(100.0, rel=1e-9)
    assert result["AP"] == pycocotools_ap50(gt, dets)
    assert result["counts"] == {
        "cls": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 1, "miss": 0, "tp": 1, "gt": 1, "detections": 2
    }
    assignment = tide_assignment(gt, dets)
    assert assignment.detection_types == ["ignored", "bkg", "tp", "ignored"]
    assert assignment.gt_types == {1: "ignored", 2: "tp"}


def test_detections_over_the_per_class_cap_are_not_counted():
    # max_dets=1 per image and class: the lower-scoring A detection (a dupe otherwise) is dropped; B's is kept
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10])]))
    dets = [_det(1, A, [0, 0, 10, 10], 0.5), _det(1, A, [0, 0, 10, 10], 0.9), _det(1, B, [80, 80, 10, 10], 0.1)]
    assert tide_assignment(gt, dets, max_dets=1).detection_types == ["ignored", "tp", "bkg"]
    assert tide_assignment(gt, dets).detection_types == ["dupe", "tp", "bkg"]


def test_the_breakdown_is_both_answers_of_one_analysis():
    gt = load_coco_ground_truth(EVERY_KIND_GT)
    summary, assignment = tide_breakdown(gt, EVERY_KIND_DETS, img_ids=[1, 2], max_dets=1)
    assert summary == tide_errors(gt, EVERY_KIND_DETS, img_ids=[1, 2], max_dets=1)
    assert assignment == tide_assignment(gt, EVERY_KIND_DETS, img_ids=[1, 2], max_dets=1)
    assert tide_breakdown(gt, EVERY_KIND_DETS)[1].detection_types == ["bkg", "tp", "dupe", "loc", "tp", "cls", "both",
                                                                      "tp"]
    with pytest.raises(TypeError, match="iou"):
        tide_assignment(gt, EVERY_KIND_DETS, iou=0.5)  # a misspelt option is not silently ignored


def test_img_ids_evaluate_a_subset_as_evaluate_coco_results_does():
    # image 2 alone: B's box found by d7, the detections on image 1 not counted -> AP 100, nothing wrong
    gt = load_coco_ground_truth(EVERY_KIND_GT)
    result = tide_errors(gt, EVERY_KIND_DETS, img_ids=[2])
    assert result["AP"] == pytest.approx(100.0, rel=1e-9)
    assert result["AP"] == pycocotools_ap50(gt, EVERY_KIND_DETS, img_ids=[2])
    assert result["counts"] == {
        "cls": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 0, "miss": 0, "tp": 1, "gt": 1, "detections": 1
    }
    assert tide_assignment(gt, EVERY_KIND_DETS, img_ids=[2]).detection_types == ["ignored"] * 7 + ["tp"]


def test_interval_ends_follow_the_paper():
    # g1 (A) found by d1; IoUs below are exact in floating point (10 / 100, 50 / 100)
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10]), (2, 2, A, [0, 0, 10, 10])]))
    dets = [
        _det(1, A, [0, 0, 10, 10], 0.9),  # tp g1
        _det(1, A, [0, 0, 10, 5], 0.8),   # IoU 0.5 with the matched g1: dupe (loc needs IoU < 0.5)
        _det(2, A, [0, 0, 10, 1], 0.7),   # IoU 0.1 with the unmatched g2: loc (0.1 <= IoU)
        _det(2, B, [0, 0, 10, 5], 0.6),   # IoU 0.5 with the class-A g2: cls (IoU >= 0.5)
        _det(1, B, [0, 0, 10, 1], 0.5),   # IoU 0.1 with the class-A g1 only: both (bkg needs IoU < 0.1)
    ]
    assert tide_assignment(gt, dets).detection_types == ["tp", "dupe", "loc", "cls", "both"]


def test_a_loc_error_on_a_found_box_is_removed_not_made_true():
    # g1 found by d1 (.9), g2 missed. d2 (.95) overlaps g1 by IoU 1/3: loc, but g1 is taken, so fixing removes it.
    # A = F T with 2 boxes: precision .5 at recall .5 -> 51 points at .5 = 25.5/101; fixed: A = T -> 51/101
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10]), (2, 1, A, [50, 50, 10, 10])]))
    dets = [_det(1, A, [0, 0, 10, 10], 0.9), _det(1, A, [5, 0, 10, 10], 0.95)]
    result = tide_errors(gt, dets)
    assert result["AP"] == pytest.approx(2550 / 101, rel=1e-9)
    assert result["dAP"]["loc"] == pytest.approx(2550 / 101, rel=1e-9)
    assert result["counts"]["loc"] == 1 and result["counts"]["miss"] == 1


def test_a_detection_outside_cocos_area_range_is_ignored():
    # COCOeval's area range "all" ends at 1e10: an unmatched detection larger than that does not count
    gt = load_coco_ground_truth(_gt([(1, 1, A, [0, 0, 10, 10])]))
    dets = [_det(1, A, [0, 0, 10, 10], 0.5), _det(1, A, [20, 20, 1e6, 1e6], 0.9)]
    assert tide_assignment(gt, dets).detection_types == ["tp", "ignored"]
    assert tide_errors(gt, dets)["AP"] == pytest.approx(100.0, rel=1e-9) == pycocotools_ap50(gt, dets)


def test_bad_input_is_named():
    gt = load_coco_ground_truth(EVERY_KIND_GT)
    with pytest.raises(ValueError, match="entry #1 has image_id 7, which is not an image"):
        tide_errors(gt, [_det(1, A, [0, 0, 1, 1], 0.5), _det(7, A, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="entry #0 has bbox"):
        tide_errors(gt, [_det(1, A, [0, 0, -1, 1], 0.5)])
    with pytest.raises(ValueError, match="iou_bg=0.6, iou_fg=0.5"):
        tide_errors(gt, [], iou_bg=0.6)
    with pytest.raises(ValueError, match="max_dets must be a positive int, got 0"):
        tide_errors(gt, [], max_dets=0)


def test_no_ground_truth_gives_no_ap():
    result = tide_errors(load_coco_ground_truth(_gt([])), [_det(1, A, [0, 0, 10, 10], 0.5)])
    assert result["AP"] is None and set(result["dAP"].values()) == {None}
    assert result["counts"]["bkg"] == 1


def test_coco_val2014_first100_fake_results(shared_data):
    """cocoapi's fake detections on the first 100 val2014 images. AP equals pycocotools' AP50 to the last bit. The
    reference dAP and counts are tidecv 1.0.1's (dbolya/tide @ 49a5d2a) run on the same data, its detections limited
    to the classes with ground truth (tidecv also averages the others, at AP 0), with two changes that make it
    COCOeval's AP: its recall thresholds taken from COCOeval's np.linspace (x / 100 differs at 0.07, 0.7, ...), and
    equal scores ordered by position in the results (tidecv puts a fix's errors before the true positives)."""
    root = shared_data("coco_val2014_first100")
    data = json.loads((root / "instances_val2014_first100_nocrowd_bboxarea.json").read_text())
    detections = json.loads((root / "instances_val2014_fakebbox100_results.json").read_text())
    gt = load_coco_ground_truth(data)
    result = tide_errors(gt, detections)
    assert result["AP"] == pycocotools_ap50(gt, detections)

    with_gt = {ann["category_id"] for ann in data["annotations"]}
    detections = [entry for entry in detections if entry["category_id"] in with_gt]
    result = tide_errors(gt, detections)
    assert result["AP"] == pycocotools_ap50(gt, detections)
    assert result["AP"] == pytest.approx(69.69727247299575, abs=1e-9)
    assert result["dAP"] == pytest.approx({
        "cls": 15.58350372492481, "loc": 0.24988213107026525, "both": 0.0, "dupe": 0.020599225914494923,
        "bkg": 0.0, "miss": 10.572358518361881,
    }, abs=1e-9)
    counts = result["counts"]
    assert {kind: counts[kind] for kind in ("cls", "loc", "both", "dupe", "bkg", "miss")} == {
        "cls": 74, "loc": 1, "both": 0, "dupe": 1, "bkg": 0, "miss": 106
    }
    # every counted detection is a true positive or one error; every box is found, missed or behind a cls/loc error
    assert counts["tp"] + sum(counts[kind] for kind in ("cls", "loc", "both", "dupe", "bkg")) == counts["detections"]
    gt_types = tide_assignment(gt, detections).gt_types.values()
    assert counts["gt"] == 830 == sum(kind in ("tp", "miss", "fn") for kind in gt_types)
    assert counts["tp"] == sum(kind == "tp" for kind in gt_types)


def test_the_example_of_evaluation_md_runs_as_written():
    """docs/evaluation.md's example, run as written (in this process: a subprocess would spend
    seconds importing torch); its printed values are the ones its comments give (AP 5100/101: one of two cats
    found; fixing cls finds the other)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    [block] = re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "docs/evaluation.md", "exec"), {"__name__": "__main__"})
    lines = printed.getvalue().splitlines()
    ap, d_cls = (float(value) for value in lines[0].split())
    assert ap == pytest.approx(5100 / 101, rel=1e-9) and d_cls == pytest.approx(5000 / 101, rel=1e-9)
    assert lines[1].startswith("{'cls': 1, 'loc': 0, 'both': 0, 'dupe': 0, 'bkg': 0, 'miss': 0, 'tp': 1, ")
    assert lines[2] == "['tp', 'cls']"
