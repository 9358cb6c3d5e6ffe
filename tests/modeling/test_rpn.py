"""The RPN stage by stage on hand-made inputs: head, prediction layout, proposal selection, anchor labels and
sampling, loss values and their normalisation, non-finite proposals.

A `FixedHead` stands in for the conv head so that objectness and deltas are chosen by the test; box coder weights
are 1 so that a delta dx moves the centre by dx * anchor width.
"""

import math

import pytest
import torch

from detectron_res.modeling.rpn import AnchorGenerator, NonFiniteProposalsError, RPNHead
from rpn_stubs import FixedHead, make_rpn


# ---------------------------------------------------------------------------------------------------- the head


def test_head_is_conv3x3_relu_then_1x1_objectness_and_deltas():
    head = RPNHead(in_channels=1, head_channels=1, num_anchors=1)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0  # the cell itself
        head.conv.weight[0, 0, 1, 2] = 0.5  # its right neighbour
        head.objectness_logits.weight.fill_(2.0)
        head.objectness_logits.bias.fill_(0.5)
        head.anchor_deltas.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
        head.anchor_deltas.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
    objectness, deltas = head(torch.tensor([[[[-4.0, 3.0]]]]))
    # conv: cell 0: -4 + 0.5 * 3 = -2.5 -> ReLU 0; cell 1: 3 + 0.5 * 0 (zero padding) = 3
    # objectness 2 * [0, 3] + 0.5; deltas k: (k + 1) * [0, 3] + bias_k
    torch.testing.assert_close(objectness, torch.tensor([[[[0.5, 6.5]]]]))
    torch.testing.assert_close(
        deltas, torch.tensor([[[[0.0, 3.0]], [[0.0, 6.0]], [[0.0, 9.0]], [[-1.0, 11.0]]]])
    )


def test_head_shapes_and_initialisation():
    torch.manual_seed(0)
    head = RPNHead(in_channels=32, head_channels=64, num_anchors=15)
    objectness, deltas = head(torch.randn(2, 32, 3, 5))
    assert objectness.shape == (2, 15, 3, 5) and deltas.shape == (2, 60, 3, 5)
    assert head.conv.kernel_size == (3, 3) and head.conv.padding == (1, 1)
    assert head.objectness_logits.kernel_size == (1, 1) and head.anchor_deltas.kernel_size == (1, 1)
    for layer in (head.conv, head.objectness_logits, head.anchor_deltas):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert layer.weight.mean().abs().item() < 0.002
        assert (layer.bias == 0).all()


# ------------------------------------------------------------------------------------ layout and proposals


def test_predictions_are_read_in_height_width_anchor_order_and_decoded_on_their_anchor():
    # A = 2 anchors (16 and 32 px squares) on a 2 x 3 map, centres (8 | 24 | 40, 8 | 24); image 32 high, 48 wide
    generator = AnchorGenerator(sizes=[16, 32], aspect_ratios=[1.0], stride=16, offset=0.5)
    objectness = torch.full((1, 2, 2, 3), -10.0)
    deltas = torch.zeros(1, 8, 2, 3)
    objectness[0, 1, 1, 2] = 5.0  # anchor 1 of cell (y=1, x=2): [24, 8, 56, 40]
    deltas[0, 1 * 4 + 0, 1, 2] = 0.25  # its dx: centre 40 + 0.25 * 32 = 48 -> [32, 8, 64, 40]
    objectness[0, 0, 0, 1] = 3.0  # anchor 0 of cell (y=0, x=1): [16, 0, 32, 16]
    deltas[0, 0 * 4 + 3, 0, 1] = math.log(2.0)  # its dh: height 32 about centre 8 -> [16, -8, 32, 24]
    rpn = make_rpn(FixedHead(objectness, deltas), anchor_generator=generator, post_nms_topk=(100, 2)).eval()
    proposals, losses = rpn(torch.zeros(1, 4, 2, 3), [(32, 48)])
    assert losses == {}
    # clipped to the 48 x 32 image, best objectness first
    torch.testing.assert_close(proposals[0], torch.tensor([[32.0, 8.0, 48.0, 32.0], [16.0, 0.0, 32.0, 24.0]]))


ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 6.0],  # IoU 0.6 with the first
        [20.0, 0.0, 24.0, 10.0],  # 4 wide
        [50.0, 50.0, 70.0, 70.0],  # crosses the bottom of the 60-high image
        [-10.0, 0.0, 3.0, 10.0],  # 3 wide once clipped
    ]
)


