"""The whole C4 detector on tiny inputs: output shapes and coordinates, training losses, overfitting."""

import torch

from detectron_res.config import get_default_config
from detectron_res.modeling import build_model
from detectron_res.modeling.detector import rescale_detections


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
