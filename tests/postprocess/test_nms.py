"""Per-class NMS and the non-empty box mask on hand-made boxes and scores."""

import math

import pytest
import torch

from detectron_res.postprocess import nonempty_boxes, per_class_nms


def test_nonempty_boxes_needs_both_sides_strictly_larger_than_min_size():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # 10 x 10
            [5.0, 0.0, 5.0, 10.0],  # zero width
            [0.0, 5.0, 10.0, 5.0],  # zero height
            [0.0, 0.0, 4.0, 10.0],  # width 4
            [0.0, 0.0, 10.0, 4.0],  # height 4
            [3.0, 0.0, 1.0, 10.0],  # negative width
            [0.0, 0.0, 0.5, 0.5],  # 0.5 x 0.5: not empty
        ]
    )
    assert nonempty_boxes(boxes).tolist() == [True, False, False, True, True, False, True]
    # a side equal to min_size is not larger than it
    assert nonempty_boxes(boxes, 4.0).tolist() == [True, False, False, False, False, False, False]
    assert nonempty_boxes(boxes, 3.9).tolist() == [True, False, False, True, True, False, False]


def nms(boxes, scores, score_thresh=0.05, nms_thresh=0.5, max_detections=100):
    return per_class_nms(
        torch.tensor(boxes), torch.tensor(scores), score_thresh=score_thresh, nms_thresh=nms_thresh,
        max_detections=max_detections,
    )


A = [0.0, 0.0, 10.0, 10.0]
B = [0.0, 0.0, 10.0, 8.0]  # IoU(A, B) = 80 / 100 = 0.8
C = [0.0, 0.0, 10.0, 4.0]  # IoU(A, C) = 40 / 100 = 0.4
FAR = [50.0, 50.0, 60.0, 60.0]


def test_nms_is_per_class_overlapping_boxes_of_different_classes_are_kept():
    # RoI 0 scores 0.9 for class 0, RoI 1 scores 0.8 for class 1; the boxes overlap at IoU 0.8
    boxes, scores, labels = nms([[A, FAR], [FAR, B]], [[0.9, 0.0], [0.0, 0.8]])
    torch.testing.assert_close(boxes, torch.tensor([A, B]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8]))
    assert labels.tolist() == [0, 1] and labels.dtype == torch.int64


def test_nms_suppresses_within_a_class_above_the_iou_threshold_only():
    # class 0: A 0.9, B 0.8 (IoU 0.8 with A: suppressed), C 0.7 (IoU 0.4 with A, 0.5 with B: kept)
    boxes, scores, labels = nms([[A], [B], [C]], [[0.9], [0.8], [0.7]], nms_thresh=0.5)
    torch.testing.assert_close(boxes, torch.tensor([A, C]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))
    # at 0.85 nothing overlaps enough
    boxes, _, _ = nms([[A], [B], [C]], [[0.9], [0.8], [0.7]], nms_thresh=0.85)
    assert len(boxes) == 3


def test_score_threshold_is_strict():
    boxes, scores, labels = nms([[A, FAR], [C, B]], [[0.05, 0.3], [0.06, 0.04]], score_thresh=0.05)
    # kept: (RoI 0, class 1) 0.3 and (RoI 1, class 0) 0.06; 0.05 is not above the threshold, 0.04 is below
    torch.testing.assert_close(boxes, torch.tensor([FAR, C]))
    torch.testing.assert_close(scores, torch.tensor([0.3, 0.06]))
    assert labels.tolist() == [1, 0]


def test_detections_sorted_by_score_and_cut_at_max_detections():
    boxes = [[FAR, A], [A, FAR], [[20.0, 20.0, 30.0, 30.0], FAR]]
    scores = [[0.2, 0.5], [0.9, 0.1], [0.7, 0.3]]
    out_boxes, out_scores, out_labels = nms(boxes, scores, max_detections=3)
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.7, 0.5]))
    assert out_labels.tolist() == [0, 0, 1]
    torch.testing.assert_close(out_boxes, torch.tensor([A, [20.0, 20.0, 30.0, 30.0], A]))
    # negative keeps all: class 0 keeps its three boxes, class 1 keeps A 0.5 and FAR 0.3 (FAR 0.1 is the same box)
    all_scores = nms(boxes, scores, max_detections=-1)[1]
    torch.testing.assert_close(all_scores, torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2]))
    assert len(nms(boxes, scores, max_detections=0)[0]) == 0
    torch.testing.assert_close(nms(boxes, scores, max_detections=1)[1], torch.tensor([0.9]))


def test_empty_and_non_finite_detections_are_dropped():
    nan, inf = math.nan, math.inf
    boxes = [
        [[0.0, 0.0, 0.0, 10.0]],  # zero width, e.g. clipped to the border
        [[0.0, 5.0, 10.0, 5.0]],  # zero height
        [[0.0, 0.0, nan, 10.0]],
        [[0.0, 0.0, 10.0, inf]],
        [FAR],
        [A],
    ]
    scores = [[0.9], [0.9], [0.9], [0.9], [nan], [0.6]]
    out_boxes, out_scores, out_labels = nms(boxes, scores)
    torch.testing.assert_close(out_boxes, torch.tensor([A]))
    torch.testing.assert_close(out_scores, torch.tensor([0.6]))
    assert out_labels.tolist() == [0]
    # an infinite score is dropped as well
    assert len(nms([[A]], [[inf]])[0]) == 0


def test_no_detection_at_all():
    boxes, scores, labels = per_class_nms(
        torch.zeros((0, 3, 4)), torch.zeros((0, 3)), score_thresh=0.05, nms_thresh=0.5, max_detections=100
    )
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