def select(rpn, objectness, deltas=None, image_sizes=((60, 80),), anchors=ANCHORS):
    if deltas is None:
        deltas = torch.zeros(*objectness.shape, 4)
    return rpn.find_top_proposals(anchors, objectness, deltas, list(image_sizes))


def test_proposals_are_clipped_then_filtered_by_min_size_then_nms():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    rpn = make_rpn(min_size=4.0).eval()
    # the 4-wide box is not larger than 4, nor the clipped 3-wide one; the IoU 0.6 pair survives NMS at 0.7
    expected = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [50.0, 50.0, 70.0, 60.0]])
    torch.testing.assert_close(select(rpn, scores)[0], expected)
    rpn.min_size = 3.5
    assert len(select(rpn, scores)[0]) == 4  # the 4-wide box is back, the 3-wide one still out
    rpn.nms_thresh = 0.5
    torch.testing.assert_close(
        select(rpn, scores)[0], torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 24.0, 10.0], [50.0, 50.0, 70.0, 60.0]])
    )


def test_proposals_sorted_by_objectness_and_image_size_is_height_width():
    scores = torch.tensor([[1.0, -1.0, 2.0, 3.0, -5.0]])
    # image 60 high, 22 wide: the 4-wide box is cut to [20, 0, 22, 10], the 50..70 box vanishes (x1 > 22)
    out = select(make_rpn().eval(), scores, image_sizes=[(60, 22)])[0]
    torch.testing.assert_close(
        out,
        torch.tensor([[20.0, 0.0, 22.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 3.0, 10.0]]),
    )


def test_deltas_are_decoded_on_the_anchors_of_the_top_scores():
    scores = torch.tensor([[0.0, 0.0, 0.0, 9.0, 0.0]])
    deltas = torch.zeros(1, 5, 4)
    deltas[0, 3] = torch.tensor([-0.5, -1.0, 0.0, math.log(0.5)])  # [50, 50, 70, 70] -> centre (50, 40), 20 x 10
    rpn = make_rpn(pre_nms_topk=(1, 1)).eval()
    torch.testing.assert_close(select(rpn, scores, deltas)[0], torch.tensor([[40.0, 35.0, 60.0, 45.0]]))


