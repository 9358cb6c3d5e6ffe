"""The test-time add-ons and global context in the model: hand-computed maxout, scale choice, flip averaging, the
second pass of box refinement and the whole-image feature; and, on a tiny random detector, that switched-off or
trivial settings give exactly the plain inference."""

import pytest
import torch

from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.modeling import DetectorEnsemble, TestTimeAugmentation, build_model, build_roi_heads
from detectron_res.modeling.detector import rescale_detections
from detectron_res.modeling.test_time import FeaturePyramid, ScaledFeatures
from test_detector import make_batch, tiny_config
from test_roi_heads import coordinate_features, make_heads

SIZES = [(96, 128), (96, 128)]  # two 96 x 128 input images: res4 maps of 6 x 8


def two_level_pyramid(level_1: torch.Tensor) -> FeaturePyramid:
    """Level 0: the coordinate features at the input size; level 1: `level_1` for the images at twice the size."""
    levels = [ScaledFeatures(coordinate_features(), SIZES), ScaledFeatures(level_1, [(192, 256), (192, 256)])]
    return FeaturePyramid(scale_sizes=[SIZES, [(192, 256), (192, 256)]], compute=lambda index, flipped: levels[index])


def coordinates(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    return torch.stack([xs, ys])


def test_maxout_takes_the_element_wise_max_of_the_two_scales():
    heads = make_heads()
    level_1 = coordinates(12, 16)
    level_1[1] *= -1  # channel 1 is -y at the larger scale
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    # scale 1: the box doubles to [32, 32, 160, 96]: x 1.5 .. 9.5 -> mean 5.5, y 1.5 .. 5.5 -> mean 3.5;
    # res5 = 2 v + 1: (12, -6); scale 0 gives (6, 4) (see test_roi_heads); the max: (12, 4)
    out = heads.pyramid_box_features(two_level_pyramid(torch.stack([level_1, level_1])), boxes, SIZES)
    torch.testing.assert_close(out, torch.tensor([[12.0, 4.0]]))


def test_maxout_of_two_identical_scales_is_the_single_scale():
    heads = make_heads()
    features = coordinate_features()
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0], [0.0, 0.0, 128.0, 96.0]]), torch.tensor([[8.0, 8.0, 40.0, 90.0]])]
    same = FeaturePyramid(scale_sizes=[SIZES, SIZES], compute=lambda index, flipped: ScaledFeatures(features.clone(), SIZES))
    torch.testing.assert_close(heads.pyramid_box_features(same, boxes, SIZES), heads.box_features(features, boxes, SIZES), rtol=0, atol=0)


def test_each_roi_is_pooled_at_its_pair_of_adjacent_scales():
    """Three scales (half, same, double size) with constant maps: channel 0 is the scale index, channel 1 is 2 minus
    it, so the max of a pair (a, a + 1) shows both members: (a + 1, 2 - a), and res5 = 2 v + 1."""
    sizes = [[(48, 64)] * 2, SIZES, [(192, 256)] * 2]

    def compute(index, flipped):
        height, width = sizes[index][0][0] // 16, sizes[index][0][1] // 16
        constant = torch.tensor([float(index), 2.0 - index]).view(1, 2, 1, 1).expand(2, 2, height, width)
        return ScaledFeatures(constant.clone(), sizes[index])

    heads = make_heads()
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 64.0, 64.0]]), torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    # reference 32 x 32: the 16-px box is 8, 16, 32 px at the scales -> pair (1, 2); 64 px: 32, 64, 128 -> (0, 1);
    # 32 px: 16, 32, 64 -> (0, 1) (32 is not smaller than the reference)
    out = heads.pyramid_box_features(FeaturePyramid(scale_sizes=sizes, compute=compute), boxes, SIZES, reference_size=32)
    torch.testing.assert_close(out, torch.tensor([[5.0, 3.0], [3.0, 5.0], [3.0, 5.0]]))


