"""The Fast R-CNN output layers on hand-made logits and deltas: loss values and normalisation, the box-target
direction, class-specific decoding and clipping, the background column, post-processing parameters.

Box coder weights are the detector's (10, 10, 5, 5): dx = 10 * (target centre - proposal centre) / proposal width,
dw = 5 * log(target width / proposal width).
"""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from detectron_res.modeling.roi_heads import FastRCNNOutputLayers


def make_predictor(num_classes=2, in_channels=4, **overrides) -> FastRCNNOutputLayers:
    args = dict(
        in_channels=in_channels,
        num_classes=num_classes,
        box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)),
        smooth_l1_beta=0.5,
        score_thresh=0.2,
        nms_thresh=0.5,
        detections_per_image=100,
    )
    args.update(overrides)
    return FastRCNNOutputLayers(**args)


def test_layers_shapes_and_initialisation():
    torch.manual_seed(0)
    predictor = make_predictor(num_classes=20, in_channels=512)
    assert predictor.cls_score.weight.shape == (21, 512) and predictor.bbox_pred.weight.shape == (80, 512)
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert (predictor.cls_score.bias == 0).all() and (predictor.bbox_pred.bias == 0).all()
    x = torch.randn(3, 512)
    logits, deltas = predictor(x)
    torch.testing.assert_close(logits, predictor.cls_score(x))
    torch.testing.assert_close(deltas, predictor.bbox_pred(x))
    assert predictor.num_classes == 20


def test_losses_hand_computed():
    predictor = make_predictor()  # K = 2, background = 2, smooth L1 beta 0.5
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(4, 4)
    gt_classes = torch.tensor([1, 0, 2, 2])
    gt_boxes = torch.tensor([[2.0, 0.0, 22.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 1.0, 1.0]])
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [3.0, 1.0, 1.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]))
    deltas = torch.full((4, 8), 100.0)  # only each foreground RoI's own class counts
    deltas[0, 4:] = 0.0  # RoI 0, class 1
    deltas[1, :4] = torch.tensor([0.2, 0.0, 0.0, 0.0])  # RoI 1, class 0
    losses = predictor.losses(logits, deltas, proposals, gt_classes, gt_boxes)
    # cross entropy, mean over the 4 RoIs: -log(2/4), -log(3/5), -log(2/4) (background), -log(1/3)
    expected_cls = (math.log(2.0) + math.log(5.0 / 3.0) + math.log(2.0) + math.log(3.0)) / 4
    # RoI 0: target dx = 10 * (12 - 5) / 10 = 7 -> 7 - 0.25; dw = 5 log 2 -> 5 log 2 - 0.25 (the proposal encoded
    # relative to the box instead would give dx = 10 * (5 - 12) / 20 = -3.5). RoI 1: target 0, 0.2 -> 0.5 * 0.04 / 0.5.
    # Sum over the foreground, divided by all 4 sampled RoIs.
    expected_box = (6.75 + 5 * math.log(2.0) - 0.25 + 0.04) / 4
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box, rel=1e-5)


def test_predict_boxes_decodes_each_class_and_clips_to_height_width():
    predictor = make_predictor()
    proposals = torch.tensor([[10.0, 10.0, 30.0, 50.0]])  # centre (20, 30), 20 x 40
    deltas = torch.tensor([[1.0, 0.0, 5 * math.log(2.0), 0.0, 0.0, -2.5, 0.0, 5 * math.log(0.5)]])
    boxes = predictor.predict_boxes(deltas, proposals, (45, 40))
    # class 0: centre x 20 + 0.1 * 20 = 22, width 40 -> [2, 10, 42, 50], clipped to 40 wide, 45 high
    # class 1: centre y 30 - 0.25 * 40 = 20, height 20 -> [10, 10, 30, 30]
    torch.testing.assert_close(boxes, torch.tensor([[[2.0, 10.0, 40.0, 45.0], [10.0, 10.0, 30.0, 30.0]]]))


@pytest.mark.filterwarnings("error")  # e.g. a softmax without an explicit dim
def test_inference_drops_the_last_softmax_column_and_splits_per_image():
    predictor = make_predictor()  # score threshold 0.2
    proposals = [torch.tensor([[0.0, 0.0, 40.0, 20.0]]), torch.tensor([[10.0, 10.0, 30.0, 50.0], [60.0, 60.0, 80.0, 80.0]])]
    # softmax: [1, 3, 4] / 8, [6, 1, 1] / 8, [1, 5, 2] / 8; the last column is the background
    logits = torch.log(torch.tensor([[1.0, 3.0, 4.0], [6.0, 1.0, 1.0], [1.0, 5.0, 2.0]]))
    deltas = torch.zeros(3, 8)
    deltas[1, :4] = torch.tensor([1.0, 0.0, 5 * math.log(2.0), 0.0])  # RoI 1, class 0 -> [2, 10, 42, 50]
    deltas[1, 4:] = 3.0  # RoI 1, class 1 scores 1/8: below the threshold
    results = predictor.inference(logits, deltas, proposals, [(16, 30), (100, 100)])
    assert len(results) == 2
    # image 0: class 1 at 3/8 (class 0 at 1/8 is below 0.2), box clipped to 30 wide, 16 high
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[0.0, 0.0, 30.0, 16.0]]))
    torch.testing.assert_close(results[0]["scores"], torch.tensor([3 / 8]))
    assert results[0]["labels"].tolist() == [1]
    torch.testing.assert_close(results[1]["boxes"], torch.tensor([[2.0, 10.0, 42.0, 50.0], [60.0, 60.0, 80.0, 80.0]]))
    torch.testing.assert_close(results[1]["scores"], torch.tensor([6 / 8, 5 / 8]))
    assert results[1]["labels"].tolist() == [0, 1]

    predictor.detections_per_image = 1
    assert predictor.inference(logits, deltas, proposals, [(16, 30), (100, 100)])[1]["labels"].tolist() == [0]


def test_inference_passes_its_thresholds_to_the_nms():
    predictor = make_predictor(score_thresh=0.3, nms_thresh=0.3)
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0]])]  # IoU 0.6
    logits = torch.log(torch.tensor([[1.0, 7.0, 2.0], [1.0, 6.0, 3.0]]))  # class 1: 0.7 and 0.6
    out = predictor.inference(logits, torch.zeros(2, 8), proposals, [(100, 100)])[0]
    torch.testing.assert_close(out["scores"], torch.tensor([0.7]))  # the 0.6 one is suppressed at IoU 0.3
    predictor.nms_thresh = 0.7
    out = predictor.inference(logits, torch.zeros(2, 8), proposals, [(100, 100)])[0]
    torch.testing.assert_close(out["scores"], torch.tensor([0.7, 0.6]))
    predictor.score_thresh = 0.65
    out = predictor.inference(logits, torch.zeros(2, 8), proposals, [(100, 100)])[0]
    torch.testing.assert_close(out["scores"], torch.tensor([0.7]))


def test_losses_without_rois_are_zero_and_keep_the_graph():
    predictor = make_predictor()
    logits = torch.ones(0, 3, requires_grad=True)
    deltas = torch.ones(0, 8, requires_grad=True)
    losses = predictor.losses(logits, deltas, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    assert logits.grad is not None and deltas.grad is not None