def test_training_and_inference_use_their_own_top_k():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    far_apart = torch.tensor([[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(5)])
    rpn = make_rpn(pre_nms_topk=(3, 2), post_nms_topk=(100, 100))
    assert len(select(rpn.train(), scores, anchors=far_apart)[0]) == 3
    assert len(select(rpn.eval(), scores, anchors=far_apart)[0]) == 2
    rpn = make_rpn(pre_nms_topk=(100, 100), post_nms_topk=(4, 1))
    assert len(select(rpn.train(), scores, anchors=far_apart)[0]) == 4
    torch.testing.assert_close(select(rpn.eval(), scores, anchors=far_apart)[0], far_apart[:1])


# -------------------------------------------------------------------------------------- non-finite proposals


def test_non_finite_score_or_box_in_training_raises_naming_the_image():
    scores = torch.zeros(2, 5)
    scores[1, 2] = math.nan
    rpn = make_rpn().train()
    message = "predicted 1 non-finite proposal boxes or scores for image 1 of the batch"
    with pytest.raises(NonFiniteProposalsError, match=message) as info:
        select(rpn, scores, image_sizes=[(60, 80), (60, 80)])
    assert info.value.image_index == 1 and isinstance(info.value, FloatingPointError)

    deltas = torch.zeros(2, 5, 4)
    deltas[0, 4, 0] = math.nan  # dx only: x1 and x2 are NaN, y1 and y2 finite
    deltas[0, 1, 2] = math.inf  # dw is clamped by the coder: still finite
    with pytest.raises(NonFiniteProposalsError, match="predicted 1 non-finite .* image 0 of") as info:
        select(rpn, torch.zeros(2, 5), deltas, image_sizes=[(60, 80), (60, 80)])
    assert info.value.image_index == 0


def test_non_finite_proposals_are_dropped_at_inference():
    scores = torch.tensor([[5.0, math.nan, 3.0, math.inf, 1.0]])
    deltas = torch.zeros(1, 5, 4)
    deltas[0, 0, 0] = math.nan
    out = select(make_rpn().eval(), scores, deltas)[0]
    torch.testing.assert_close(out, torch.tensor([[20.0, 0.0, 24.0, 10.0], [0.0, 0.0, 3.0, 10.0]]))


# ------------------------------------------------------------------------------------- anchor labels, sampling


def test_boundary_filter_ignores_anchors_crossing_by_more_than_the_threshold():
    rpn = make_rpn(boundary_thresh=8)
    # image 44 high, 60 wide: inside means x1 >= -8, y1 >= -8, x2 < 68, y2 < 52
    anchors = torch.tensor(
        [
            [-8.0, 0.0, 32.0, 32.0],
            [-9.0, 0.0, 32.0, 32.0],
            [0.0, -8.0, 32.0, 32.0],
            [0.0, -9.0, 32.0, 32.0],
            [32.0, 0.0, 67.0, 32.0],
            [32.0, 0.0, 68.0, 32.0],
            [0.0, 16.0, 32.0, 51.0],
            [0.0, 16.0, 32.0, 52.0],
            [32.0, 0.0, 90.0, 32.0],
            [0.0, 16.0, 32.0, 90.0],
        ]
    )
    labels, _ = rpn.label_and_sample_anchors(anchors, [torch.zeros((0, 4))], [(44, 60)])
    assert labels.tolist() == [[0.0, -1.0, 0.0, -1.0, 0.0, -1.0, 0.0, -1.0, -1.0, -1.0]]
    rpn.boundary_thresh = -1  # negative: keep every anchor
    labels, _ = rpn.label_and_sample_anchors(anchors, [torch.zeros((0, 4))], [(44, 60)])
    assert labels.tolist() == [[0.0] * 10]


def test_anchors_are_matched_to_their_best_box():
    rpn = make_rpn()
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 0.0, 96.0, 32.0]])
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 0.0, 96.0, 32.0], [66.0, 0.0, 98.0, 32.0], [0.0, 64.0, 32.0, 96.0]])
    labels, matched = rpn.label_and_sample_anchors(anchors, [gt, torch.zeros((0, 4))], [(128, 128), (128, 128)])
    # IoU([66, 0, 98, 32], box 1) = 30 * 32 / (2 * 1024 - 960) = 0.88; the last anchor overlaps nothing
    assert labels.tolist() == [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(matched[0, :3], gt[[0, 1, 1]])
    torch.testing.assert_close(matched[1], torch.zeros(4, 4))  # no ground truth: zeros


def test_sampling_takes_batch_size_per_image_at_the_positive_fraction():
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    # 3 positives (shifted by 0, 1, 2 px: IoU >= 30 * 32 / (2048 - 960) = 0.88) and 6 negatives
    positives = [[float(d), 0.0, 32.0 + d, 32.0] for d in range(3)]
    negatives = [[100.0 + 40 * i, 0.0, 132.0 + 40 * i, 32.0] for i in range(6)]
    anchors = torch.tensor(positives + negatives)
    rpn = make_rpn(batch_size_per_image=4, positive_fraction=0.5)
    labels, _ = rpn.label_and_sample_anchors(anchors, [gt], [(512, 512)])
    assert (labels[0, :3] != 0).all() and (labels[0, 3:] != 1).all()
    assert (labels == 1).sum() == 2 and (labels == 0).sum() == 2 and (labels == -1).sum() == 5
    rpn = make_rpn(batch_size_per_image=4, positive_fraction=0.25)
    labels, _ = rpn.label_and_sample_anchors(anchors, [gt], [(512, 512)])
    assert (labels == 1).sum() == 1 and (labels == 0).sum() == 3


# ------------------------------------------------------------------------------------------------- the losses


def test_losses_are_sums_over_sampled_anchors_divided_by_batch_size_per_image_times_images():
    rpn = make_rpn(batch_size_per_image=4, smooth_l1_beta=0.5, loss_weight=2.0)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]])
    objectness = torch.tensor([[0.0, math.log(3.0), 100.0], [-100.0, math.log(3.0), 0.0]], requires_grad=True)
    matched = torch.zeros(2, 3, 4)
    matched[0, 0] = torch.tensor([2.0, 0.0, 22.0, 10.0])  # target of anchor 0: dx = (12 - 5) / 10 = 0.7, dw = log 2
    matched[1, 1] = anchors[1]  # target 0
    deltas = torch.full((2, 3, 4), 9.0)  # only the positives' deltas count
    deltas[0, 0] = torch.tensor([0.2, 0.0, 0.0, 0.0])
    deltas[1, 1] = torch.tensor([0.0, 0.1, 0.0, 0.0])
    losses = rpn.losses(anchors, objectness, deltas, labels, matched)
    # log loss: image 0: positive at logit 0 -> log 2, negative at log 3 -> log(1 + 3) = log 4;
    # image 1: positive at log 3 -> log(1 + 1/3) = log(4/3), negative at 0 -> log 2. Sum 6 log 2 - log 3.
    # normaliser: 4 anchors per image * 2 images = 8; loss weight 2
    expected_cls = (6 * math.log(2.0) - math.log(3.0)) * 2.0 / 8
    # smooth L1 (beta 0.5): |0.2 - 0.7| = 0.5 -> 0.5 - 0.25 = 0.25; |0 - log 2| -> log 2 - 0.25;
    # |0.1 - 0| = 0.1 -> 0.5 * 0.01 / 0.5 = 0.01. (Encoding the anchor relative to the box would give dx = -0.35.)
    expected_loc = (0.25 + math.log(2.0) - 0.25 + 0.01) * 2.0 / 8
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_rpn_loc"].item() == pytest.approx(expected_loc, rel=1e-5)
    losses["loss_rpn_cls"].backward()
    # d/dx of log(1 + e^x) at x = log 3 (negative of image 0) is 3/4, times 2/8; the unsampled logit gets none
    assert objectness.grad[0, 1].item() == pytest.approx(0.75 * 0.25)
    assert objectness.grad[0, 2].item() == 0.0


