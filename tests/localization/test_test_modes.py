"""Table 13's localization test modes (LOC.TEST_MODE): the center crop's window worked out by hand and its boxes
mapped back to the original image, the dense modes' inputs, and which mode each config gives."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detectron_res.config import load_config
from detectron_res.data.mapper import DatasetMapper, resize_image
from detectron_res.localization.build import build_localization_rpn, build_localization_test_mapper
from detectron_res.localization.mappers import CenterCropTestMapper, OriginalImageMapper
from detectron_res.localization.rpn_stage import LocalizationRPN

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER_SCALES = (224, 256, 384, 480, 640)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_center_crop_is_the_middle_square_of_the_resized_image_and_its_window_in_original_pixels():
    image = random_image(10, 15)
    out = CenterCropTestMapper(size=8, crop_size=4).map_image(image)
    # shorter side 10 -> 8: 8 x 12; top round((8 - 4) / 2) = 2, left round((12 - 4) / 2) = 4
    resized = resize_image(image, height=8, width=12, backend="opencv")
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), resized[2:6, 4:8])
    assert (out["height"], out["width"]) == (10, 15)
    # the square [4, 8) x [2, 6) of the 8 x 12 image is [4, 8) * 15 / 12 x [2, 6) * 10 / 8 of the original
    assert out["window"].tolist() == [5.0, 2.5, 10.0, 7.5]
    portrait = CenterCropTestMapper(size=8, crop_size=4).map_image(random_image(15, 10))
    # 12 x 8: top round(4) = 4, left round(2) = 2 -> [2, 6) * 10 / 8 x [4, 8) * 15 / 12
    assert portrait["window"].tolist() == [2.5, 5.0, 7.5, 10.0]
    odd = CenterCropTestMapper(size=8, crop_size=5).map_image(image)
    # 8 x 12: top round(1.5) = 2, left round(3.5) = 4 (torchvision's rounding): [4, 9) * 15 / 12 x [2, 7) * 10 / 8
    assert odd["window"].tolist() == [5.0, 2.5, 11.25, 8.75]
    assert np.array_equal(odd["image"].permute(1, 2, 0).numpy(), resized[2:7, 4:9])
    with pytest.raises(ValueError, match=r"the center crop \(9\) must be <= the resized shorter side \(8\)"):
        CenterCropTestMapper(size=8, crop_size=9)


def test_boxes_found_in_a_window_map_back_by_its_offset_and_scale():
    results = [{"boxes": torch.tensor([[1.0, 1.0, 2.0, 3.0], [0.0, 0.0, 4.0, 4.0]])}]
    x = {"height": 10, "width": 15, "window": torch.tensor([5.0, 2.5, 10.0, 7.5], dtype=torch.float64)}
    (out,) = LocalizationRPN._to_original(results, [(4, 4)], [x])
    # scale 5 / 4 = 1.25 on both axes, then + (5, 2.5)
    torch.testing.assert_close(out["boxes"], torch.tensor([[6.25, 3.75, 7.5, 6.25], [5.0, 2.5, 10.0, 7.5]]))
    (whole,) = LocalizationRPN._to_original(results, [(4, 4)], [{"height": 8, "width": 12}])  # no window
    torch.testing.assert_close(whole["boxes"], torch.tensor([[3.0, 2.0, 6.0, 6.0], [0.0, 0.0, 12.0, 8.0]]))


def test_the_rpn_on_a_center_crop_returns_the_crops_boxes_in_original_pixels():
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "loc_shapes_r18.yaml", ["MODEL.DEVICE=cpu", "MODEL.BACKBONE.WIDTH=4",
                                                         "MODEL.RPN.POST_NMS_TOPK_TEST=4", "LOC.TEST_MODE=center_crop"])
    model = build_localization_rpn(cfg).eval()
    mapper = build_localization_test_mapper(cfg)
    assert isinstance(mapper, CenterCropTestMapper) and (mapper.size, mapper.crop_size) == (128, 96)
    x = {**mapper.map_image(random_image(160, 200)), "classes": [2]}
    assert tuple(x["image"].shape) == (3, 96, 96)
    # 160 x 200 -> 128 x 160; top 16, left 32: the window is [32, 16, 128, 112] / 0.8
    torch.testing.assert_close(x["window"], torch.tensor([40.0, 20.0, 160.0, 140.0], dtype=torch.float64))
    (out,) = model([x])
    features, sizes = model.features([x["image"]])
    (raw,) = model.rpn.class_boxes(features, sizes, [torch.tensor([2])])
    assert len(out["boxes"]) == len(raw["boxes"]) > 0
    torch.testing.assert_close(out["boxes"], raw["boxes"] * 1.25 + torch.tensor([40.0, 20.0, 40.0, 20.0]))


def test_the_paper_configs_test_dense_at_its_scales_and_each_mode_is_an_override(tmp_path):
    path = tmp_path / "im.png"
    cv2.imwrite(str(path), random_image(375, 500))
    record = {"file_name": str(path), "image_id": "im", "height": 375, "width": 500}
    paper = CONFIGS / "ilsvrc_loc_r101.yaml"

    cfg = load_config(paper)
    assert cfg.LOC.TEST_MODE == "dense_multiscale"
    out = OriginalImageMapper(test_mapper=build_localization_test_mapper(cfg))(record)
    # the whole image at the shorter sides 224, 256, 384, 480, 640 (not the detector's 200..1000)
    sizes = [tuple(im.shape[1:]) for im in out["pyramid"]]
    assert sizes == [(224, 299), (256, 341), (384, 512), (480, 640), (640, 853)]
    assert tuple(out["image"].shape[1:]) == (256, 341) and "window" not in out

    dense = build_localization_test_mapper(load_config(paper, ["LOC.TEST_MODE=dense"]))
    assert isinstance(dense, DatasetMapper) and dense.test_scales == () and dense.min_sizes == (256,)
    out = OriginalImageMapper(test_mapper=dense)(record)
    assert tuple(out["image"].shape[1:]) == (256, 341) and "pyramid" not in out

    center = build_localization_test_mapper(load_config(paper, ["LOC.TEST_MODE=center_crop"]))
    out = OriginalImageMapper(test_mapper=center)(record)
    # 375 x 500 -> 256 x 341; top 16, left round(58.5) = 58 (Python rounds half to even)
    assert tuple(out["image"].shape[1:]) == (224, 224)
    torch.testing.assert_close(
        out["window"], torch.tensor([58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341, 240 * 375 / 256],
                                    dtype=torch.float64)
    )
    multi = build_localization_test_mapper(load_config(paper, ["LOC.TEST_MODE=dense_multiscale"]))
    assert multi.test_scales == PAPER_SCALES


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["LOC.TEST_MODE=center"], r"LOC\.TEST_MODE='center' must be one of"),
        (["LOC.TEST_MODE=center_crop", "INPUT.MIN_SIZE_TEST=200"],
         r"LOC\.TEST_MODE='center_crop' takes a LOC\.CROP_SIZE=224 square from the image at INPUT\.MIN_SIZE_TEST=200"),
        (["TEST.MULTI_SCALE.ENABLED=true"],
         r"TEST\.MULTI_SCALE\.ENABLED=true is the detector's multi-scale test; a LocalizationRPN config tests at "
         r"several scales with LOC\.TEST_MODE=dense_multiscale"),
        (["LOC.TEST_SCALES=[480,256]"], r"LOC\.TEST_SCALES=\[480, 256\] must be strictly increasing"),
    ],
)
def test_bad_test_modes_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "ilsvrc_loc_r50.yaml", overrides)
