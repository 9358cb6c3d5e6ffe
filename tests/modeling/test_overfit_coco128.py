"""Overfitting a handful of real COCO images (../shared/data/coco128) with a narrow C4 model: the loss falls."""

from pathlib import Path

import torch

from detectron_res.config import get_default_config
from detectron_res.data import DatasetMapper, load_coco_json
from detectron_res.modeling import build_model

COCO128 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128"


def narrow_coco_config():
    cfg = get_default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 80
    cfg.MODEL.BACKBONE.DEPTH = 18
    cfg.MODEL.BACKBONE.WIDTH = 16
    cfg.MODEL.BACKBONE.NORM = "GN"
    cfg.MODEL.BACKBONE.GN_GROUPS = 8
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RPN.ANCHOR_SIZES = [32, 64, 128]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 128
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    return cfg


def test_loss_falls_on_four_real_coco_images(shared_data):
    shared_data("coco128")
    dataset = load_coco_json(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017", name="coco128")
    mapper = DatasetMapper(min_size=192, max_size=320, is_train=True)
    records = [r for r in dataset.records if r["annotations"]][:4]
    batch = [mapper(r) for r in records]
    assert all(len(x["gt_boxes"]) for x in batch)

    torch.manual_seed(0)
    model = build_model(narrow_coco_config()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(40):
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first = sum(sum(h.values()) for h in history[:5]) / 5
    last = sum(sum(h.values()) for h in history[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # both stages learn: the RPN's objectness and the RoI classifier
    assert history[-1]["loss_rpn_cls"] < 0.5 * history[0]["loss_rpn_cls"]
    assert history[-1]["loss_cls"] < 0.5 * history[0]["loss_cls"]