def test_training_forward_labels_samples_and_returns_both_losses():
    # two anchors [0, 0, 16, 16] and [16, 0, 32, 16]; the box is the first -> 1 positive, 1 negative
    objectness = torch.tensor([[[[0.0, math.log(3.0)]]]], requires_grad=True)
    deltas = torch.zeros(1, 4, 1, 2)
    deltas[0, 0, 0, 0] = 0.5  # dx of the positive, whose target is 0
    deltas[0, :, 0, 1] = 7.0  # the negative's deltas do not count
    deltas.requires_grad_(True)
    rpn = make_rpn(FixedHead(objectness, deltas), batch_size_per_image=4, boundary_thresh=0, smooth_l1_beta=1 / 9).train()
    proposals, losses = rpn(torch.zeros(1, 4, 1, 2), [(32, 48)], [torch.tensor([[0.0, 0.0, 16.0, 16.0]])])
    # (log 2 + log 4) / 4 and (0.5 - 0.5 / 9) / 4
    assert losses["loss_rpn_cls"].item() == pytest.approx(3 * math.log(2.0) / 4, rel=1e-5)
    assert losses["loss_rpn_loc"].item() == pytest.approx((0.5 - 0.5 / 9) / 4, rel=1e-5)
    sum(losses.values()).backward()
    assert deltas.grad[0, 0, 0, 0].item() == pytest.approx(0.25)  # smooth L1 slope 1, divided by 4
    assert len(proposals) == 1 and not proposals[0].requires_grad
    with pytest.raises(ValueError, match=r"^RPN needs gt_boxes in training mode$"):
        rpn(torch.zeros(1, 4, 1, 2), [(32, 48)])


def test_proposals_and_anchor_targets_carry_no_gradient():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]], requires_grad=True)
    deltas = torch.zeros(1, 5, 4, requires_grad=True)
    proposals = make_rpn().train().find_top_proposals(ANCHORS, scores, deltas, [(60, 80)])
    assert not proposals[0].requires_grad
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    labels, matched = make_rpn().label_and_sample_anchors(ANCHORS, [gt], [(60, 80)])
    assert not labels.requires_grad and not matched.requires_grad