def shifting_heads():
    """Heads whose class-0 logit is the pooled x-channel (after 2 v + 1) and whose class-0 box moves right by a
    tenth of its width (dx = 1 with weight 10); class 1 and background logits are 0, class 1 boxes stay."""
    heads = make_heads(score_thresh=0.0)
    with torch.no_grad():
        heads.predictor.cls_score.weight[0, 0] = 1.0
        heads.predictor.bbox_pred.bias[0] = 1.0
    return heads


def test_flip_averages_the_scores_and_the_mirrored_back_boxes():
    heads = shifting_heads()
    features = coordinate_features()

    def compute(index, flipped):  # the "mirrored" map is the same map, so the two views differ
        return ScaledFeatures(features, SIZES)

    pyramid = FeaturePyramid(scale_sizes=[SIZES], compute=compute)
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    probs, predicted = heads.predict(pyramid, boxes, SIZES, flip=False)
    # unflipped: x mean 2.5 -> logit 6; class 0's box moves by 6.4 px
    torch.testing.assert_close(probs[0], torch.softmax(torch.tensor([[6.0, 0.0, 0.0]]), 1)[:, :2])
    torch.testing.assert_close(predicted[0], torch.tensor([[[22.4, 16.0, 86.4, 48.0], [16.0, 16.0, 80.0, 48.0]]]))
    probs, predicted = heads.predict(pyramid, boxes, SIZES, flip=True)
    # mirrored: the box is [48, 16, 112, 48], x mean 4.5 -> logit 10; its class-0 box moves right in the mirrored
    # image, so left by 6.4 px once mirrored back: the average is the box itself
    expected = (torch.softmax(torch.tensor([[6.0, 0.0, 0.0]]), 1) + torch.softmax(torch.tensor([[10.0, 0.0, 0.0]]), 1)) / 2
    torch.testing.assert_close(probs[0], expected[:, :2])
    torch.testing.assert_close(predicted[0], torch.tensor([[[16.0, 16.0, 80.0, 48.0], [16.0, 16.0, 80.0, 48.0]]]))
    assert probs[1].shape == (0, 2) and predicted[1].shape == (0, 2, 4)


def test_box_refinement_pools_each_rois_top_class_box_again():
    heads = shifting_heads()
    pyramid = FeaturePyramid.single(coordinate_features(), SIZES)
    proposals = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    plain = heads.detection_candidates(pyramid, proposals, SIZES, TestTimeAugmentation())
    refined = heads.detection_candidates(pyramid, proposals, SIZES, TestTimeAugmentation(refine_nms_thresh=0.3))
    # first pass: class 0 (top) at [22.4, .., 86.4], class 1 at the proposal; the second pass pools [22.4, 16, 86.4,
    # 48] (x 0.9 .. 4.9 in the map, mean 2.9 -> logit 6.8) and moves class 0 by another 6.4 px
    torch.testing.assert_close(plain[0]["boxes"], torch.tensor([[22.4, 16.0, 86.4, 48.0], [16.0, 16.0, 80.0, 48.0]]))
    torch.testing.assert_close(
        refined[0]["boxes"],
        torch.tensor([[22.4, 16.0, 86.4, 48.0], [16.0, 16.0, 80.0, 48.0], [28.8, 16.0, 92.8, 48.0], [22.4, 16.0, 86.4, 48.0]]),
    )
    torch.testing.assert_close(refined[0]["scores"][2:], torch.softmax(torch.tensor([6.8, 0.0, 0.0]), 0)[:2])
    assert refined[0]["labels"].tolist() == [0, 1, 0, 1] and len(refined[1]["boxes"]) == 0
    # the union's NMS runs at the refinement's IoU: the boxes of a class overlap by 57.6 / 70.4 = 0.82, so class 0
    # keeps the second pass's box (logit 6.8 beats 6) and class 1 the first pass's (its probability is higher there)
    kept = heads.select_detections(refined, TestTimeAugmentation(refine_nms_thresh=0.3))
    torch.testing.assert_close(kept[0]["boxes"], torch.tensor([[28.8, 16.0, 92.8, 48.0], [16.0, 16.0, 80.0, 48.0]]))
    assert kept[0]["labels"].tolist() == [0, 1]
    assert len(heads.select_detections(refined, TestTimeAugmentation(refine_nms_thresh=0.9))[0]["boxes"]) == 4


