"""Gradient accumulation (SOLVER.ACCUMULATE, Caffe's iter_size): k accumulated batches of 1 image make the same
optimizer step as one batch of k images, by hand on a toy loss and on a tiny detector whose losses are means over
the images (every image samples all its anchors and RoIs, so nothing random differs); the logged losses are the
steps' means; a resumed accumulating run repeats an uninterrupted one exactly; and the bad value is refused."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron_res.config import ConfigError
from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.solver import build_optimizer
from detectron_res.engine.trainer import Trainer
from detectron_res.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "modeling"))
sys.path.insert(0, str(REPO / "tools"))

import train_det  # noqa: E402
from test_detector import tiny_config  # noqa: E402


class MeanSquare(nn.Module):
    """loss = the mean over the batch's images of (w x - y)^2: a per-image mean, as the detector's losses are."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, batch):
        x = torch.tensor([item["x"] for item in batch])
        y = torch.tensor([item["y"] for item in batch])
        return {"loss": ((self.w * x - y) ** 2).mean()}


def train(model, batches, *, accumulate, max_iter, momentum=0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=0.0)
    trainer = Trainer(model=model, data_loader=batches, optimizer=optimizer, max_iter=max_iter, accumulate=accumulate)
    trainer.train()
    return trainer


def test_two_accumulated_images_step_as_one_batch_of_two_by_hand():
    images = [{"x": 1.0, "y": 0.0}, {"x": 2.0, "y": 0.0}]
    # loss w^2 x^2 per image, gradient 2 w x^2: 2 and 8, their mean 5 -> w = 1 - 0.1 * 5 = 0.5; the logged loss is
    # the mean of 1 and 4
    accumulated = MeanSquare()
    trainer = train(accumulated, iter([[images[0]], [images[1]]]), accumulate=2, max_iter=1)
    batched = MeanSquare()
    train(batched, iter([images]), accumulate=1, max_iter=1)
    assert accumulated.w.item() == pytest.approx(0.5) and batched.w.item() == pytest.approx(0.5)
    assert trainer.storage.latest("total_loss") == pytest.approx(2.5)


def test_accumulated_steps_match_batched_steps_with_momentum_over_several_iterations():
    images = [{"x": x, "y": y} for x, y in ((1.0, 2.0), (0.5, -1.0), (2.0, 1.0), (-1.0, 0.5), (1.5, 0.0), (0.2, 3.0))]
    accumulated, batched = MeanSquare(), MeanSquare()
    train(accumulated, iter([[image] for image in images]), accumulate=3, max_iter=2, momentum=0.9)
    train(batched, iter([images[:3], images[3:]]), accumulate=1, max_iter=2, momentum=0.9)
    torch.testing.assert_close(accumulated.w, batched.w)
    assert accumulated.w.item() != pytest.approx(1.0)


