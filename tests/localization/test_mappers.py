"""The localization mappers: the RPN stage's random crops (boxes worked out by hand), the R-CNN stage's RoI samples,
and the inference mapper that keeps the original image."""

import cv2
import numpy as np
import pytest
import torch

from detectron_res.data.mapper import BadImageError, DatasetMapper
from detectron_res.localization.mappers import LocCropMapper, OriginalImageMapper, RoIMapper


class ScriptedRng:
    """Stands in for numpy's Generator: `integers` and `random` return the scripted values in order."""

    def __init__(self, integers=(), randoms=()):
        self._integers, self._randoms = list(integers), list(randoms)
        self.integer_calls = []

    def integers(self, low, high=None):
        self.integer_calls.append((low, high))
        return self._integers.pop(0)

    def random(self):
        return self._randoms.pop(0)


def write_image(path, height, width, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return image


def record(path, height, width, boxes, classes):
    return {
        "file_name": str(path), "image_id": 7, "height": height, "width": width,
        "annotations": [{"bbox": list(b), "category_id": c, "iscrowd": 0} for b, c in zip(boxes, classes)],
    }


def test_crop_scales_shifts_flips_and_clips_the_boxes(tmp_path):
    image = write_image(tmp_path / "a.png", 50, 100)  # H = 50, W = 100
    rec = record(tmp_path / "a.png", 50, 100, [[10.0, 5.0, 30.0, 45.0], [60.0, 10.0, 90.0, 40.0]], [3, 1])
    mapper = LocCropMapper(crop_size=64, scale_range=(64, 80), hflip_prob=0.5, min_visible=0.5)
    # shorter side 80 (scale 1.6: image 80 x 160), crop top 8, left 40, then a flip (0.2 < 0.5)
    rng = ScriptedRng(integers=[80, 8, 40], randoms=[0.2])
    out = mapper(rec, rng=rng)
    assert rng.integer_calls == [(64, 81), (17, None), (97, None)]
    # box 1: (16, 8, 48, 72) scaled, (-24, 0, 8, 64) in the crop: visible (0, 0, 8, 64) is a quarter: ignored
    # box 2: (96, 16, 144, 64) scaled, (56, 8, 104, 56) in the crop, clipped (56, 8, 64, 56): a sixth: ignored too
    assert out["gt_boxes"].shape == (0, 4) and out["gt_classes"].tolist() == []
    assert out["ignore_boxes"].tolist() == [[56.0, 0.0, 64.0, 64.0], [0.0, 8.0, 8.0, 56.0]]  # flipped: x -> 64 - x
    assert out["image_classes"].tolist() == [1, 3]
    resized = cv2.resize(image, (160, 80), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), resized[8:72, 40:104][:, ::-1])
    rng = ScriptedRng(integers=[64, 0, 0], randoms=[0.9])  # scale 1.28 (64 x 128), the top-left corner, no flip
    out = mapper(rec, rng=rng)
    assert out["gt_boxes"][0].tolist() == pytest.approx([12.8, 6.4, 38.4, 57.6])
    assert out["gt_classes"].tolist() == [3]
    assert out["ignore_boxes"].shape == (0, 4)  # box 2, (76.8, 12.8, 115.2, 51.2), lies outside the crop
    assert (out["height"], out["width"], out["image_id"]) == (50, 100, 7)


def test_crop_mapper_rejects_a_scale_range_below_the_crop():
    with pytest.raises(ValueError, match="crop size"):
        LocCropMapper(crop_size=224, scale_range=(200, 480))


def test_roi_mapper_draws_foreground_at_its_fraction_and_flips_roi_and_boxes(tmp_path):
    write_image(tmp_path / "b.png", 20, 40)
    rec = record(tmp_path / "b.png", 20, 40, [[0.0, 0.0, 10.0, 10.0]], [2])
    rec.update(rois=[[0.0, 0.0, 10.0, 10.0], [20.0, 5.0, 30.0, 15.0], [25.0, 0.0, 40.0, 20.0]],
               roi_foreground=[True, False, False])
    mapper = RoIMapper(fg_fraction=0.25, hflip_prob=0.5)
    # random 0.1 < 0.25: a foreground RoI (the only one); then no flip (0.7)
    out = mapper(rec, rng=ScriptedRng(integers=[0], randoms=[0.1, 0.7]))
    assert out["rois"].tolist() == [[0.0, 0.0, 10.0, 10.0]] and out["gt_classes"].tolist() == [2]
    # random 0.3: background, the second of the two; flipped: x -> 40 - x
    out = mapper(rec, rng=ScriptedRng(integers=[1], randoms=[0.3, 0.2]))
    assert out["rois"].tolist() == [[0.0, 0.0, 15.0, 20.0]]
    assert out["gt_boxes"].tolist() == [[30.0, 0.0, 40.0, 10.0]]
    rec["roi_foreground"] = [False, False, False]  # one kind only: any RoI, without the fraction's draw
    out = mapper(rec, rng=ScriptedRng(integers=[2], randoms=[0.9]))
    assert out["rois"].tolist() == [[25.0, 0.0, 40.0, 20.0]]


