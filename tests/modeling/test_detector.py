"""The whole C4 detector on tiny inputs: output shapes and coordinates, training losses, overfitting; with stub
stages: input normalisation and padding, rescaling to the original image, non-finite proposals."""

import math

import pytest
import torch
from torch import nn

from detectron_res.config import get_default_config
from detectron_res.modeling import build_model
from detectron_res.modeling.detector import FasterRCNN, rescale_detections
from detectron_res.modeling.rpn import RPN, NonFiniteProposalsError
from detectron_res.structures import batch_images
from rpn_stubs import FixedHead, make_rpn


def tiny_config(**rpn):
    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 2
    cfg.MODEL.BACKBONE.DEPTH = 18
    cfg.MODEL.BACKBONE.WIDTH = 8
    cfg.MODEL.BACKBONE.NORM = "GN"
    cfg.MODEL.BACKBONE.GN_GROUPS = 4
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RPN.ANCHOR_SIZES = [16, 32]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def make_batch():
    generator = torch.Generator().manual_seed(0)
    images = []
    for height, width, boxes, classes in (
        (64, 96, [[8.0, 8.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]], [0, 1]),
        (80, 64, [], []),
    ):
        image = torch.randint(0, 60, (3, height, width), dtype=torch.uint8, generator=generator)
        for (x1, y1, x2, y2), c in zip(boxes, classes):
            image[c, int(y1) : int(y2), int(x1) : int(x2)] = 230
        images.append(
            {
                "image": image,
                "height": height * 2,  # the "original" image was twice as large
                "width": width * 2,
                "gt_boxes": torch.tensor(boxes).reshape(-1, 4),
                "gt_classes": torch.tensor(classes, dtype=torch.int64),
            }
        )
    return images


def test_training_returns_the_four_named_losses_and_inference_original_coordinates():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    batch = make_batch()
    losses = model.train()(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.predictor.cls_score.weight.grad is not None
    assert model.backbone.conv1.weight.grad is not None  # end to end: the RoI head trains the trunk too

    outputs = model.eval()(batch)
    assert len(outputs) == 2
    for output, inp in zip(outputs, batch):
        n = len(output["boxes"])
        assert output["boxes"].shape == (n, 4) and output["scores"].shape == (n,) and output["labels"].shape == (n,)
        assert output["labels"].dtype == torch.int64
        assert n <= 100
        if n:
            assert output["boxes"][:, 2].max() <= inp["width"] and output["boxes"][:, 3].max() <= inp["height"]
            assert (output["scores"][:-1] >= output["scores"][1:]).all()


def test_overfitting_a_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    batch = make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(60):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.4 * sum(history[:5]) / 5


def test_rescale_detections_maps_back_and_clips():
    detections = {"boxes": torch.tensor([[10.0, 5.0, 60.0, 40.0]]), "scores": torch.ones(1), "labels": torch.zeros(1)}
    out = rescale_detections(detections, input_size=(40, 60), output_size=(80, 90))
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.0, 10.0, 90.0, 80.0]]))


# ---------------------------------------------------------- input normalisation, rescaling, non-finite proposals


