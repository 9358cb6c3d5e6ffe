"""Predictor: one image (array or file) in, detections in the image's own pixels and class names out."""

import cv2
import numpy as np
import pytest
import torch

from detectron_res.config import get_default_config
from detectron_res.data.mapper import DatasetMapper
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.predictor import Predictor
from detectron_res.modeling import build_model


def tiny_config(output_dir):
    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 2
    cfg.MODEL.BACKBONE.DEPTH = 18
    cfg.MODEL.BACKBONE.WIDTH = 8
    cfg.MODEL.BACKBONE.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RPN.ANCHOR_SIZES = [16, 32]
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.fixture
def trained(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make the classifier favour "dog" so that both classes show up with scores
        model.roi_heads.predictor.cls_score.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    Checkpointer(model=model, save_dir=cfg.OUTPUT_DIR, metadata={"class_names": ["cat", "dog"]}).save("model_final")
    image = np.random.default_rng(0).integers(0, 256, size=(90, 150, 3), dtype=np.uint8)
    cv2.rectangle(image, (20, 10), (80, 70), (250, 20, 20), thickness=-1)
    return cfg, model.eval(), image


def test_array_and_file_give_the_same_detections_in_original_pixels(trained, tmp_path):
    cfg, model, image = trained
    predictor = Predictor.from_config(cfg)  # the output folder's last checkpoint
    result = predictor(image)
    n = len(result["boxes"])
    assert n > 0
    assert result["boxes"].shape == (n, 4) and result["boxes"].dtype == np.float32
    assert result["scores"].shape == (n,) and result["labels"].shape == (n,)
    assert (result["boxes"][:, [0, 2]] <= 150).all() and (result["boxes"][:, [1, 3]] <= 90).all()
    assert (result["boxes"] >= 0).all()
    assert result["class_names"] == [["cat", "dog"][i] for i in result["labels"]]
    assert (np.diff(result["scores"]) <= 0).all()

    # the same as the evaluation path: the inference mapper on a record, then the model
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    record = {"file_name": str(path), "height": 90, "width": 150, "image_id": 1}
    (expected,) = model([DatasetMapper(min_size=64, max_size=128, is_train=False)(record)])
    np.testing.assert_allclose(result["boxes"], expected["boxes"].numpy(), atol=1e-4)

    from_file = predictor(path)
    np.testing.assert_allclose(from_file["boxes"], result["boxes"], atol=1e-4)
    from_bgr = predictor(np.ascontiguousarray(image[:, :, ::-1]), input_format="BGR")
    np.testing.assert_allclose(from_bgr["boxes"], result["boxes"], atol=1e-4)


def test_bad_inputs_are_named(trained, tmp_path):
    cfg, _, _ = trained
    predictor = Predictor.from_config(cfg, str(tmp_path / "run" / "model_final.pth"))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="input_format"):
        predictor(np.zeros((10, 10, 3), dtype=np.uint8), input_format="HSV")
    with pytest.raises(ValueError, match="3 class names"):
        Predictor.from_config(cfg, class_names=["a", "b", "c"])


def test_empty_and_grayscale_arrays_and_folders_get_clear_errors(trained, tmp_path):
    cfg, _, _ = trained
    predictor = Predictor.from_config(cfg)
    for shape in ((0, 0, 3), (0, 7, 3), (7, 0, 3)):  # used to be ZeroDivisionError in the resize
        with pytest.raises(ValueError, match=rf"the image is empty: {shape[0]}x{shape[1]} \(HxW\)"):
            predictor(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(10, 12\) .*grayscale"):  # used to be an IndexError
        predictor(np.zeros((10, 12), dtype=np.uint8), input_format="BGR")
    with pytest.raises(IsADirectoryError, match="expected an image file, got a folder"):  # used to say "not found"
        predictor(tmp_path)


def test_the_config_test_time_add_ons_reach_the_predictor(trained):
    """TEST.MULTI_SCALE / FLIP / BOX_REFINEMENT in the config: the predictor's mapper makes the pyramid and its model
    applies them; the result equals the evaluation path's (the mapper of the same config, then that model)."""
    from detectron_res.data.build import build_test_mapper

    cfg, _, image = trained
    cfg.TEST.MULTI_SCALE.ENABLED = True
    cfg.TEST.MULTI_SCALE.SCALES = [32, 64, 96]
    cfg.TEST.MULTI_SCALE.REFERENCE_SIZE = 24
    cfg.TEST.FLIP = True
    cfg.TEST.BOX_REFINEMENT.ENABLED = True
    predictor = Predictor.from_config(cfg)
    assert predictor.model.test_time.scales == (32, 64, 96) and predictor.model.test_time.flip
    inputs = build_test_mapper(cfg).map_image(image)
    assert [tuple(im.shape[1:]) for im in inputs["pyramid"]] == [(32, 53), (64, 107), (96, 160)]
    with torch.no_grad():
        (expected,) = predictor.model([inputs])
    result = predictor(image)
    assert len(result["boxes"]) > 0
    np.testing.assert_allclose(result["boxes"], expected["boxes"].numpy(), atol=1e-4)
