"""The R-CNN stage: crop-and-warp against crops worked out by hand, RoI labels, losses, and re-scoring at inference."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import roi_align

from detectron_res.layers import get_norm
from detectron_res.localization.rcnn_stage import RCNNLocalizer, crop_and_warp
from detectron_res.modeling.backbone import ResNetTrunk, build_res5
from detectron_res.modeling.roi_heads import FastRCNNOutputLayers


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


def make_localizer(num_classes=3, **overrides) -> RCNNLocalizer:
    torch.manual_seed(0)
    norm = get_norm("BN", gn_groups=1)
    trunk = ResNetTrunk(depth=18, width=4, norm_layer=norm, freeze_at=0)
    res5, channels = build_res5(depth=18, width=4, norm_layer=norm)
    predictor = FastRCNNOutputLayers(
        in_channels=channels, num_classes=num_classes, box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), smooth_l1_beta=1.0,
        score_thresh=0.0, nms_thresh=1.0, detections_per_image=1,
    )
    args = dict(trunk=trunk, res5=res5, predictor=predictor, pixel_mean=[100.0, 110.0, 120.0],
                pixel_std=[50.0, 55.0, 60.0], crop_size=32, sampling_ratio=2, fg_iou_thresh=0.5, crops_per_forward=256)
    args.update(overrides)
    return RCNNLocalizer(**args)


def test_the_pixel_statistics_are_not_in_the_checkpoint():
    state = make_localizer().state_dict()
    assert not any(key.startswith("pixel_") for key in state) and "predictor.cls_score.weight" in state


def test_rois_take_the_class_of_a_box_they_overlap_by_half_else_background():
    model = make_localizer(num_classes=3)
    rois = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 21]]), torch.tensor([[5.0, 5, 15, 15]])]
    boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)]
    classes, matched = model.label_rois(rois, boxes, [torch.tensor([2]), torch.zeros(0, dtype=torch.long)])
    # IoU 1, 0.5 (>= 0.5: foreground), 100/210 < 0.5; an image without boxes: background (C = 3)
    assert classes.tolist() == [2, 2, 3, 3]
    assert matched.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]]


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