def test_original_image_mapper_decodes_once_and_keeps_the_full_image(tmp_path):
    image = write_image(tmp_path / "c.png", 30, 60)
    rec = record(tmp_path / "c.png", 30, 60, [], [])
    out = OriginalImageMapper(test_mapper=DatasetMapper(min_size=15, max_size=100, is_train=False))(rec)
    assert out["image"].shape == (3, 15, 30) and out["original"].shape == (3, 30, 60)
    assert out["file_name"] == str(tmp_path / "c.png")
    assert np.array_equal(out["original"].permute(1, 2, 0).numpy(), image)
    assert (out["height"], out["width"], out["image_id"]) == (30, 60, 7)


def test_crop_keeps_a_box_cut_exactly_to_the_visible_share_and_ignores_just_below(tmp_path):
    write_image(tmp_path / "d.png", 64, 128)
    # at scale 1 (shorter side 64) and left 32, box 1 keeps exactly half of its 32 x 20 area
    rec = record(tmp_path / "d.png", 64, 128, [[16.0, 10.0, 48.0, 30.0], [80.0, 10.0, 112.0, 50.0]], [0, 1])
    mapper = LocCropMapper(crop_size=64, scale_range=(64, 64), hflip_prob=0.0, min_visible=0.5)
    out = mapper(rec, rng=ScriptedRng(integers=[64, 0, 32], randoms=[0.5]))
    assert out["gt_boxes"].dtype == torch.float32
    # box 2: (48, 10, 80, 50) in the crop, clipped to (48, 10, 64, 50): 16 x 40 of 32 x 40 = one half -> kept too
    assert out["gt_boxes"].tolist() == [[0.0, 10.0, 16.0, 30.0], [48.0, 10.0, 64.0, 50.0]]
    assert out["gt_classes"].tolist() == [0, 1] and out["ignore_boxes"].shape == (0, 4)
    rec["annotations"][1]["bbox"] = [81.0, 10.0, 113.0, 50.0]  # now 15 x 40 of 32 x 40 < one half
    out = mapper(rec, rng=ScriptedRng(integers=[64, 0, 32], randoms=[0.5]))
    assert out["gt_classes"].tolist() == [0] and out["ignore_boxes"].tolist() == [[49.0, 10.0, 64.0, 50.0]]
    # a box cut on two sides: its area decides (30 x 14 of 40 x 40 = 0.2625 < 0.3), not its sides' ratio
    write_image(tmp_path / "g.png", 100, 100)
    rec = record(tmp_path / "g.png", 100, 100, [[20.0, 50.0, 60.0, 90.0]], [2])
    out = LocCropMapper(crop_size=64, scale_range=(100, 100), hflip_prob=0.0, min_visible=0.3)(
        rec, rng=ScriptedRng(integers=[100, 0, 30], randoms=[0.5])
    )
    assert out["gt_boxes"].shape == (0, 4) and out["ignore_boxes"].tolist() == [[0.0, 50.0, 30.0, 64.0]]


def test_crop_without_rng_draws_from_numpys_global_state(tmp_path):
    write_image(tmp_path / "e.png", 50, 70)
    rec = record(tmp_path / "e.png", 50, 70, [[5.0, 5.0, 45.0, 45.0]], [1])
    mapper = LocCropMapper(crop_size=32, scale_range=(40, 60), hflip_prob=0.5)
    np.random.seed(3)
    first = mapper(rec)
    np.random.seed(3)
    again = mapper(rec)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["gt_boxes"], again["gt_boxes"])
    np.random.seed(3)
    roi_rec = {**rec, "rois": [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 45.0, 45.0]], "roi_foreground": [False, True]}
    first = RoIMapper()(roi_rec)
    np.random.seed(3)
    assert torch.equal(RoIMapper()(roi_rec)["rois"], first["rois"])


