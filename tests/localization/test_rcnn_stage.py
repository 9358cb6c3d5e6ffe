"""The R-CNN stage: crop-and-warp against crops worked out by hand, RoI labels, losses, and re-scoring at inference."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import roi_align

from detectron_res.config import load_config
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.layers import get_norm
from detectron_res.localization.build import build_rcnn_localizer, rcnn_stage_config
from detectron_res.localization.rcnn_stage import PerClassLogisticOutputs, RCNNLocalizer, crop_and_warp
from detectron_res.modeling.backbone import ResNetTrunk, build_res5
from detectron_res.localization.train import load_stage
from detectron_res.modeling.roi_heads import FastRCNNOutputLayers

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "loc_shapes_r18.yaml"


def test_crop_of_the_boxes_own_size_is_the_pixels_inside_it():
    image = torch.arange(30.0).view(1, 1, 5, 6)
    crop = crop_and_warp(image, [torch.tensor([[2.0, 1.0, 5.0, 4.0]])], size=3, sampling_ratio=1)
    assert torch.equal(crop[0, 0], image[0, 0, 1:4, 2:5])
    # boxes of another dtype (float64 from numpy) are cast to the image's
    crop = crop_and_warp(image, [torch.tensor([[2.0, 1.0, 5.0, 4.0]], dtype=torch.float64)], size=3, sampling_ratio=1)
    assert torch.equal(crop[0, 0], image[0, 0, 1:4, 2:5])


def test_the_sampling_ratio_reaches_roi_align():
    image = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    box = [torch.tensor([[1.0, 2.0, 17.0, 19.0]])]
    three = crop_and_warp(image, box, size=4, sampling_ratio=3)
    assert torch.equal(three, roi_align(image, box, output_size=4, spatial_scale=1.0, sampling_ratio=3, aligned=True))
    assert not torch.allclose(three, crop_and_warp(image, box, size=4, sampling_ratio=0))


def test_warp_upsamples_bilinearly_with_pixel_centres_at_half_integers():
    # pixel values: x contributes 0 / 10 across the two columns, y 0 / 20 across the two rows
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    crop = crop_and_warp(image, [torch.tensor([[0.0, 0.0, 2.0, 2.0]])], size=4, sampling_ratio=1)
    # samples at -0.25, 0.25, 0.75, 1.25 in pixel-centre coordinates: clamped at the borders, else interpolated
    along_x, along_y = [0.0, 2.5, 7.5, 10.0], [0.0, 5.0, 15.0, 20.0]
    expected = torch.tensor([[y + x for x in along_x] for y in along_y])
    assert torch.allclose(crop[0, 0], expected)


def test_crops_of_a_batch_come_from_their_own_image_and_match_crops_made_alone_at_the_border():
    model = make_localizer()
    first = torch.randint(0, 256, (3, 8, 12), dtype=torch.uint8)
    second = torch.randint(0, 256, (3, 10, 6), dtype=torch.uint8)
    # the second image's boxes reach its right and bottom borders, inside the batch's padding
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 7.0]]), torch.tensor([[0.5, 1.0, 6.0, 10.0], [2.0, 2.0, 6.0, 4.0]])]
    crops = model.crops([first, second], boxes)
    assert crops.shape == (3, 3, 32, 32)
    assert torch.allclose(crops[:1], model.crops([first], boxes[:1]), atol=1e-5)
    assert torch.allclose(crops[1:], model.crops([second], boxes[1:]), atol=1e-5)
    alone = crop_and_warp(second[None].float(), [boxes[1]], size=32, sampling_ratio=2)
    assert torch.allclose(crops[1:], (alone - model.pixel_mean) / model.pixel_std, atol=1e-5)


def make_localizer(num_classes=3, cls_loss="softmax", **overrides) -> RCNNLocalizer:
    torch.manual_seed(0)
    norm = get_norm("BN", gn_groups=1)
    trunk = ResNetTrunk(depth=18, width=4, norm_layer=norm, freeze_at=0)
    res5, channels = build_res5(depth=18, width=4, norm_layer=norm)
    box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    if cls_loss == "sigmoid":
        predictor = PerClassLogisticOutputs(
            in_channels=channels, num_classes=num_classes, box_coder=box_coder, smooth_l1_beta=1.0
        )
    else:
        predictor = FastRCNNOutputLayers(
            in_channels=channels, num_classes=num_classes, box_coder=box_coder, smooth_l1_beta=1.0,
            score_thresh=0.0, nms_thresh=1.0, detections_per_image=1,
        )
    args = dict(trunk=trunk, res5=res5, predictor=predictor, pixel_mean=[100.0, 110.0, 120.0],
                pixel_std=[50.0, 55.0, 60.0], crop_size=32, sampling_ratio=2, fg_iou_thresh=0.5, crops_per_forward=256)
    args.update(overrides)
    return RCNNLocalizer(**args)


def test_the_pixel_statistics_are_not_in_the_checkpoint():
    state = make_localizer().state_dict()
    assert not any(key.startswith("pixel_") for key in state) and "predictor.cls_score.weight" in state


def test_rois_take_the_class_of_the_box_they_overlap_most_foreground_from_half():
    model = make_localizer(num_classes=3)
    rois = [
        torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 21], [20, 0, 30, 4]]),
        torch.tensor([[5.0, 5, 15, 15]]),
    ]
    boxes = [torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10]]), torch.zeros(0, 4)]
    classes, foreground, matched = model.label_rois(
        rois, boxes, [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    )
    # IoU with the first box 1, 0.5 (>= 0.5: foreground), 100/210 < 0.5 (a negative of class 2, the box it
    # overlaps most); the fourth RoI overlaps only the second box, by 40/100: a negative of class 0; an image
    # without boxes: no class (-1)
    assert classes.tolist() == [2, 2, 2, 0, -1]
    assert foreground.tolist() == [True, True, False, False, False]
    assert matched.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_training_losses_are_the_fast_rcnn_losses_of_the_warped_crops():
    model = make_localizer(num_classes=3).train()
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    inputs = [
        {"image": image, "rois": torch.tensor([[4.0, 4, 30, 30]]), "gt_boxes": torch.tensor([[5.0, 5, 30, 30]]),
         "gt_classes": torch.tensor([1])},
        {"image": image[:, :30], "rois": torch.tensor([[0.0, 0, 8, 8]]), "gt_boxes": torch.tensor([[20.0, 10, 40, 28]]),
         "gt_classes": torch.tensor([0])},
    ]
    torch.manual_seed(1)
    losses = model(inputs)
    crops = model.crops([x["image"] for x in inputs], [x["rois"] for x in inputs])
    expected_crop = (crop_and_warp(image[None].float(), [inputs[0]["rois"]], size=32, sampling_ratio=2) - model.pixel_mean) / model.pixel_std
    assert torch.allclose(crops[:1], expected_crop)
    logits, deltas = model.network(crops)  # the BN batch is the same two crops
    targets = torch.tensor([1, 3])  # IoU 625/676 -> class 1; no overlap -> background
    assert losses["loss_cls"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    box_targets = model.predictor.box_coder.encode_single(inputs[0]["gt_boxes"], inputs[0]["rois"])
    own = deltas[0].view(3, 4)[1]
    expected_box = F.smooth_l1_loss(own, box_targets[0], beta=1.0, reduction="sum") / 2
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box.item(), rel=1e-5)


def test_inference_rescores_each_box_for_its_own_class_in_chunks():
    model = make_localizer(num_classes=3, crops_per_forward=2).eval()
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    proposals = torch.tensor([[0.0, 0, 20, 20], [10, 5, 40, 35], [2, 3, 48, 39]])
    labels = torch.tensor([2, 0, 1])
    (out,) = model([{"original": image, "image": image[:, :10], "proposals": proposals, "proposal_labels": labels}])
    logits, deltas = model.network(model.crops([image], [proposals]))
    probs = F.softmax(logits, dim=1)
    assert torch.allclose(out["scores"], probs[torch.arange(3), labels], atol=1e-6)
    own = deltas.view(3, 3, 4)[torch.arange(3), labels]
    expected = model.predictor.box_coder.decode_single(own, proposals)
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 50)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 40)
    assert torch.allclose(out["boxes"], expected, atol=1e-4)
    assert out["labels"].tolist() == [2, 0, 1]
    (empty,) = model([{"image": image, "proposals": torch.zeros(0, 4), "proposal_labels": torch.zeros(0)}])
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)


def test_a_bgr_trunk_gets_crops_with_the_channels_reversed():
    image = torch.stack([torch.full((8, 8), v, dtype=torch.uint8) for v in (10, 20, 30)])  # R, G, B
    crops = make_localizer(input_format="BGR").crops([image], [torch.tensor([[0.0, 0.0, 8.0, 8.0]])])
    # B, G, R = 30, 20, 10 against mean (100, 110, 120) and std (50, 55, 60), both in BGR order
    torch.testing.assert_close(crops[0, :, 0, 0], torch.tensor([-1.4, -90 / 55, -110 / 60]))


# -- the paper's per-class form (LOC.RCNN.CLS_LOSS=sigmoid) ------------------------------------------------------
LN3 = math.log(3.0)


def test_per_class_logistic_loss_trains_one_output_per_roi_by_hand():
    layers = PerClassLogisticOutputs(in_channels=2, num_classes=3, box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
                                     smooth_l1_beta=1.0)
    # every output that no RoI trains is +-100: it would add ~100 to the loss if it were used
    logits = torch.tensor([
        [100.0, LN3, 100.0],  # foreground of class 1: -log sigmoid(ln 3) = log(4/3)
        [100.0, 100.0, 0.0],  # a negative of class 2: -log(1 - sigmoid(0)) = log 2
        [LN3, -100.0, 100.0],  # a negative of class 0: -log(1 - 3/4) = log 4
        [100.0, 100.0, 100.0],  # a RoI of an image without boxes: no target, but counted in the mean
    ])
    deltas = torch.full((4, 12), 5.0)  # 5 everywhere: smooth L1 4.5 per coordinate if used
    deltas[0, 4:8] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # class 1's deltas of the foreground RoI
    proposals = torch.tensor([[0.0, 0, 10, 10]] * 4)
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # target deltas 0
    losses = layers.losses(
        logits, deltas, proposals, torch.tensor([1, 2, 0, -1]), torch.tensor([True, False, False, False]), gt_boxes
    )
    expected_cls = (math.log(4 / 3) + math.log(2) + math.log(4)) / 4
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx(0.5 * 0.5**2 / 4, rel=1e-6)  # only class 1's dx of RoI 0
    empty = layers.losses(torch.zeros(0, 3), torch.zeros(0, 12), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.bool), torch.zeros(0, 4))
    assert empty["loss_cls"].item() == 0.0 and empty["loss_box_reg"].item() == 0.0


def test_per_class_scores_are_each_boxs_own_logistic_output():
    logits = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 9.0]])
    scores = PerClassLogisticOutputs.scores(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.5]))  # sigmoid(ln 3), sigmoid(0): no competition
    assert make_localizer(cls_loss="sigmoid").predictor.cls_score.out_features == 3  # no background output


def test_sigmoid_stage_losses_are_the_per_class_losses_of_the_warped_crops():
    model = make_localizer(num_classes=3, cls_loss="sigmoid").train()
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    inputs = [
        {"image": image, "rois": torch.tensor([[4.0, 4, 30, 30]]), "gt_boxes": torch.tensor([[5.0, 5, 30, 30]]),
         "gt_classes": torch.tensor([1])},
        {"image": image[:, :30], "rois": torch.tensor([[0.0, 0, 8, 8]]), "gt_boxes": torch.tensor([[20.0, 10, 40, 28]]),
         "gt_classes": torch.tensor([0])},
    ]
    losses = model(inputs)
    logits, deltas = model.network(model.crops([x["image"] for x in inputs], [x["rois"] for x in inputs]))
    # RoI 0: IoU 625/676 with a class-1 box -> class 1's output towards 1; RoI 1 overlaps nothing: a negative of
    # class 0, the class of its image's (only) box -> class 0's output towards 0
    expected_cls = (-F.logsigmoid(logits[0, 1]) - F.logsigmoid(-logits[1, 0])) / 2
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-5)
    box_targets = model.predictor.box_coder.encode_single(inputs[0]["gt_boxes"], inputs[0]["rois"])
    own = deltas[0].view(3, 4)[1]  # the foreground RoI regresses with its class's (class 1's) deltas
    expected_box = F.smooth_l1_loss(own, box_targets[0], beta=1.0, reduction="sum") / 2
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box.item(), rel=1e-5)


def test_sigmoid_inference_rescores_each_box_with_its_classs_logistic_output():
    model = make_localizer(num_classes=3, cls_loss="sigmoid", crops_per_forward=2).eval()
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    proposals = torch.tensor([[0.0, 0, 20, 20], [10, 5, 40, 35], [2, 3, 48, 39]])
    labels = torch.tensor([2, 0, 1])
    (out,) = model([{"original": image, "proposals": proposals, "proposal_labels": labels}])
    logits, deltas = model.network(model.crops([image], [proposals]))
    torch.testing.assert_close(out["scores"], logits[torch.arange(3), labels].sigmoid())
    own = deltas.view(3, 3, 4)[torch.arange(3), labels]
    expected = model.predictor.box_coder.decode_single(own, proposals)
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 50)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 40)
    torch.testing.assert_close(out["boxes"], expected, atol=1e-4, rtol=1e-5)


def test_each_cls_loss_of_the_config_reaches_the_stage_and_checkpoints_say_which_they_need(tmp_path):
    def build(cls_loss):
        options = ["MODEL.DEVICE=cpu", "MODEL.BACKBONE.WIDTH=4", f"LOC.RCNN.CLS_LOSS={cls_loss}"]
        return build_rcnn_localizer(load_config(CONFIG, options))

    sigmoid, softmax = build("sigmoid"), build("softmax")
    assert isinstance(sigmoid.predictor, PerClassLogisticOutputs) and sigmoid.cls_loss == "sigmoid"
    assert sigmoid.predictor.cls_score.out_features == 5
    assert isinstance(softmax.predictor, FastRCNNOutputLayers) and softmax.cls_loss == "softmax"
    assert softmax.predictor.cls_score.out_features == 6
    with pytest.raises(ValueError, match=r"LOC\.RCNN\.CLS_LOSS='logistic' must be one of"):
        load_config(CONFIG, ["LOC.RCNN.CLS_LOSS=logistic"])
    # the paper's configs use the per-class form and its 256 RoIs per mini-batch
    paper = load_config(CONFIG.parent / "ilsvrc_loc_r101.yaml")
    assert paper.LOC.RCNN.CLS_LOSS == "sigmoid" and paper.LOC.RCNN.IMS_PER_BATCH == 256
    assert rcnn_stage_config(paper).SOLVER.IMS_PER_BATCH == 256
    # a checkpoint of the other form is refused with the setting it needs
    path = tmp_path / "softmax.pth"
    Checkpointer(model=softmax, save_dir=tmp_path).save("softmax")
    with pytest.raises(ValueError, match=r"has 6 outputs \(LOC\.RCNN\.CLS_LOSS=softmax\) but the model has "
                                         r"LOC\.RCNN\.CLS_LOSS=sigmoid; set LOC\.RCNN\.CLS_LOSS=softmax"):
        load_stage(sigmoid, path)