def same_size_images():
    """Two 64 x 96 images with two boxes each (so both sample as many RoIs)."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for boxes, classes in (([[8.0, 8.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]], [0, 1]),
                           ([[20.0, 10.0, 60.0, 50.0], [4.0, 30.0, 30.0, 62.0]], [1, 1])):
        image = torch.randint(0, 60, (3, 64, 96), dtype=torch.uint8, generator=generator)
        for (x1, y1, x2, y2), c in zip(boxes, classes):
            image[c, int(y1) : int(y2), int(x1) : int(x2)] = 230
        items.append({"image": image, "height": 64, "width": 96, "gt_boxes": torch.tensor(boxes),
                      "gt_classes": torch.tensor(classes)})
    return items


def test_a_detector_accumulating_two_images_steps_as_with_a_batch_of_two():
    """The RPN divides its sums by 256 x images; the Fast R-CNN losses average over the batch's sampled RoIs, which
    is the mean over the images when each samples as many. Here every anchor and RoI is sampled (256 anchors per
    image > the 4 x 6 x 6 there are; proposals without NMS, 16 + 2 per image, all sampled), so both runs see the
    same samples in another random order."""
    cfg = tiny_config()
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    cfg.MODEL.RPN.NMS_THRESH = 1.0
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 16
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    cfg.SOLVER.BASE_LR = 0.05
    torch.manual_seed(0)
    accumulated = build_model(cfg)
    batched = copy.deepcopy(accumulated)
    images = same_size_images()
    steps = {}
    for name, model, batches, k in (("accumulated", accumulated, [[images[0]], [images[1]]] * 2, 2),
                                    ("batched", batched, [images] * 2, 1)):
        trainer = Trainer(model=model, data_loader=iter(batches), optimizer=build_optimizer(cfg, model), max_iter=2,
                          accumulate=k)
        trainer.train()
        steps[name] = {key: [v for _, v in trainer.storage.history[key]] for key in ("total_loss", "loss_cls")}
    for name, value in steps["accumulated"].items():
        assert value == pytest.approx(steps["batched"][name], rel=1e-5), name
    for (name, a), b in zip(accumulated.named_parameters(), batched.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(0)
    initial = build_model(cfg)
    moved = sum(not torch.allclose(a, b) for a, b in zip(initial.parameters(), accumulated.parameters()))
    assert moved > 10  # the two steps changed the weights


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


def train_args(root: Path, out: Path, max_iter: int) -> list[str]:
    return [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{root}/annotations/instances_train.json:{root}/train]", "DATASETS.TEST=[]",
        "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[64]", "INPUT.MAX_SIZE_TRAIN=64",
        "SOLVER.IMS_PER_BATCH=1", "SOLVER.ACCUMULATE=2", f"SOLVER.MAX_ITER={max_iter}", "SOLVER.STEPS=[]",
        "SOLVER.WARMUP_ITERS=1", "SOLVER.CHECKPOINT_PERIOD=1", "LOG_PERIOD=1",
    ]  # fmt: skip


def test_a_resumed_accumulating_run_repeats_an_uninterrupted_one(tiny_shapes, tmp_path):
    """The loader resumes at 2 batches per iteration: same images, same draws, same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_det.main(train_args(tiny_shapes, straight, 2))
    train_det.main(train_args(tiny_shapes, resumed, 1))
    train_det.main([*train_args(tiny_shapes, resumed, 2), "--resume"])
    log = (straight / "log.txt").read_text()
    assert "the gradients of 2 batches summed per step (SOLVER.ACCUMULATE): 2 images per step" in log
    losses = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    straight_losses = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["total_loss"] for r in losses] == [r["total_loss"] for r in straight_losses]
    assert [r["iteration"] for r in losses] == [1, 2]
    assert "Starting training from iteration 1 to 2" in (resumed / "log.txt").read_text()
    a = torch.load(straight / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_accumulate_below_one_is_refused(tiny_shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"SOLVER\.ACCUMULATE=0"):
        train_det.main([*train_args(tiny_shapes, tmp_path / "x", 2), "SOLVER.ACCUMULATE=0"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="accumulate must be at least 1, got 0"):
        optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)
        Trainer(model=MeanSquare(), data_loader=iter([]), optimizer=optimizer, max_iter=1, accumulate=0)


class RecordsSync(MeanSquare):
    """Stands in for DistributedDataParallel: records whether each forward and backward ran inside `no_sync`."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.calls: list[bool] = []

    def no_sync(self):
        model = self

        class NoSync:
            def __enter__(self):
                model.inside = True

            def __exit__(self, *exc):
                model.inside = False

        return NoSync()

    def forward(self, batch):
        self.calls.append(self.inside)
        loss = super().forward(batch)["loss"]
        loss.register_hook(lambda grad: self.calls.append(self.inside) or grad)  # runs during the backward
        return {"loss": loss}


def test_under_ddp_only_the_last_batch_of_a_step_synchronises_its_gradients():
    model = RecordsSync()
    batches = iter([[{"x": 1.0, "y": 0.0}]] * 6)
    train(model, batches, accumulate=3, max_iter=2)
    # per step: forward, backward of batches 1 and 2 inside no_sync, batch 3's outside (its backward all-reduces)
    assert model.calls == [True, True, True, True, False, False] * 2