def test_roi_mapper_outputs_and_errors(tmp_path):
    image = write_image(tmp_path / "f.png", 12, 16)
    rec = record(tmp_path / "f.png", 12, 16, [[2.0, 2.0, 6.0, 6.0]], [0])
    rec.update(rois=[[1.0, 1.0, 5.0, 5.0]], roi_foreground=[True])  # one RoI, foreground only: no fraction draw
    rng = ScriptedRng(integers=[0], randoms=[0.1])  # 0.1 < 0.5: flipped
    out = RoIMapper(fg_fraction=0.25, hflip_prob=0.5)(rec, rng=rng)
    assert rng.integer_calls == [(1, None)] and rng._randoms == []
    assert out["rois"].tolist() == [[11.0, 1.0, 15.0, 5.0]] and out["rois"].dtype == torch.float32
    assert out["gt_boxes"].tolist() == [[10.0, 2.0, 14.0, 6.0]] and out["gt_boxes"].dtype == torch.float32
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image[:, ::-1])
    assert {k: out[k] for k in ("file_name", "image_id", "height", "width")} == {
        "file_name": str(tmp_path / "f.png"), "image_id": 7, "height": 12, "width": 16}
    rec.update(rois=[[1.0, 1.0, 5.0, 5.0], [3.0, 3.0, 9.0, 9.0]], roi_foreground=[True, True])
    rng = ScriptedRng(integers=[1], randoms=[0.9])  # all foreground: one integer draw over both, then the flip
    assert RoIMapper()(rec, rng=rng)["rois"].tolist() == [[3.0, 3.0, 9.0, 9.0]]
    assert rng.integer_calls == [(2, None)]
    rec.update(rois=[], roi_foreground=[])
    with pytest.raises(ValueError, match=r"f\.png: no RoI for the R-CNN stage"):
        RoIMapper()(rec, rng=ScriptedRng())
    RoIMapper(fg_fraction=0.0, hflip_prob=0.0)
    RoIMapper(fg_fraction=1.0, hflip_prob=1.0)
    for bad in ({"fg_fraction": -0.1}, {"fg_fraction": 1.1}, {"hflip_prob": -0.5}, {"hflip_prob": 1.5}):
        with pytest.raises(ValueError, match="fg_fraction and hflip_prob must be in"):
            RoIMapper(**bad)


def test_crop_mapper_checks_its_arguments_and_the_image_size(tmp_path):
    LocCropMapper(crop_size=8, scale_range=(8, 8))  # the defaults (flip 0.5, min_visible 0.5) are valid
    LocCropMapper(crop_size=8, scale_range=(8, 8), hflip_prob=1.0, min_visible=1.0)
    with pytest.raises(ValueError, match=r"must satisfy crop size \(224\) <= low <= high: the crop is taken from the "
                                         r"rescaled image"):
        LocCropMapper(crop_size=224, scale_range=(200, 480))
    for bad in ({"hflip_prob": 1.5}, {"hflip_prob": -0.1}, {"min_visible": 0.0}, {"min_visible": 1.5}):
        with pytest.raises(ValueError, match="hflip_prob must be in .0, 1. and min_visible in .0, 1."):
            LocCropMapper(crop_size=8, scale_range=(8, 8), **bad)
    write_image(tmp_path / "h.png", 10, 12)
    rec = record(tmp_path / "h.png", 11, 12, [], [])
    with pytest.raises(BadImageError, match=r"h\.png: decoded image is 10x12 \(HxW\) but the data set says 11x12"):
        LocCropMapper(crop_size=8, scale_range=(8, 8))(rec, rng=np.random.default_rng(0))


