"""The res5 RoI head: shapes through pooling, res5 and the predictor, for RoIAlign and RoIPool, empty images."""

import pytest
import torch

from detectron_res.config import get_default_config
from detectron_res.modeling.build import build_roi_heads


@pytest.mark.parametrize("pooler", ["ROIAlign", "ROIPool"])
def test_shapes_from_res4_to_class_scores_and_class_specific_boxes(pooler):
    cfg = get_default_config()
    cfg.MODEL.NUM_CLASSES = 5
    cfg.MODEL.BACKBONE.DEPTH = 50
    cfg.MODEL.BACKBONE.WIDTH = 8  # bottleneck: res4 has 8*4*4 = 128 channels, res5 8*8*4 = 256
    cfg.MODEL.ROI_HEADS.POOLER = pooler
    heads = build_roi_heads(cfg, stride=16).eval()
    features = torch.randn(2, 128, 6, 8)  # a padded batch of two 96x128 images
    proposals = [torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 20.0, 120.0, 90.0], [5.0, 5.0, 6.0, 6.0]]), torch.zeros(0, 4)]

    pooled = heads.pooler(features, proposals)
    assert pooled.shape == (3, 128, 14, 14)
    assert heads.res5(pooled).shape == (3, 256, 7, 7)  # res5's first block has stride 2
    box_features = heads.box_features(features, proposals)
    assert box_features.shape == (3, 256)
    logits, deltas = heads.predictor(box_features)
    assert logits.shape == (3, 6) and deltas.shape == (3, 20)  # K+1 classes, 4K box coordinates

    with torch.no_grad():
        detections, losses = heads(features, proposals, [(96, 128), (80, 100)])
    assert losses == {}
    assert len(detections) == 2
    assert detections[1]["boxes"].shape == (0, 4) and detections[1]["scores"].shape == (0,)
    assert (detections[0]["labels"] < 5).all()