def test_global_context_concatenates_the_whole_image_feature_of_each_roi_image():
    heads = make_heads()
    heads.global_context = True
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.tensor([[16.0, 16.0, 48.0, 80.0], [16.0, 16.0, 48.0, 48.0]])]
    # whole image [0, 0, 128, 96]: x -0.5 .. 7.5 -> mean 3.5, y -0.5 .. 5.5 -> mean 2.5: (8, 6); image 1 adds 100
    out = heads.box_features(coordinate_features(), boxes, SIZES)
    torch.testing.assert_close(
        out, torch.tensor([[6.0, 4.0, 8.0, 6.0], [204.0, 206.0, 208.0, 206.0], [204.0, 204.0, 208.0, 206.0]])
    )


def test_global_context_doubles_the_predictor_input_and_trains():
    cfg = tiny_config()
    assert build_roi_heads(cfg, stride=16).predictor.cls_score.in_features == 64  # R18 width 8: res5 has 64 channels
    cfg.MODEL.ROI_HEADS.GLOBAL_CONTEXT = True
    heads = build_roi_heads(cfg, stride=16)
    assert heads.predictor.cls_score.in_features == 128 and heads.predictor.bbox_pred.in_features == 128
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(30):
        total = sum(model(batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5


@pytest.mark.parametrize("fine_tuning", [False, True])
def test_a_checkpoint_of_the_other_context_setting_does_not_load(tmp_path, fine_tuning):
    plain_cfg, context_cfg = tiny_config(), tiny_config()
    context_cfg.MODEL.ROI_HEADS.GLOBAL_CONTEXT = True
    torch.save(build_model(plain_cfg).state_dict(), tmp_path / "plain.pth")
    torch.save(build_model(context_cfg).state_dict(), tmp_path / "context.pth")
    loader = Checkpointer(model=build_model(context_cfg), save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"plain\.pth.*trained without global context.*GLOBAL_CONTEXT=false"):
        loader.load(tmp_path / "plain.pth", allow_shape_mismatch=fine_tuning)
    loader = Checkpointer(model=build_model(plain_cfg), save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"context\.pth.*trained with global context.*GLOBAL_CONTEXT=true"):
        loader.load(tmp_path / "context.pth", allow_shape_mismatch=fine_tuning)


# --------------------------------------------------------------------------------- the whole detector, tiny inputs
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


def plain_inference(model, batch):
    """Trunk, RPN and the head's own single-pass inference (`FastRCNNOutputLayers.inference`), then rescaling."""
    images, sizes = model.preprocess_images(batch)
    features = model.backbone(images)
    proposals, _ = model.rpn(features, sizes)
    detections, _ = model.roi_heads(features, proposals, sizes)
    return [rescale_detections(d, input_size=s, output_size=(x["height"], x["width"])) for d, s, x in zip(detections, sizes, batch)]


def assert_same_detections(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], e[key]), key


def test_add_ons_switched_off_give_exactly_the_plain_inference(tiny_model):
    batch = make_batch()
    with torch.no_grad():
        expected = plain_inference(tiny_model, batch)
        tiny_model.test_time = TestTimeAugmentation()
        assert sum(len(d["boxes"]) for d in expected) > 10
        assert_same_detections(tiny_model(batch), expected)


def test_a_pyramid_of_the_input_scale_alone_gives_exactly_the_single_scale_detections(tiny_model):
    batch = [dict(x, pyramid=[x["image"].clone()]) for x in make_batch()]
    with torch.no_grad():
        expected = plain_inference(tiny_model, batch)
        tiny_model.test_time = TestTimeAugmentation(scales=(64,))
        try:
            assert_same_detections(tiny_model(batch), expected)
        finally:
            tiny_model.test_time = TestTimeAugmentation()


def test_multi_scale_without_pyramid_images_names_the_image(tiny_model):
    batch = [dict(x, file_name=f"img{i}.png") for i, x in enumerate(make_batch())]
    tiny_model.test_time = TestTimeAugmentation(scales=(32, 64))
    try:
        with pytest.raises(ValueError, match=r"scales \[32, 64\].*img0\.png has none"):
            tiny_model(batch)
    finally:
        tiny_model.test_time = TestTimeAugmentation()


def test_an_ensemble_of_one_model_is_that_model_and_of_two_copies_too(tiny_model):
    batch = make_batch()
    tiny_model.test_time = TestTimeAugmentation(vote_iou_thresh=0.5)
    try:
        with torch.no_grad():
            expected = tiny_model(batch)
            for shared in (False, True):
                assert_same_detections(DetectorEnsemble(models=[tiny_model], shared_proposals=shared)(batch), expected)
            # two copies: each candidate twice, so the NMS keeps the same boxes and the votes weigh the same
            pair = DetectorEnsemble(models=[tiny_model, tiny_model], shared_proposals=False)(batch)
    finally:
        tiny_model.test_time = TestTimeAugmentation()
    for a, e in zip(pair, expected):
        torch.testing.assert_close(a["boxes"], e["boxes"])
        torch.testing.assert_close(a["scores"], e["scores"])
        assert torch.equal(a["labels"], e["labels"])


def test_ensemble_members_must_share_their_classes(tiny_model):
    cfg = tiny_config()
    cfg.MODEL.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="same classes"):
        DetectorEnsemble(models=[tiny_model, build_model(cfg)])


