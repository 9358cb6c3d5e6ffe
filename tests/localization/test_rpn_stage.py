"""The RPN stage as a model: training losses from mapper dicts, and inference on the whole image at one or several
scales, for the classes asked for or the RPN's own best."""

from pathlib import Path

import torch

from detectron_res.config import load_config
from detectron_res.localization.build import build_localization_rpn

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "loc_shapes_r18.yaml"


def tiny_rpn(**overrides):
    torch.manual_seed(0)
    options = {"MODEL.DEVICE": "cpu", "MODEL.BACKBONE.WIDTH": 4, "MODEL.RPN.POST_NMS_TOPK_TEST": 6, **overrides}
    return build_localization_rpn(load_config(CONFIG, [f"{k}={v}" for k, v in options.items()]))


def image(height, width, seed=0):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_training_returns_the_two_rpn_losses_and_ignores_no_box_crops_gracefully():
    model = tiny_rpn().train()
    batch = [
        {"image": image(96, 96), "gt_boxes": torch.tensor([[10.0, 10.0, 70.0, 80.0]]), "gt_classes": torch.tensor([2]),
         "image_classes": torch.tensor([2]), "ignore_boxes": torch.zeros(0, 4)},
        {"image": image(96, 96, 1), "gt_boxes": torch.zeros(0, 4), "gt_classes": torch.zeros(0, dtype=torch.long),
         "image_classes": torch.tensor([4])},
    ]
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0


def test_inference_maps_boxes_to_the_original_image_and_groups_them_by_class():
    model = tiny_rpn().eval()
    x = {"image": image(128, 160), "height": 256, "width": 320, "classes": [3, 0]}
    (out,) = model([x])
    assert out["classes"].tolist() == [3, 0]
    labels = out["labels"].tolist()
    assert labels == sorted(labels, key=[3, 0].index) and set(labels) <= {3, 0}
    assert labels.count(3) <= 6 and labels.count(0) <= 6
    assert (out["boxes"][:, 2] <= 320).all() and (out["boxes"][:, 3] <= 256).all()
    # the same boxes as the RPN's in input pixels, times 2
    features, sizes = model.features([x["image"]])
    (raw,) = model.rpn.class_boxes(features, sizes, [torch.tensor([3, 0])])
    assert torch.allclose(out["boxes"], raw["boxes"] * 2)
    assert out["class_scores"].shape == (5,)


def test_without_classes_the_rpn_picks_its_own_best_and_a_pyramid_merges_scales():
    model = tiny_rpn(**{"LOC.CANDIDATE_CLASSES": 2}).eval()
    im = image(128, 160)
    (own,) = model([{"image": im, "height": 128, "width": 160}])
    assert own["classes"].tolist() == own["class_scores"].topk(2).indices.tolist()
    (single,) = model([{"image": im, "height": 128, "width": 160, "classes": [1]}])
    (same,) = model([{"image": im, "height": 128, "width": 160, "classes": [1], "pyramid": [im]}])
    assert torch.equal(single["boxes"], same["boxes"]) and torch.equal(single["scores"], same["scores"])
    big = torch.nn.functional.interpolate(im[None].float(), scale_factor=2, mode="bilinear").round().byte()[0]
    (both,) = model([{"image": im, "height": 128, "width": 160, "classes": [1], "pyramid": [im, big]}])
    (large,) = model([{"image": big, "height": 128, "width": 160, "classes": [1]}])
    union = torch.cat([single["boxes"], large["boxes"]])
    assert len(both["boxes"]) <= 6
    for box in both["boxes"]:
        assert (union - box).abs().amax(dim=1).min() < 1e-4  # every merged box comes from one of the scales
    assert both["scores"][0] == max(single["scores"][0], large["scores"][0])


def test_the_batch_is_padded_to_the_size_divisibility_and_pixel_statistics_stay_out_of_checkpoints():
    model = tiny_rpn(**{"INPUT.SIZE_DIVISIBILITY": 32}).eval()
    features, sizes = model.features([image(100, 70)])
    assert features.shape[-2:] == (8, 6) and sizes == [(100, 70)]  # padded to 128 x 96, stride 16
    assert not any(key.startswith("pixel_") for key in model.state_dict())


def test_ignore_boxes_reach_the_rpn_losses():
    model = tiny_rpn().train()
    x = {"image": image(96, 96), "gt_boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "gt_classes": torch.tensor([2]),
         "image_classes": torch.tensor([2])}
    torch.manual_seed(5)
    plain = model([x])["loss_rpn_cls"]
    torch.manual_seed(5)
    ignored = model([{**x, "ignore_boxes": torch.tensor([[40.0, 0.0, 96.0, 96.0]])}])["loss_rpn_cls"]
    assert not torch.isclose(plain, ignored)


def test_the_trunk_sees_the_image_minus_the_mean_over_the_std_zero_padded():
    model = tiny_rpn(**{"MODEL.PIXEL_MEAN": "[100.0,110.0,120.0]", "MODEL.PIXEL_STD": "[50.0,55.0,60.0]"})
    model.backbone = torch.nn.Identity()
    im = image(20, 30)
    batch, sizes = model.features([im])
    assert batch.shape == (1, 3, 32, 32) and sizes == [(20, 30)]
    expected = (im.float() - torch.tensor([100.0, 110.0, 120.0]).view(3, 1, 1)) / torch.tensor([50.0, 55.0, 60.0]).view(3, 1, 1)
    assert torch.allclose(batch[0, :, :20, :30], expected)
    assert batch[0, :, 20:].abs().sum() == 0 and batch[0, :, :, 30:].abs().sum() == 0


def test_a_bgr_trunk_sees_the_channels_reversed():
    model = tiny_rpn(**{"MODEL.PIXEL_MEAN": "[100.0,110.0,120.0]", "MODEL.PIXEL_STD": "[50.0,55.0,60.0]",
                        "INPUT.FORMAT": "BGR"})
    model.backbone = torch.nn.Identity()
    im = torch.stack([torch.full((4, 5), v, dtype=torch.uint8) for v in (10, 20, 30)])  # R, G, B
    batch, _ = model.features([im])
    # B, G, R = 30, 20, 10: (30 - 100) / 50, (20 - 110) / 55, (10 - 120) / 60
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([-1.4, -90 / 55, -110 / 60]))
