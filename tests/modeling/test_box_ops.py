"""Box coding, anchor matching and sampling: torchvision's BoxCoder / Matcher / sampler as the model uses them,
including images without ground truth."""

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder

from detectron_res.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron_res.modeling.roi_heads.res5_head import Res5ROIHeads
from detectron_res.modeling.rpn import RPN, AnchorGenerator, RPNHead
from detectron_res.layers import ROIPooler


def test_box_coder_round_trip_with_detector_weights():
    torch.manual_seed(0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 8.0, 8.0], [100.0, 50.0, 300.0, 60.0]])
    targets = torch.tensor([[12.0, 18.0, 60.0, 90.0], [1.0, 1.0, 9.0, 12.0], [90.0, 40.0, 310.0, 70.0]])
    deltas = coder.encode_single(targets, proposals)
    # dx of the first pair: centre moves from 30 to 36 over a width of 40, times wx = 10
    assert deltas[0, 0].item() == torch.tensor(10 * 6 / 40).item()
    torch.testing.assert_close(coder.decode_single(deltas, proposals), targets)


def make_rpn(**overrides) -> RPN:
    args = dict(
        head=RPNHead(in_channels=8, head_channels=8, num_anchors=1),
        anchor_generator=AnchorGenerator(sizes=[32], aspect_ratios=[1.0], stride=16),
        box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
        positive_iou=0.7,
        negative_iou=0.3,
        batch_size_per_image=8,
        positive_fraction=0.5,
        boundary_thresh=-1,
        pre_nms_topk=(100, 50),
        post_nms_topk=(20, 10),
        nms_thresh=0.7,
        min_size=0.0,
        smooth_l1_beta=1.0 / 9,
    )
    args.update(overrides)
    return RPN(**args)


def test_rpn_anchor_labels_follow_iou_thresholds():
    torch.manual_seed(0)
    rpn = make_rpn(batch_size_per_image=1000)  # sample everything: labels are the matcher's
    anchors = torch.tensor(
        [[0.0, 0.0, 32.0, 32.0], [4.0, 0.0, 36.0, 32.0], [16.0, 0.0, 48.0, 32.0], [200.0, 200.0, 232.0, 232.0]]
    )
    gt = [torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    labels, matched = rpn.label_and_sample_anchors(anchors, gt, [(256, 256)])
    # IoUs: 1.0 (positive), 28/36 = 0.78 (positive), 16/48 = 0.33 (ignored), 0 (negative)
    assert labels.tolist() == [[1.0, 1.0, -1.0, 0.0]]
    torch.testing.assert_close(matched[0, :2], gt[0].expand(2, 4))


def test_rpn_best_anchor_of_each_box_is_positive_even_below_threshold():
    rpn = make_rpn(batch_size_per_image=1000)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 132.0, 132.0]])
    gt = [torch.tensor([[0.0, 0.0, 16.0, 64.0]])]  # IoU 512 / (1024 + 1024 - 512) = 0.33 < 0.7
    labels, _ = rpn.label_and_sample_anchors(anchors, gt, [(256, 256)])
    assert labels.tolist() == [[1.0, 0.0]]


def test_rpn_image_without_ground_truth_has_only_negatives_and_finite_losses():
    torch.manual_seed(0)
    rpn = make_rpn()
    features = torch.randn(2, 8, 4, 4)
    gt = [torch.zeros((0, 4)), torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    proposals, losses = rpn(features, [(64, 64), (64, 64)], gt)
    anchors = rpn.anchor_generator((4, 4))
    labels, _ = rpn.label_and_sample_anchors(anchors, gt, [(64, 64), (64, 64)])
    assert (labels[0] == 1).sum() == 0 and (labels[0] == 0).sum() == 8  # 8 sampled negatives
    assert (labels[1] == 1).sum() >= 1
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(p) <= 20 for p in proposals] == [True, True]


def test_rpn_boundary_thresh_ignores_crossing_anchors():
    rpn = make_rpn(batch_size_per_image=1000, boundary_thresh=0)
    anchors = torch.tensor([[-8.0, 0.0, 24.0, 32.0], [0.0, 0.0, 32.0, 32.0], [40.0, 40.0, 72.0, 72.0]])
    labels, _ = rpn.label_and_sample_anchors(anchors, [torch.zeros((0, 4))], [(64, 64)])
    assert labels.tolist() == [[-1.0, 0.0, -1.0]]  # the first crosses the left border, the last the bottom/right


def test_balanced_sampler_keeps_fraction_and_budget():
    torch.manual_seed(0)
    sampler = BalancedPositiveNegativeSampler(16, 0.25)
    labels = torch.tensor([1.0] * 10 + [0.0] * 30 + [-1.0] * 5)
    positive, negative = sampler([labels])
    assert positive[0].sum() == 4 and negative[0].sum() == 12
    assert (labels[positive[0].bool()] == 1).all() and (labels[negative[0].bool()] == 0).all()


def make_roi_heads(num_classes=3, batch=8, bg_lo=0.0) -> Res5ROIHeads:
    predictor = FastRCNNOutputLayers(
        in_channels=4,
        num_classes=num_classes,
        box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)),
        smooth_l1_beta=1.0,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_image=100,
    )
    return Res5ROIHeads(
        pooler=ROIPooler(kind="ROIAlign", output_size=4, spatial_scale=1 / 16),
        res5=torch.nn.Conv2d(4, 4, 1),
        predictor=predictor,
        batch_size_per_image=batch,
        positive_fraction=0.25,
        fg_iou_thresh=0.5,
        bg_iou_thresh_lo=bg_lo,
        proposal_append_gt=True,
    )


def test_roi_sampling_labels_foreground_background_and_empty_images():
    torch.manual_seed(0)
    heads = make_roi_heads(batch=100)
    proposals = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0], [50.0, 50.0, 60.0, 60.0]]),
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
    ]
    gt_boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros((0, 4))]
    gt_classes = [torch.tensor([2]), torch.zeros((0,), dtype=torch.int64)]
    rois, classes, matched = heads.label_and_sample_proposals(proposals, gt_boxes, gt_classes)
    # image 0: proposals + appended gt; IoUs 1.0, 0.7, 0.0, 1.0 -> classes 2, 2, background (3), 2
    assert sorted(classes[0].tolist()) == [2, 2, 2, 3]
    assert len(rois[0]) == 4
    # image 1 has no ground truth: everything is background
    assert classes[1].tolist() == [3]
    torch.testing.assert_close(matched[0][classes[0] == 2], torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(3, 4))


def test_roi_sampling_respects_background_low_threshold():
    heads = make_roi_heads(batch=100, bg_lo=0.1)
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0], [50.0, 50.0, 60.0, 60.0]])]
    _, classes, _ = heads.label_and_sample_proposals(
        proposals, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([0])]
    )
    # IoU 0.3 -> background; IoU 0 < 0.1 -> unused
    assert sorted(classes[0].tolist()) == [0, 0, 3]


def test_fast_rcnn_losses_with_no_foreground_and_no_rois():
    torch.manual_seed(0)
    heads = make_roi_heads()
    logits = torch.randn(5, 4, requires_grad=True)
    deltas = torch.randn(5, 12, requires_grad=True)
    losses = heads.predictor.losses(
        logits, deltas, torch.rand(5, 4) * 10, torch.full((5,), 3), torch.zeros(5, 4)
    )
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_cls"].item() > 0
    empty = heads.predictor.losses(logits[:0], deltas[:0], torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert empty["loss_cls"].item() == 0.0
    (empty["loss_cls"] + empty["loss_box_reg"]).backward()  # the graph is kept