class ZeroBackbone(nn.Module):
    """(N, 3, H, W) -> zeros (N, 4, H/16, W/16)."""

    def forward(self, images):
        n, _, h, w = images.shape
        return images.new_zeros((n, 4, h // 16, w // 16))


def stub_detector(**kwargs) -> FasterRCNN:
    return FasterRCNN(
        backbone=kwargs.pop("backbone", ZeroBackbone()),
        rpn=kwargs.pop("rpn", nn.Identity()),
        roi_heads=kwargs.pop("roi_heads", nn.Identity()),
        pixel_mean=[10.0, 20.0, 30.0],
        pixel_std=[2.0, 4.0, 5.0],
        **kwargs,
    )


def test_preprocess_normalises_per_channel_and_zero_pads_to_a_multiple_of_16():
    image_a = torch.stack([torch.full((2, 3), v, dtype=torch.uint8) for v in (14, 28, 45)])
    image_b = torch.zeros((3, 17, 1), dtype=torch.uint8)
    images, sizes = stub_detector().preprocess_images([{"image": image_a}, {"image": image_b}])
    assert sizes == [(2, 3), (17, 1)]
    assert images.shape == (2, 3, 32, 16) and images.dtype == torch.float32  # 17 -> 32, 3 -> 16
    # (14 - 10) / 2 = 2, (28 - 20) / 4 = 2, (45 - 30) / 5 = 3; (0 - mean) / std = -5, -5, -6
    torch.testing.assert_close(images[0, :, :2, :3], torch.tensor([2.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 2, 3))
    torch.testing.assert_close(images[1, :, :17, :1], torch.tensor([-5.0, -5.0, -6.0]).view(3, 1, 1).expand(3, 17, 1))
    # the padding is 0 after normalisation, i.e. the mean pixel
    assert images[0, :, 2:, :].abs().sum() == 0 and images[0, :, :, 3:].abs().sum() == 0
    assert images[1, :, 17:, :].abs().sum() == 0 and images[1, :, :, 1:].abs().sum() == 0
    images, _ = stub_detector(size_divisibility=32).preprocess_images([{"image": image_a}])
    assert images.shape == (1, 3, 32, 32)


def test_bgr_input_format_reverses_the_channels_before_the_statistics():
    # pixel (R, G, B) = (14, 28, 45); BGR order -> (45, 28, 14); with mean (10, 20, 30) and std (2, 4, 5) in BGR order:
    # (45 - 10) / 2 = 17.5, (28 - 20) / 4 = 2, (14 - 30) / 5 = -3.2
    image = torch.stack([torch.full((2, 3), v, dtype=torch.uint8) for v in (14, 28, 45)])
    normalised = stub_detector(input_format="BGR").normalize(image)
    torch.testing.assert_close(normalised[:, 0, 0], torch.tensor([17.5, 2.0, -3.2]))
    with pytest.raises(ValueError, match="input_format must be 'RGB' or 'BGR', got 'bgr'"):
        stub_detector(input_format="bgr")


def test_batch_images_without_divisibility_pads_to_the_largest_image_only():
    images, sizes = batch_images([torch.ones(1, 5, 7), torch.ones(1, 6, 2)], size_divisibility=1)
    assert images.shape == (2, 1, 6, 7) and sizes == [(5, 7), (6, 2)]
    assert images[0, 0, 5].sum() == 0 and images[1, 0, :, 2:].sum() == 0 and images.sum() == 35 + 12
    images, _ = batch_images([torch.ones(1, 16, 32)], size_divisibility=16)
    assert images.shape == (1, 1, 16, 32)  # already a multiple: no padding
    with pytest.raises(ValueError, match="at least one image"):
        batch_images([])


def test_rescale_scales_x_and_y_apart_clips_and_drops_empty_boxes():
    detections = {
        "boxes": torch.tensor([[10.0, 5.0, 60.0, 40.0], [59.0, 5.0, 70.0, 30.0], [61.0, 5.0, 70.0, 30.0], [0.0, 0.0, 0.0, 10.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([3, 1, 2, 0]),
    }
    out = rescale_detections(detections, input_size=(40, 60), output_size=(80, 90))
    # x * 90 / 60 = 1.5 x, y * 80 / 40 = 2 y, clipped to 90 wide and 80 high:
    # [15, 10, 90, 80]; [88.5, 10, 105 -> 90, 60]; [91.5 -> 90, 10, 90, 60] is empty; [0, 0, 0, 20] is empty
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.0, 10.0, 90.0, 80.0], [88.5, 10.0, 90.0, 60.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8]))
    assert out["labels"].tolist() == [3, 1]


class FixedDetections(nn.Module):
    """RoI heads returning one fixed detection per image in the input image's pixels."""

    detection = {"boxes": torch.tensor([[8.0, 4.0, 16.0, 12.0]]), "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.int64)}

    def forward(self, features, proposals, image_sizes, *args):
        return [dict(self.detection) for _ in image_sizes], {}

    def detection_candidates(self, pyramid, proposals, image_sizes, test_time):
        return [dict(self.detection) for _ in image_sizes]

    def select_detections(self, candidates, test_time):
        return candidates


class FixedProposals(nn.Module):
    def forward(self, features, image_sizes, gt_boxes=None):
        return [torch.zeros((0, 4)) for _ in image_sizes], {}


def test_inference_returns_boxes_in_each_original_image():
    model = stub_detector(rpn=FixedProposals(), roi_heads=FixedDetections()).eval()
    batch = [
        {"image": torch.zeros((3, 16, 32), dtype=torch.uint8), "height": 32, "width": 96},
        {"image": torch.zeros((3, 20, 20), dtype=torch.uint8), "height": 10, "width": 10},
    ]
    out = model(batch)
    # image 0: x * 3, y * 2; image 1: x and y / 2
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[24.0, 8.0, 48.0, 24.0]]))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[4.0, 2.0, 8.0, 6.0]]))


def nan_rpn() -> RPN:
    """An RPN whose objectness is NaN at one anchor of image 1 (2 images, 1 anchor on a 1 x 2 map)."""
    objectness = torch.zeros(2, 1, 1, 2)
    objectness[1, 0, 0, 1] = math.nan
    return make_rpn(
        head=FixedHead(objectness, torch.zeros(2, 4, 1, 2)),
        batch_size_per_image=8,
        pre_nms_topk=(10, 10),
        post_nms_topk=(10, 10),
        smooth_l1_beta=0.0,
    )


def training_batch(*extra: dict) -> list[dict]:
    """Two 32 x 16 images without boxes, each dict updated with the given fields."""
    return [
        {
            "image": torch.zeros((3, 16, 32), dtype=torch.uint8),
            "gt_boxes": torch.zeros((0, 4)),
            "gt_classes": torch.zeros(0, dtype=torch.int64),
            **fields,
        }
        for fields in extra
    ]


def test_non_finite_proposals_in_training_name_the_file():
    model = stub_detector(rpn=nan_rpn(), roi_heads=FixedDetections()).train()
    batch = training_batch({"file_name": "a.jpg"}, {"file_name": "images/b.jpg", "image_id": 7})
    with pytest.raises(NonFiniteProposalsError, match=r"for image 1 of the batch.*images/b\.jpg") as info:
        model(batch)
    assert info.value.image_index == 1 and info.value.__cause__ is None
    batch = training_batch({}, {"image_id": 7})
    with pytest.raises(NonFiniteProposalsError, match=r"image 1 of the batch.*image_id 7"):
        model(batch)
    with pytest.raises(NonFiniteProposalsError, match=r"image 1 of the batch.*image_id \?"):
        model(training_batch({}, {}))


def test_non_finite_proposals_at_inference_are_dropped():
    rpn = nan_rpn().eval()
    proposals, _ = rpn(torch.zeros(2, 4, 1, 2), [(16, 32), (16, 32)])
    # anchors [0, 0, 16, 16] and [16, 0, 32, 16]: image 1 keeps only the first
    torch.testing.assert_close(proposals[1], torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert len(proposals[0]) == 2