def test_crop_mapper_leaves_crowd_boxes_out_keeps_slivers_as_ignore_regions_and_names_the_file(tmp_path):
    write_image(tmp_path / "i.png", 64, 64)
    rec = record(tmp_path / "i.png", 64, 64, [[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]], [1, 2])
    rec["annotations"][1]["iscrowd"] = 1
    rec["annotations"].append({"bbox": [0.0, 20.0, 32.5, 21.0], "category_id": 3})  # 0.5 x 1 px of it in the crop
    mapper = LocCropMapper(crop_size=32, scale_range=(64, 64), hflip_prob=0.0)
    out = mapper(rec, rng=ScriptedRng(integers=[64, 0, 32], randoms=[0.9]))  # the right half of the top half
    assert out["gt_boxes"].shape == (0, 4) and out["image_classes"].tolist() == [1, 3]  # the crowd box is no class
    assert out["ignore_boxes"].tolist() == [[0.0, 20.0, 0.5, 21.0]] and out["ignore_boxes"].dtype == torch.float32
    assert out["file_name"] == str(tmp_path / "i.png")
    rec["annotations"] = []
    out = mapper(rec, rng=ScriptedRng(integers=[64, 0, 0], randoms=[0.9]))
    assert out["gt_boxes"].shape == (0, 4) and out["image_classes"].tolist() == []


def test_roi_mapper_without_rng_repeats_with_numpys_seed(tmp_path):
    write_image(tmp_path / "j.png", 40, 40)
    rois = [[float(i), float(i), float(i) + 5, float(i) + 5] for i in range(30)]
    rec = {**record(tmp_path / "j.png", 40, 40, [[0.0, 0.0, 5.0, 5.0]], [0]), "rois": rois, "roi_foreground": [False] * 30}
    drawn = []
    for _ in range(2):
        np.random.seed(11)
        drawn.append([RoIMapper()(rec)["rois"].tolist() for _ in range(4)])
    assert drawn[0] == drawn[1]


@pytest.mark.parametrize(
    ("height", "width", "min_size", "max_size", "resized"),
    [
        # the shorter side scaled to min_size, the longer capped at max_size, the other side then below 1 px: kept at 1
        (6000, 4, 128, 224, (224, 1)),  # loc_shapes_r18's test size
        (3, 6000, 128, 224, (1, 224)),
        (6000, 4, 256, 800, (800, 1)),  # ilsvrc_loc's test size: 4 * 800 / 6000 = 0.53 px rounds to 1
        (3, 6000, 256, 800, (1, 800)),
    ],
)
def test_original_image_mapper_takes_images_of_extreme_aspect_ratio(
    tmp_path, height, width, min_size, max_size, resized
):
    """Issue 21, item 13: a 4x6000 or 6000x3 image stopped localize.py with albumentations' 'height >= 1'."""
    image = write_image(tmp_path / "thin.png", height, width)
    mapper = OriginalImageMapper(test_mapper=DatasetMapper(min_size=min_size, max_size=max_size, is_train=False))
    out = mapper(record(tmp_path / "thin.png", height, width, [], []))
    assert tuple(out["image"].shape) == (3, *resized)
    assert np.array_equal(out["original"].permute(1, 2, 0).numpy(), image)


class FailingTestMapper:
    """A test mapper whose resize fails as albumentations' did on a 0-pixel side: a multi-line pydantic error."""

    def map_image(self, image):
        raise ValueError("1 validation error for InitSchema\nheight\n  Input should be greater than or equal to 1")


def test_any_failure_to_load_an_image_is_a_bad_image_naming_the_file(tmp_path):
    """Issue 21, item 13: an error of the resize (or any other step of loading) named no file and was not skipped
    with DATALOADER.ON_BAD_IMAGE=skip; now it is a BadImageError naming the file, in one line."""
    from detectron_res.data.loader import MappedDataset

    write_image(tmp_path / "a.png", 8, 8)
    rec = record(tmp_path / "a.png", 8, 8, [], [])
    with pytest.raises(BadImageError) as info:
        OriginalImageMapper(test_mapper=FailingTestMapper())(rec)
    expected = (
        f"{tmp_path / 'a.png'}: cannot load the image (ValueError: 1 validation error for InitSchema height Input "
        "should be greater than or equal to 1)"
    )
    assert str(info.value) == expected
    failing = OriginalImageMapper(test_mapper=FailingTestMapper())
    skipping = MappedDataset(records=[rec], mapper=failing, on_bad_image="skip")
    assert skipping[0] == {"bad_image": f"BadImageError: {expected}"}
    # a record whose header image_folder_dataset could not read (skip mode) is a bad image with that message
    unreadable = {**rec, "height": 0, "width": 0, "unreadable": "cannot read the image header of x.png: truncated"}
    mapper = OriginalImageMapper(test_mapper=DatasetMapper(min_size=8, max_size=8, is_train=False))
    with pytest.raises(BadImageError, match=r"^cannot read the image header of x\.png: truncated$"):
        mapper(unreadable)
