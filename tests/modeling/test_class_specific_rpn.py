"""The class-specific RPN of the localization system: head layout, anchor targets (8 per image at 1:1, only the true
class's outputs trained), losses worked out by hand, and per-class inference."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder

from detectron_res.modeling.rpn import AnchorGenerator
from detectron_res.modeling.rpn.class_specific_rpn import ClassSpecificRPN, ClassSpecificRPNHead, select_per_class


class FixedHead(nn.Module):
    """Returns the given (N, R, C) logits and (N, R, C, 4) deltas whatever the features."""

    def __init__(self, logits: torch.Tensor, deltas: torch.Tensor):
        super().__init__()
        self.logits, self.deltas = logits, deltas
        self.num_classes = logits.shape[-1]

    def forward(self, features):
        return self.logits, self.deltas


def make_rpn(head, **overrides) -> ClassSpecificRPN:
    """One 16-px square anchor per cell of a stride-16 map, centred at (i + 0.5) * 16; box coder weights 1."""
    args = dict(
        head=head,
        anchor_generator=AnchorGenerator(sizes=[16], aspect_ratios=[1.0], stride=16, offset=0.5),
        box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
        positive_iou=0.7,
        negative_iou=0.3,
        batch_size_per_image=8,
        positive_fraction=0.5,
        boundary_thresh=-1,
        pre_nms_topk=100,
        post_nms_topk=100,
        nms_thresh=0.7,
        min_size=0.0,
        smooth_l1_beta=0.5,
    )
    args.update(overrides)
    return ClassSpecificRPN(**args)


def bce(logit: float, target: float) -> float:
    return math.log1p(math.exp(-logit)) if target == 1 else math.log1p(math.exp(logit))


def test_head_reads_channel_a_times_c_plus_c_at_each_cell_in_height_width_anchor_order():
    head = ClassSpecificRPNHead(in_channels=1, head_channels=1, num_anchors=2, num_classes=3)
    with torch.no_grad():
        for layer in (head.cls_logits, head.bbox_deltas):
            layer.weight.zero_()
        head.cls_logits.bias.copy_(torch.arange(6.0))  # channel a * C + c
        head.bbox_deltas.bias.copy_(torch.arange(24.0))  # channel (a * C + c) * 4 + k
    logits, deltas = head(torch.zeros(1, 1, 2, 3))  # H = 2, W = 3: R = 2 * 3 * 2 anchors
    assert logits.shape == (1, 12, 3) and deltas.shape == (1, 12, 3, 4)
    for r in range(12):
        a = r % 2  # anchors vary fastest, then width, then height
        assert logits[0, r].tolist() == [a * 3 + c for c in range(3)]
        assert deltas[0, r].tolist() == [[(a * 3 + c) * 4 + k for k in range(4)] for c in range(3)]
    assert head.conv.kernel_size == (3, 3) and head.cls_logits.kernel_size == (1, 1)


def test_head_output_shapes_for_many_classes_and_its_initialisation():
    torch.manual_seed(0)
    head = ClassSpecificRPNHead(in_channels=8, head_channels=64, num_anchors=3, num_classes=100)
    for layer in (head.conv, head.cls_logits, head.bbox_deltas):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05) and layer.bias.abs().sum() == 0
    head = ClassSpecificRPNHead(in_channels=8, head_channels=4, num_anchors=3, num_classes=10)
    logits, deltas = head(torch.randn(2, 8, 4, 5))
    assert logits.shape == (2, 4 * 5 * 3, 10) and deltas.shape == (2, 4 * 5 * 3, 10, 4)
    assert head.cls_logits.out_channels == 30 and head.bbox_deltas.out_channels == 120


def two_anchor_rpn(logits, deltas, **overrides):
    """Anchors [0, 0, 16, 16] and [16, 0, 32, 16] (a 1 x 2 map), 3 classes."""
    return make_rpn(FixedHead(logits, deltas), **overrides)


def test_loss_trains_only_the_true_class_output_and_regressor():
    logits = torch.tensor([[[5.0, -1.0, 0.5], [3.0, 2.0, -0.7]]], requires_grad=True)
    deltas = torch.zeros(1, 2, 3, 4)
    deltas[0, 0, 2] = torch.tensor([0.1, -0.2, 0.0, 0.3])  # the positive's own class: these count
    deltas[0, 0, 0] = 9.0  # other classes' deltas of the positive: no target
    deltas[0, 1] = 7.0  # the negative's deltas: no target
    deltas.requires_grad_(True)
    rpn = two_anchor_rpn(logits, deltas)
    losses = rpn.losses(
        torch.zeros(1, 1, 1, 2), [(16, 32)], [torch.tensor([[0.0, 0.0, 16.0, 16.0]])], [torch.tensor([2])],
        [torch.tensor([2])],
    )
    # anchor 0 is the box (IoU 1): positive of class 2; anchor 1 (IoU 0): negative, trains class 2 towards 0;
    # both sampled (8 per image); sums divided by 8 anchors x 1 image
    assert losses["loss_rpn_cls"].item() == pytest.approx((bce(0.5, 1) + bce(-0.7, 0)) / 8, rel=1e-6)
    # smooth L1 (beta 0.5: 0.5 x^2 / beta below it) of the deltas against zero targets (anchor == box)
    assert losses["loss_rpn_loc"].item() == pytest.approx((0.01 + 0.04 + 0.0 + 0.09) / 8, rel=1e-6)
    sum(losses.values()).backward()
    assert logits.grad[0, :, :2].abs().sum() == 0  # classes 0 and 1 got no gradient at all
    assert logits.grad[0, :, 2].ne(0).all()
    assert deltas.grad[0, 0, :2].abs().sum() == 0 and deltas.grad[0, 1].abs().sum() == 0
    assert deltas.grad[0, 0, 2].ne(0).sum() == 3  # the zero delta sits at the minimum of its loss


def test_negative_anchors_train_the_class_of_the_box_they_overlap_most():
    rpn = two_anchor_rpn(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, 4))
    anchors = torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16], [32, 0, 48, 16], [48, 0, 64, 16]])
    boxes = torch.tensor([[0.0, 0, 16, 16], [36.0, 0, 52, 16]])  # class 1 on anchor 0; class 3 across anchors 2, 3
    labels, classes, matched = rpn.label_and_sample_anchors(
        anchors, [boxes], [torch.tensor([1, 3])], [torch.tensor([1, 3])], [(16, 64)]
    )
    # anchor 2: IoU 0.6 with the class-3 box, its best anchor, so positive; anchor 3: IoU 64 / 448 < 0.3, negative
    assert labels.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # anchor 1 touches no box (nearest by IoU: box 0, the first of equals); anchor 3's most overlapped box has class 3
    assert classes.tolist() == [[1, 1, 3, 3]]
    assert matched[0, 2].tolist() == [36.0, 0, 52, 16]


def test_a_crop_without_boxes_gives_negatives_of_the_image_class_and_ignored_regions_give_none():
    rpn = two_anchor_rpn(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, 4))
    anchors = torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16]])
    labels, classes, _ = rpn.label_and_sample_anchors(
        anchors, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], [torch.tensor([3])], [(16, 32)]
    )
    assert labels.tolist() == [[0.0, 0.0]] and classes.tolist() == [[3, 3]]
    labels, _, _ = rpn.label_and_sample_anchors(
        anchors, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], [torch.tensor([3])], [(16, 32)],
        [torch.tensor([[16.0, 0, 28, 16]])],  # IoU 0.75 with anchor 1: not a negative
    )
    assert labels.tolist() == [[0.0, -1.0]]
    with pytest.raises(ValueError, match="without any class"):
        rpn.label_and_sample_anchors(anchors, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)],
                                     [torch.zeros(0, dtype=torch.long)], [(16, 32)])


@pytest.mark.parametrize("num_boxes, expected", [(6, (4, 4)), (4, (4, 4)), (1, (1, 7))])
def test_eight_anchors_are_sampled_per_image_at_one_to_one(num_boxes, expected):
    rpn = make_rpn(FixedHead(torch.zeros(1, 16, 2), torch.zeros(1, 16, 2, 4)))
    anchors = AnchorGenerator(sizes=[16], aspect_ratios=[1.0], stride=16, offset=0.5)((4, 4))  # 16 cells
    boxes = anchors[:num_boxes].clone()
    torch.manual_seed(0)
    labels, _, _ = rpn.label_and_sample_anchors(
        anchors, [boxes], [torch.zeros(num_boxes, dtype=torch.long)], [torch.tensor([0])], [(64, 64)]
    )
    assert (int((labels == 1).sum()), int((labels == 0).sum())) == expected
    assert (labels[0, :num_boxes] != 0).all()  # no positive anchor is ever sampled as a negative


def test_class_boxes_decode_each_class_with_its_own_deltas_grouped_in_the_order_asked():
    logits = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 0.0, -1.0]]])  # anchors 0, 1; classes 0, 1, 2
    deltas = torch.zeros(1, 2, 3, 4)
    deltas[0, 0, 0, 0] = 0.5  # class 0 at anchor 0 moves right by half a width (8 px); other classes stay
    rpn = two_anchor_rpn(logits, deltas)
    (result,) = rpn.class_boxes(torch.zeros(1, 1, 1, 2), [(16, 32)], [torch.tensor([2, 0])])
    assert result["labels"].tolist() == [2, 2, 0, 0]
    assert result["boxes"].tolist() == [[0, 0, 16, 16], [16, 0, 32, 16], [8, 0, 24, 16], [16, 0, 32, 16]]
    expected = torch.sigmoid(torch.tensor([3.0, -1.0, 1.0, 0.0]))
    assert torch.allclose(result["scores"], expected)
    # the 8-px shifted class-0 box overlaps anchor 1 with IoU 1/3: kept at NMS 0.7, suppressed at 0.3
    (result,) = two_anchor_rpn(logits, deltas, nms_thresh=0.3, post_nms_topk=1).class_boxes(
        torch.zeros(1, 1, 1, 2), [(16, 32)], [torch.tensor([2, 0])]
    )
    assert result["labels"].tolist() == [2, 0] and result["boxes"][1].tolist() == [8, 0, 24, 16]
    assert torch.allclose(rpn.image_class_scores(torch.zeros(1, 1, 1, 2)), torch.sigmoid(torch.tensor([[1.0, 0.0, 3.0]])))


def test_select_per_class_suppresses_within_a_class_only_and_keeps_top_k_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    columns = torch.tensor([0, 0, 1, 0, 1])  # the last box is empty: dropped
    out = select_per_class(boxes, scores, columns, torch.tensor([7, 4]), nms_thresh=0.5, topk=5, min_size=0.0)
    assert out["labels"].tolist() == [7, 7, 4]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6, 0.7])
    out = select_per_class(boxes, scores, columns, torch.tensor([7, 4]), nms_thresh=0.5, topk=1, min_size=0.0)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])
    # a side of at most min_size drops a box; a non-finite box drops only itself
    boxes[3] = torch.tensor([20.0, 20.0, 25.0, 30.0])
    boxes[2, 0] = float("nan")
    out = select_per_class(boxes, scores, columns, torch.tensor([7, 4]), nms_thresh=0.5, topk=5, min_size=5.0)
    assert out["labels"].tolist() == [7] and out["scores"].tolist() == pytest.approx([0.9])
    out = select_per_class(boxes, scores, columns, torch.tensor([7, 4]), nms_thresh=0.5, topk=5, min_size=0.0)
    assert out["labels"].tolist() == [7, 7] and out["scores"].tolist() == pytest.approx([0.9, 0.6])


def test_losses_of_two_images_are_divided_by_eight_anchors_times_two_and_ignore_regions_reach_the_sampling():
    logits = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 0.0, -0.7]], [[1.5, 0.0, 0.0], [-2.0, 0.0, 0.0]]])
    rpn = two_anchor_rpn(logits, torch.zeros(2, 2, 3, 4))
    args = (
        torch.zeros(2, 1, 1, 2), [(16, 32), (16, 32)],
        [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]])],
        [torch.tensor([2]), torch.tensor([0])], [torch.tensor([2]), torch.tensor([0])],
    )
    losses = rpn.losses(*args)
    # image 1: class 2 at anchors 0 (positive) and 1 (negative); image 2: class 0 likewise; divided by 8 x 2
    expected = (bce(0.5, 1) + bce(-0.7, 0) + bce(1.5, 1) + bce(-2.0, 0)) / 16
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected, rel=1e-6)
    # an ignore region on image 2's anchor 1 takes that negative out of the loss
    ignored = rpn.losses(*args, [torch.zeros(0, 4), torch.tensor([[16.0, 0.0, 32.0, 16.0]])])
    assert ignored["loss_rpn_cls"].item() == pytest.approx(expected - bce(-2.0, 0) / 16, rel=1e-6)