# The empty-box rule (MODEL.ROI_HEADS.EMPTY_BOXES). One class; the input image is 100x100, the original 200x200.
# The boxes are already clipped to the input image, as the predictor's are: R1 ([105, 20, 120, 60] before the clip)
# and R3 have no width / height. R5 overlaps R0 at IoU 38*38/40*40 = 0.90 (suppressed); R6 scores below 0.05.
EMPTY_CASE_BOXES = [[10, 10, 50, 50], [100, 20, 100, 60], [60, 60, 90, 90], [0, 30, 40, 30], [20, 60, 50, 95],
                    [12, 12, 50, 50], [5, 5, 30, 30]]
EMPTY_CASE_SCORES = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.04]


def detect(boxes: torch.Tensor, scores: torch.Tensor, *, empty_boxes: str, max_detections: int) -> dict:
    """The model's inference steps on (R, K, 4) boxes and (R, K) scores: candidates, per-class NMS at 0.5 and top-k,
    then the rescale from the 100x100 input to the 200x200 original."""
    from detectron_res.modeling.detector import rescale_detections
    from detectron_res.postprocess import detection_candidates, select_detections

    candidates = detection_candidates(boxes, scores, score_thresh=0.05, empty_boxes=empty_boxes)
    found = select_detections(*candidates, nms_thresh=0.5, max_detections=max_detections)
    detections = dict(zip(("boxes", "scores", "labels"), found))
    return rescale_detections(detections, input_size=(100, 100), output_size=(200, 200))


def test_after_rescale_keeps_empty_boxes_in_the_top_k_as_detectron2_does():
    boxes = torch.tensor(EMPTY_CASE_BOXES, dtype=torch.float32)[:, None]
    scores = torch.tensor(EMPTY_CASE_SCORES)[:, None]
    # detectron_res's rule: the empty boxes never take a place: the top 3 are R0, R2, R4
    out = detect(boxes, scores, empty_boxes="before_nms", max_detections=3)
    assert out["boxes"].tolist() == [[20, 20, 100, 100], [120, 120, 180, 180], [40, 120, 100, 190]]
    # detectron2's (recorded from its fast_rcnn_inference_single_image and detector_postprocess, with R1 unclipped):
    # the top 3 after the NMS are R0, R1 (empty), R2; R1 is dropped after the rescale: 2 detections
    out = detect(boxes, scores, empty_boxes="after_rescale", max_detections=3)
    assert out["boxes"].tolist() == [[20.0, 20.0, 100.0, 100.0], [120.0, 120.0, 180.0, 180.0]]
    assert out["scores"].tolist() == [0.8999999761581421, 0.800000011920929] and out["labels"].tolist() == [0, 0]
    # with room for all, both rules give R0, R2, R4
    for rule in ("before_nms", "after_rescale"):
        out = detect(boxes, scores, empty_boxes=rule, max_detections=100)
        assert out["boxes"].tolist() == [[20, 20, 100, 100], [120, 120, 180, 180], [40, 120, 100, 190]]


def test_after_rescale_drops_a_roi_with_a_non_finite_box_whole_as_detectron2_does():
    # two classes: class 1 repeats class 0's boxes at half the scores; R2's class-1 box is non-finite
    boxes = torch.tensor(EMPTY_CASE_BOXES, dtype=torch.float32)[:, None].repeat(1, 2, 1)
    boxes[2, 1, 0] = math.inf
    scores = torch.tensor(EMPTY_CASE_SCORES)[:, None] * torch.tensor([1.0, 0.5])
    # detectron2 (recorded): R2 is gone for both classes
    out = detect(boxes, scores, empty_boxes="after_rescale", max_detections=100)
    assert out["boxes"].tolist() == [[20, 20, 100, 100], [40, 120, 100, 190], [20, 20, 100, 100], [40, 120, 100, 190]]
    assert out["scores"].tolist() == [0.8999999761581421, 0.6000000238418579, 0.44999998807907104,
                                      0.30000001192092896]
    assert out["labels"].tolist() == [0, 0, 1, 1]
    # detectron_res's rule drops only the non-finite pair: R2 stays in class 0
    out = detect(boxes, scores, empty_boxes="before_nms", max_detections=100)
    assert out["labels"].tolist() == [0, 0, 0, 1, 1] and out["scores"][1].item() == pytest.approx(0.8)


def test_detection_candidates_under_each_empty_box_rule():
    from detectron_res.postprocess import EMPTY_BOX_RULES, detection_candidates

    boxes = torch.tensor(EMPTY_CASE_BOXES, dtype=torch.float32)[:, None]
    scores = torch.tensor(EMPTY_CASE_SCORES)[:, None]
    assert EMPTY_BOX_RULES == ("before_nms", "after_rescale")
    kept, _, _ = detection_candidates(boxes, scores, score_thresh=0.05)  # the default: before_nms
    assert kept.tolist() == [EMPTY_CASE_BOXES[i] for i in (0, 2, 4, 5)]
    kept, _, _ = detection_candidates(boxes, scores, score_thresh=0.05, empty_boxes="after_rescale")
    assert kept.tolist() == EMPTY_CASE_BOXES[:6]
    _, _, labels = per_class_nms(boxes, scores, score_thresh=0.05, nms_thresh=0.5, max_detections=3,
                                 empty_boxes="after_rescale")
    assert len(labels) == 3
    with pytest.raises(ValueError, match=r"^empty_boxes must be one of \['before_nms', 'after_rescale'\], got 'd2'$"):
        detection_candidates(boxes, scores, score_thresh=0.05, empty_boxes="d2")