def test_all_add_ons_compose_in_one_ensemble_run():
    """Global context + refinement + voting + multi-scale + flip, in an ensemble of two models on the union of
    their proposals: boxes inside each original image, scores sorted, at most 100 per image."""
    torch.manual_seed(1)
    context_cfg = tiny_config()
    context_cfg.MODEL.ROI_HEADS.GLOBAL_CONTEXT = True
    test_time = TestTimeAugmentation(scales=(32, 64, 96), reference_size=24, flip=True, refine_nms_thresh=0.3, vote_iou_thresh=0.5)
    models = [build_model(tiny_config()).eval(), build_model(context_cfg).eval()]
    for model in models:
        model.test_time = test_time
    batch = make_batch()
    for x in batch:  # the pyramid as the mapper would make it: shorter side 32, 64 (the input), 96
        height, width = x["image"].shape[-2:]
        x["pyramid"] = [
            torch.nn.functional.interpolate(x["image"][None].float(), scale_factor=s / 64, mode="bilinear")[0].round().to(torch.uint8)
            if s != 64 else x["image"]
            for s in (32, 64, 96)
        ]
    with torch.no_grad():
        outputs = DetectorEnsemble(models=models, shared_proposals=True)(batch)
    assert sum(len(o["boxes"]) for o in outputs) > 0
    for output, x in zip(outputs, batch):
        boxes = output["boxes"]
        assert len(boxes) <= 100 and torch.isfinite(boxes).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= x["width"]).all() and (boxes[:, 3] <= x["height"]).all()
        assert (output["scores"][:-1] >= output["scores"][1:]).all()


def test_the_paper_pyramid_reduced_to_600_gives_exactly_the_600_px_detections(tiny_model, tmp_path):
    """Through the real mapper: a 480 x 640 image at the paper's test size (600, max 1000) with the pyramid {600}."""
    import cv2
    import numpy as np

    from detectron_res.data.mapper import DatasetMapper

    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 1, "height": 480, "width": 640}
    single = DatasetMapper(min_size=600, max_size=1000, is_train=False)(record)
    pyramid = DatasetMapper(min_size=600, max_size=1000, is_train=False, test_scales=[600])(record)
    assert single["image"].shape == (3, 600, 800) and torch.equal(pyramid["pyramid"][0], single["image"])
    with torch.no_grad():
        tiny_model.test_time = TestTimeAugmentation()
        expected = tiny_model([single])
        tiny_model.test_time = TestTimeAugmentation(scales=(600,))
        try:
            actual = tiny_model([pyramid])
        finally:
            tiny_model.test_time = TestTimeAugmentation()
    assert len(expected[0]["boxes"]) > 0
    assert_same_detections(actual, expected)


