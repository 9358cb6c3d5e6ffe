"""The res5 RoI head: shapes through pooling, res5 and the predictor, for RoIAlign and RoIPool, empty images; then
hand-computed pooled features, RoI labels and sampling, and the losses and detections of both modes."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder

from detectron_res.config import get_default_config
from detectron_res.layers import ROIPooler
from detectron_res.modeling.build import build_roi_heads
from detectron_res.modeling.roi_heads import FastRCNNOutputLayers, Res5ROIHeads


@pytest.mark.parametrize("pooler", ["ROIAlign", "ROIPool"])
def test_shapes_from_res4_to_class_scores_and_class_specific_boxes(pooler):
    cfg = get_default_config()
    cfg.MODEL.NUM_CLASSES = 5
    cfg.MODEL.BACKBONE.DEPTH = 50
    cfg.MODEL.BACKBONE.WIDTH = 8  # bottleneck: res4 has 8*4*4 = 128 channels, res5 8*8*4 = 256
    cfg.MODEL.ROI_HEADS.POOLER = pooler
    heads = build_roi_heads(cfg, stride=16).eval()
    features = torch.randn(2, 128, 6, 8)  # a padded batch of two 96x128 images
    proposals = [torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 20.0, 120.0, 90.0], [5.0, 5.0, 6.0, 6.0]]), torch.zeros(0, 4)]

    pooled = heads.pooler(features, proposals)
    assert pooled.shape == (3, 128, 14, 14)
    assert heads.res5(pooled).shape == (3, 256, 7, 7)  # res5's first block has stride 2
    box_features = heads.box_features(features, proposals, [(96, 128), (80, 100)])
    assert box_features.shape == (3, 256)
    logits, deltas = heads.predictor(box_features)
    assert logits.shape == (3, 6) and deltas.shape == (3, 20)  # K+1 classes, 4K box coordinates

    with torch.no_grad():
        detections, losses = heads(features, proposals, [(96, 128), (80, 100)])
    assert losses == {}
    assert len(detections) == 2
    assert detections[1]["boxes"].shape == (0, 4) and detections[1]["scores"].shape == (0,)
    assert (detections[0]["labels"] < 5).all()


# ------------------------------------------------------------------------- hand-computed values of the C4 head


class Affine(nn.Module):
    """Stands in for res5: 2 x + 1, so that its effect on the pooled values is known."""

    def forward(self, x):
        return 2 * x + 1


def coordinate_features() -> torch.Tensor:
    """(2, 2, 6, 8) res4 features: channel 0 is x (0..7), channel 1 is y (0..5); image 1 adds 100."""
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    image = torch.stack([xs, ys])
    return torch.stack([image, image + 100.0])


def make_heads(*, batch=100, fraction=0.25, fg=0.5, bg_lo=0.0, append_gt=True, score_thresh=0.05) -> Res5ROIHeads:
    predictor = FastRCNNOutputLayers(
        in_channels=2,
        num_classes=2,
        box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)),
        smooth_l1_beta=1.0,
        score_thresh=score_thresh,
        nms_thresh=0.5,
        detections_per_image=100,
    )
    with torch.no_grad():  # logits and deltas zero unless a test sets them
        for layer in (predictor.cls_score, predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    return Res5ROIHeads(
        pooler=ROIPooler(kind="ROIAlign", output_size=2, spatial_scale=1 / 16),
        res5=Affine(),
        predictor=predictor,
        batch_size_per_image=batch,
        positive_fraction=fraction,
        fg_iou_thresh=fg,
        bg_iou_thresh_lo=bg_lo,
        proposal_append_gt=append_gt,
    )


def test_box_features_pool_run_res5_then_average_over_space():
    heads = make_heads()
    features = coordinate_features()
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.tensor([[16.0, 16.0, 48.0, 80.0]])]
    # box 0: x 0.5 .. 4.5 -> bins centred 1.5, 3.5; y 0.5 .. 2.5 -> 1.0, 2.0. Mean x 2.5, mean y 1.5 -> 2 v + 1 = 6, 4
    # box 1 (image 1, + 100): x 0.5 .. 2.5, mean 1.5; y 0.5 .. 4.5, mean 2.5 -> 2 * 101.5 + 1 = 204, 2 * 102.5 + 1 = 206
    out = heads.box_features(features, boxes, [(96, 128), (96, 128)])
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, torch.tensor([[6.0, 4.0], [204.0, 206.0]]))


def test_foreground_at_iou_threshold_and_background_from_low_threshold():
    heads = make_heads(bg_lo=0.25, append_gt=False)
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    proposals = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 100 / 200 = 0.5 with box 0: foreground (>=)
            [0.0, 0.0, 10.0, 5.0],  # IoU 50 / 200 = 0.25 with box 0: background (>=)
            [0.0, 0.0, 10.0, 4.0],  # IoU 0.2: unused
            [50.0, 50.0, 60.0, 58.0],  # IoU 0.8 with box 1
            [0.0, 0.0, 10.0, 9.0],  # IoU 0.45 with box 0: background
        ]
    )
    rois, classes, matched = heads.label_and_sample_proposals([proposals], [gt], [torch.tensor([1, 0])])
    order = rois[0][:, 3].argsort()  # sampling keeps the proposals' order; sort to be safe
    torch.testing.assert_close(rois[0][order], proposals[[1, 4, 0, 3]])
    assert classes[0][order].tolist() == [2, 2, 1, 0]
    torch.testing.assert_close(matched[0][order][2:], gt[[0, 1]])


def test_ground_truth_appended_and_sampling_budget():
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    background = [[20.0 * i, 50.0, 20.0 * i + 10, 60.0] for i in range(5)]
    proposals = torch.tensor([[0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 8.0]] + background)
    heads = make_heads(batch=4, fraction=0.25)
    rois, classes, _ = heads.label_and_sample_proposals([proposals], [gt], [torch.tensor([0])])
    # 3 foreground candidates (2 proposals + the appended box), 5 background: 1 foreground, 3 background sampled
    assert len(rois[0]) == 4 and sorted(classes[0].tolist()) == [0, 2, 2, 2]
    # foreground only: the fraction caps it at 1 RoI and there is no background to fill the budget
    rois, classes, _ = heads.label_and_sample_proposals([proposals[:2]], [gt], [torch.tensor([0])])
    assert classes[0].tolist() == [0]
    heads = make_heads(batch=100, append_gt=True)
    rois, classes, _ = heads.label_and_sample_proposals([proposals[:1]], [gt], [torch.tensor([0])])
    torch.testing.assert_close(rois[0], torch.cat([proposals[:1], gt]))
    heads = make_heads(batch=100, append_gt=False)
    rois, _, _ = heads.label_and_sample_proposals([proposals[:1]], [gt], [torch.tensor([0])])
    torch.testing.assert_close(rois[0], proposals[:1])


def test_image_without_ground_truth_gives_background_only():
    heads = make_heads(bg_lo=0.0)
    rois, classes, matched = heads.label_and_sample_proposals(
        [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])],
        [torch.zeros((0, 4))],
        [torch.zeros(0, dtype=torch.int64)],
    )
    assert classes[0].tolist() == [2, 2] and classes[0].dtype == torch.int64
    torch.testing.assert_close(matched[0], torch.zeros(2, 4))
    assert heads.num_classes == 2


def test_training_forward_losses_hand_computed():
    heads = make_heads().train()  # zero predictor: logits 0 (log 3 loss each), deltas 0
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 16.0], [40.0, 40.0, 60.0, 60.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    gt_boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.zeros((0, 4))]
    gt_classes = [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    detections, losses = heads(coordinate_features(), proposals, [(96, 128), (96, 128)], gt_boxes, gt_classes)
    assert detections == []
    # RoIs: [0, 0, 32, 16] (IoU 0.5: class 1), [40, 40, 60, 60] (background), the appended box (class 1, target 0),
    # and image 1's proposal (background): 4 RoIs. Box loss of the first: dy = 10 * (16 - 8) / 16 = 5 -> 4.5;
    # dh = 5 log 2 -> 5 log 2 - 0.5 (beta 1), over 4 RoIs.
    assert losses["loss_cls"].item() == pytest.approx(math.log(3.0), rel=1e-5)
    assert losses["loss_box_reg"].item() == pytest.approx((4.5 + 5 * math.log(2.0) - 0.5) / 4, rel=1e-5)
    with pytest.raises(ValueError, match=r"^Res5ROIHeads needs gt_boxes and gt_classes in training mode$"):
        heads(coordinate_features(), proposals, [(96, 128), (96, 128)], gt_boxes)


def test_inference_forward_scores_the_proposals_of_each_image():
    heads = make_heads(score_thresh=0.05).eval()
    with torch.no_grad():
        heads.predictor.cls_score.bias.copy_(torch.tensor([0.0, math.log(3.0), 0.0]))  # softmax 1/5, 3/5, 1/5
    proposals = [torch.tensor([[0.0, 0.0, 40.0, 20.0]]), torch.zeros((0, 4))]
    detections, losses = heads(coordinate_features(), proposals, [(16, 30), (96, 128)])
    assert losses == {} and len(detections) == 2
    torch.testing.assert_close(detections[0]["boxes"], torch.tensor([[0.0, 0.0, 30.0, 16.0]] * 2))
    torch.testing.assert_close(detections[0]["scores"], torch.tensor([0.6, 0.2]))
    assert detections[0]["labels"].tolist() == [1, 0]
    assert len(detections[1]["boxes"]) == 0


def test_sampled_rois_and_targets_carry_no_gradient():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 9.0], [30.0, 30.0, 40.0, 40.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    rois, _, matched = make_heads().label_and_sample_proposals([proposals], [gt], [torch.tensor([1])])
    assert not rois[0].requires_grad and not matched[0].requires_grad


@pytest.mark.parametrize("aligned", [True, False])
def test_pooler_alignment_comes_from_the_config(aligned):
    from detectron_res.modeling.build import build_roi_heads

    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = 18
    cfg.MODEL.ROI_HEADS.POOLER_ALIGNED = aligned
    pooler = build_roi_heads(cfg, stride=16).pooler
    # a 32-px box at 1/16 covers feature x 1..3 unaligned (centre 2), 0.5..2.5 aligned (centre 1.5)
    features = torch.arange(8.0).expand(1, 1, 4, 8).contiguous()
    pooled = pooler(features, [torch.tensor([[16.0, 16.0, 48.0, 48.0]])])
    assert pooled.mean().item() == pytest.approx(1.5 if aligned else 2.0)
