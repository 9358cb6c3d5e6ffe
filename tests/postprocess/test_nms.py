"""Per-class NMS and the non-empty box mask on hand-made boxes and scores."""

import math

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