def four_constant_scales() -> FeaturePyramid:
    """One 96 x 128 image at 1, 2, 4 and 8 times its size, with constant maps (mirrored or not): channel 0 is the
    scale index a, channel 1 is 3 - a; the max of a pair (a, a + 1) is (a + 1, 3 - a), 2 v + 1 after res5."""
    sizes = [[(96 * f, 128 * f)] for f in (1, 2, 4, 8)]

    def compute(index, flipped):
        height, width = sizes[index][0][0] // 16, sizes[index][0][1] // 16
        constant = torch.tensor([float(index), 3.0 - index]).view(1, 2, 1, 1).expand(1, 2, height, width)
        return ScaledFeatures(constant.clone(), sizes[index])

    return FeaturePyramid(scale_sizes=sizes, compute=compute)


def test_the_scale_pair_uses_each_scales_area_and_the_default_reference_of_224():
    heads = make_heads()
    # a 56-px square: 56, 112, 224, 448 px at the four scales. With the default reference 224 it is smaller at the
    # first two and not smaller at the third (224 x 224 exactly): the pair (1, 2), max (2, 2) -> 2 v + 1 = (5, 5).
    # Had the areas been divided by the scale factors (all below 224^2), or the reference been 225, it would be (2, 3)
    out = heads.pyramid_box_features(four_constant_scales(), [torch.tensor([[0.0, 0.0, 56.0, 56.0]])], [(96, 128)])
    torch.testing.assert_close(out, torch.tensor([[5.0, 5.0]]))


