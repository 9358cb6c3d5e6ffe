"""MODEL.ROI_HEADS.EMPTY_BOXES through a built model: detectron2's rule (after_rescale, the d2 configs) lets empty
boxes take places of the top DETECTIONS_PER_IMAGE and drops them after the rescale; before_nms (the default) does
not. The hand-made case at the function level, checked against detectron2's recorded output, is in
tests/postprocess/test_nms.py."""

from pathlib import Path

import pytest
import torch

from test_detector import tiny_config

from detectron_res.config import ConfigError, get_default_config, load_config
from detectron_res.modeling import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_model(empty_boxes: str):
    """A random R18 (width 8) detector for 2 classes whose Fast R-CNN head gives every RoI the same output: class 1
    scores above class 0, and class 1's box shifted 500 widths to the right (clipped to the image: empty)."""
    cfg = tiny_config()
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.99
    cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = 5
    cfg.MODEL.ROI_HEADS.EMPTY_BOXES = empty_boxes
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = model.roi_heads.predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()
        predictor.cls_score.bias.copy_(torch.tensor([0.0, 1.0, -5.0]))  # class 1 > class 0 > background
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5000.0, 0.0, 0.0, 0.0]))  # dx = 500
    return model


def test_the_rule_decides_whether_empty_boxes_take_places_in_the_top_k():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=generator)
    inputs = [{"image": image, "height": 128, "width": 192}]
    kept = tiny_model("before_nms")(inputs)[0]
    # the empty class-1 boxes never enter: the 5 places go to class 0 (the RoIs themselves, NMS at 0.99)
    assert kept["labels"].tolist() == [0] * 5
    assert bool(((kept["boxes"][:, 2:] - kept["boxes"][:, :2]) > 0).all())
    # detectron2: the class-1 boxes (higher scores) take all 5 places, then are dropped as empty: no detection
    dropped = tiny_model("after_rescale")(inputs)[0]
    assert len(dropped["boxes"]) == 0 and len(dropped["scores"]) == 0 and len(dropped["labels"]) == 0


def test_the_d2_configs_ask_for_detectron2s_rule_and_the_others_do_not():
    for name in ("d2_r50_c4.yaml", "d2_r101_c4.yaml"):
        assert load_config(CONFIGS / name).MODEL.ROI_HEADS.EMPTY_BOXES == "after_rescale"
    for name in ("base_c4.yaml", "shapes_r18.yaml", "voc_r50.yaml"):
        assert load_config(CONFIGS / name).MODEL.ROI_HEADS.EMPTY_BOXES == "before_nms"
    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = 18
    cfg.MODEL.ROI_HEADS.EMPTY_BOXES = "after_rescale"
    assert build_model(cfg).roi_heads.predictor.empty_boxes == "after_rescale"
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "d2_r50_c4.yaml", overrides=["MODEL.ROI_HEADS.EMPTY_BOXES=never"])
    assert "MODEL.ROI_HEADS.EMPTY_BOXES='never' must be one of 'before_nms', 'after_rescale'" in str(error.value)
