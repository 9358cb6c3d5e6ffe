"""Box voting with hand-worked numbers: weights are the voters' scores, IoU exactly at the threshold votes, labels
never mix, and detections without voters keep their box."""

import torch

from detectron_res.postprocess import box_voting, select_detections


def three_overlapping_boxes_of_two_classes():
    """Class 0: A (0.9) and B (0.6), IoU(A, B) = 100 / 200 = 0.5 exactly; C (0.3) overlaps A by 50 / 150 = 1/3.
    Class 1: D (0.8) on top of A, and E (0.2) with IoU(D, E) = 100 / 120."""
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A
            [0.0, 0.0, 10.0, 20.0],  # B
            [5.0, 0.0, 15.0, 10.0],  # C
            [0.0, 0.0, 10.0, 10.0],  # D
            [0.0, 0.0, 10.0, 12.0],  # E
        ]
    )
    scores = torch.tensor([0.9, 0.6, 0.3, 0.8, 0.2])
    labels = torch.tensor([0, 0, 0, 1, 1])
    return boxes, scores, labels


def test_each_kept_box_becomes_the_score_weighted_mean_of_its_class_voters():
    pool = three_overlapping_boxes_of_two_classes()
    boxes, scores, labels = pool
    kept = torch.tensor([0, 3])  # A and D survive the NMS
    voted = box_voting(boxes[kept], scores[kept], labels[kept], *pool, iou_thresh=0.5)
    # A: A and B vote (IoU 0.5 counts), C does not (1/3), D is another class: y2 = (0.9 * 10 + 0.6 * 20) / 1.5 = 14
    # D: D and E vote: y2 = (0.8 * 10 + 0.2 * 12) / 1.0 = 10.4
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0.0, 10.0, 14.0], [0.0, 0.0, 10.0, 10.4]]))


def test_a_threshold_above_the_iou_leaves_the_neighbour_out():
    pool = three_overlapping_boxes_of_two_classes()
    boxes, scores, labels = pool
    voted = box_voting(boxes[:1], scores[:1], labels[:1], *pool, iou_thresh=0.51)
    torch.testing.assert_close(voted, boxes[:1])  # B no longer votes: A alone
    voted = box_voting(boxes[:1], scores[:1], labels[:1], *pool, iou_thresh=0.3)
    # C votes too: x1 = 0.3 * 5 / 1.8, x2 = (0.9 * 10 + 0.6 * 10 + 0.3 * 15) / 1.8, y2 = (9 + 12 + 3) / 1.8
    torch.testing.assert_close(voted, torch.tensor([[1.5 / 1.8, 0.0, 19.5 / 1.8, 24.0 / 1.8]]))


def test_empty_pool_empty_detections_and_a_box_without_neighbours():
    boxes, scores, labels = three_overlapping_boxes_of_two_classes()
    empty_boxes, empty = torch.zeros((0, 4)), torch.zeros(0)
    empty_labels = torch.zeros(0, dtype=torch.int64)
    torch.testing.assert_close(box_voting(boxes, scores, labels, empty_boxes, empty, empty_labels), boxes)
    assert box_voting(empty_boxes, empty, empty_labels, boxes, scores, labels).shape == (0, 4)
    lonely = torch.tensor([[50.0, 50.0, 60.0, 60.0]])
    out = box_voting(lonely, torch.tensor([0.7]), torch.tensor([0]), boxes, scores, labels)
    torch.testing.assert_close(out, lonely)  # no pool box overlaps it: unchanged
    out = box_voting(boxes[3:4], scores[3:4], torch.tensor([2]), boxes, scores, labels)
    torch.testing.assert_close(out, boxes[3:4])  # the overlapping boxes are of other classes


def test_select_detections_votes_over_all_candidates_after_the_nms():
    boxes, scores, labels = three_overlapping_boxes_of_two_classes()
    plain = select_detections(boxes, scores, labels, nms_thresh=0.5, max_detections=-1)
    # class 0: A kept, B (IoU 0.5, not > 0.5) kept, C kept; class 1: D kept, E (IoU 0.83) suppressed
    torch.testing.assert_close(plain[1], torch.tensor([0.9, 0.8, 0.6, 0.3]))
    voted = select_detections(boxes, scores, labels, nms_thresh=0.5, max_detections=2, vote_iou_thresh=0.5)
    torch.testing.assert_close(voted[0], torch.tensor([[0.0, 0.0, 10.0, 14.0], [0.0, 0.0, 10.0, 10.4]]))
    torch.testing.assert_close(voted[1], torch.tensor([0.9, 0.8]))
    assert voted[2].tolist() == [0, 1]


def test_the_default_voting_threshold_is_one_half():
    pool = three_overlapping_boxes_of_two_classes()
    boxes, scores, labels = pool
    # no iou_thresh: 0.5, so B (IoU exactly 0.5) votes for A: y2 = (0.9 * 10 + 0.6 * 20) / 1.5 = 14, as above
    voted = box_voting(boxes[:1], scores[:1], labels[:1], *pool)
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0.0, 10.0, 14.0]]))


def test_a_pool_of_one_box_votes_alone():
    boxes, scores, labels = three_overlapping_boxes_of_two_classes()
    # A (label 0) with B as the only pool box: IoU 0.5, so A becomes B (0.6 * B / 0.6)
    voted = box_voting(boxes[:1], scores[:1], labels[:1], boxes[1:2], scores[1:2], labels[1:2], iou_thresh=0.5)
    torch.testing.assert_close(voted, boxes[1:2])
    # C alone overlaps A by 1/3 only: no voter, A keeps its box
    voted = box_voting(boxes[:1], scores[:1], labels[:1], boxes[2:3], scores[2:3], labels[2:3], iou_thresh=0.5)
    torch.testing.assert_close(voted, boxes[:1])


def test_voted_boxes_keep_the_dtype_of_the_boxes_whatever_the_scores_dtype():
    boxes, scores, labels = three_overlapping_boxes_of_two_classes()
    # float64 boxes, float32 scores: A still becomes y2 = (0.9 * 10 + 0.6 * 20) / 1.5 = 14, in float64
    wide = boxes.double()
    voted = box_voting(wide[:1], scores[:1], labels[:1], wide, scores, labels, iou_thresh=0.5)
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0.0, 10.0, 14.0]], dtype=torch.float64))
    # float32 boxes, float64 scores: the same box, in float32
    voted = box_voting(boxes[:1], scores[:1].double(), labels[:1], boxes, scores.double(), labels, iou_thresh=0.5)
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0.0, 10.0, 14.0]]))


def test_select_detections_votes_at_the_threshold_it_is_given():
    boxes, scores, labels = three_overlapping_boxes_of_two_classes()
    # NMS keeps A first; at a voting IoU of 0.3, C (IoU 1/3) votes for A as well as B (IoU 0.5):
    # x1 = 0.3 * 5 / 1.8, x2 = (0.9 * 10 + 0.6 * 10 + 0.3 * 15) / 1.8, y2 = (0.9 * 10 + 0.6 * 20 + 0.3 * 10) / 1.8
    voted = select_detections(boxes, scores, labels, nms_thresh=0.5, max_detections=1, vote_iou_thresh=0.3)
    torch.testing.assert_close(voted[0], torch.tensor([[1.5 / 1.8, 0.0, 19.5 / 1.8, 24.0 / 1.8]]))
    torch.testing.assert_close(voted[1], torch.tensor([0.9]))