def test_predict_forwards_the_reference_size_and_does_not_flip_by_default():
    import warnings

    heads = shifting_heads()  # class-0 logit = the feature's channel 0, class-0 box moves right by width / 10
    boxes = [torch.tensor([[0.0, 0.0, 56.0, 56.0]])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a softmax without its dimension would warn
        probs, predicted = heads.predict(four_constant_scales(), boxes, [(96, 128)])
        small_probs, _ = heads.predict(four_constant_scales(), boxes, [(96, 128)], reference_size=112)
    # default reference 224: the pair (1, 2), feature (5, 5) -> logits (5, 0, 0); no flip, so class 0's box is
    # moved by 5.6 px (a flipped view would move it back: average = the box itself)
    torch.testing.assert_close(probs[0], torch.softmax(torch.tensor([[5.0, 0.0, 0.0]]), 1)[:, :2])
    torch.testing.assert_close(predicted[0], torch.tensor([[[5.6, 0.0, 61.6, 56.0], [0.0, 0.0, 56.0, 56.0]]]))
    # reference 112: 112 px at scale 1 is not smaller, so the pair (0, 1): feature (1, 3) -> 2 v + 1 = (3, 7)
    torch.testing.assert_close(small_probs[0], torch.softmax(torch.tensor([[3.0, 0.0, 0.0]]), 1)[:, :2])


def test_flipped_features_come_from_the_mirrored_maps():
    heads = make_heads()
    features = coordinate_features()

    def compute(index, flipped):  # the mirrored map really is mirrored: channel 0 is 7 - x there
        return ScaledFeatures(features.flip(-1) if flipped else features, SIZES)

    pyramid = FeaturePyramid(scale_sizes=[SIZES], compute=compute)
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    # the mirrored box [48, 16, 112, 48] in the mirrored map: x 2.5 .. 6.5 there, mean 4.5, value 7 - 4.5 = 2.5;
    # y mean 1.5: the same feature as unflipped, 2 v + 1 = (6, 4) (the unmirrored map would give x 4.5 -> 10)
    out = heads.pyramid_box_features(pyramid, boxes, SIZES, flipped=True)
    torch.testing.assert_close(out, torch.tensor([[6.0, 4.0]]))


def test_boxes_are_scaled_by_the_levels_own_x_and_y_factors():
    heads = make_heads()
    level_sizes = [(48, 256), (48, 256)]  # y halved, x doubled: maps of 3 x 16
    level = ScaledFeatures(torch.stack([coordinates(3, 16), coordinates(3, 16)]), level_sizes)
    pyramid = FeaturePyramid(scale_sizes=[level_sizes], compute=lambda index, flipped: [level][index])
    boxes = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    # at the level the box is [32, 8, 160, 24]: x 1.5 .. 9.5 in the map, mean 5.5 -> 12; y 0 .. 1, mean 0.5 -> 2
    out = heads.pyramid_box_features(pyramid, boxes, SIZES)
    torch.testing.assert_close(out, torch.tensor([[12.0, 2.0]]))


def test_no_roi_in_the_batch_gives_no_feature_from_the_first_scale():
    heads = make_heads()
    computed = []

    def compute(index, flipped):  # a one-scale pyramid: there is no scale 1
        computed.append(index)
        return [ScaledFeatures(coordinate_features(), SIZES)][index]

    pyramid = FeaturePyramid(scale_sizes=[SIZES], compute=compute)
    out = heads.pyramid_box_features(pyramid, [torch.zeros((0, 4)), torch.zeros((0, 4))], SIZES)
    assert out.shape == (0, 2) and computed == [0]


def test_refinement_passes_the_flip_to_both_passes():
    heads = shifting_heads()
    features = coordinate_features()
    pyramid = FeaturePyramid(scale_sizes=[SIZES], compute=lambda index, flipped: ScaledFeatures(features, SIZES))
    proposals = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    test_time = TestTimeAugmentation(flip=True, refine_nms_thresh=0.3)
    found = heads.detection_candidates(pyramid, proposals, SIZES, test_time)
    # flip averages logits 6 (unflipped) and 10 (mirrored) and brings class 0's box back onto the proposal (see
    # test_flip_...), so the refined box is the proposal again and the second pass repeats the first
    mean = (torch.softmax(torch.tensor([6.0, 0.0, 0.0]), 0) + torch.softmax(torch.tensor([10.0, 0.0, 0.0]), 0)) / 2
    torch.testing.assert_close(found[0]["boxes"], torch.tensor([[16.0, 16.0, 80.0, 48.0]] * 4))
    torch.testing.assert_close(found[0]["scores"], torch.cat([mean[:2], mean[:2]]))
    assert found[0]["labels"].tolist() == [0, 1, 0, 1] and len(found[1]["boxes"]) == 0


def test_the_heads_vote_after_the_nms_when_voting_is_on():
    heads = make_heads()  # NMS at 0.5, 100 detections per image
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0]]
    )
    candidates = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.6, 0.3, 0.8, 0.2]), "labels": torch.tensor([0, 0, 0, 1, 1])}]
    kept = heads.select_detections(candidates, TestTimeAugmentation(vote_iou_thresh=0.5))
    # the boxes of tests/postprocess/test_vote.py: the NMS keeps A 0.9, D 0.8, B 0.6, C 0.3 (E: IoU 0.83 with D).
    # A and B (IoU 0.5) vote for each other: y2 = (0.9 * 10 + 0.6 * 20) / 1.5 = 14; C (IoU 1/3 with A, 50 / 250 with
    # B) votes alone; D and E: y2 = (0.8 * 10 + 0.2 * 12) / 1.0 = 10.4
    torch.testing.assert_close(
        kept[0]["boxes"],
        torch.tensor([[0.0, 0.0, 10.0, 14.0], [0.0, 0.0, 10.0, 10.4], [0.0, 0.0, 10.0, 14.0], [5.0, 0.0, 15.0, 10.0]]),
    )
    torch.testing.assert_close(kept[0]["scores"], torch.tensor([0.9, 0.8, 0.6, 0.3]))
    assert kept[0]["labels"].tolist() == [0, 1, 0, 0]
