"""Resuming through tools/train_det.py loses nothing and repeats nothing: exact resume (workers on), a missing
`last_checkpoint` target, a diverged run, MAX_ITER below the checkpoint, and refusing to overwrite a run."""

import json
import sys
from pathlib import Path

import pytest
import torch

from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.checkpoint import non_finite_tensors
from detectron_res.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import train_det  # noqa: E402

LOSSES = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


@pytest.fixture(scope="module")
def shapes_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=12, num_val=2, image_size=96, seed=1)
    return f"{root}/annotations/instances_train.json:{root}/train"


def run(shapes_pair, out: Path, *extra: str, workers: int = 0) -> dict:
    """train_det on the tiny shapes set; `extra` may hold flags and overrides in any order (flags last here)."""
    args = [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out),
        "MODEL.DEVICE=cpu", f"DATASETS.TRAIN=[{shapes_pair}]", "DATASETS.TEST=[]", f"DATALOADER.NUM_WORKERS={workers}",
        "INPUT.MIN_SIZE_TRAIN=[80,96]", "INPUT.MAX_SIZE_TRAIN=96", "INPUT.HFLIP_PROB=0.5", "SOLVER.IMS_PER_BATCH=2",
        "SOLVER.WARMUP_ITERS=2", "SOLVER.STEPS=[8]", "SOLVER.CHECKPOINT_PERIOD=5", "LOG_PERIOD=1",
        *extra,
    ]  # fmt: skip
    return train_det.main(args)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses_by_iteration(out: Path) -> dict[int, dict]:
    """{iteration: {loss name: value}}, checking that no iteration's loss was logged twice."""
    records = [r for r in logged(out) if "total_loss" in r]
    iterations = [r["iteration"] for r in records]
    assert iterations == sorted(set(iterations)), f"iterations repeated or out of order: {iterations}"
    return {r["iteration"]: {k: r[k] for k in LOSSES} for r in records}


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one_with_workers(shapes_pair, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run(shapes_pair, straight, "SOLVER.MAX_ITER=20", workers=2)

    # 10 iterations, then --resume to 20 (a flag after the overrides), killed during iteration 18 ...
    resumed = tmp_path / "resumed"
    run(shapes_pair, resumed, "SOLVER.MAX_ITER=10", workers=2)
    original_run_step = Trainer.run_step

    def killed_at_18(self):
        if self.iter == 17:
            raise KeyboardInterrupt
        original_run_step(self)

    monkeypatch.setattr(Trainer, "run_step", killed_at_18)
    with pytest.raises(KeyboardInterrupt):
        run(shapes_pair, resumed, "SOLVER.MAX_ITER=20", "--resume", workers=2)
    assert max(r["iteration"] for r in logged(resumed)) == 17  # logged after the last checkpoint (15)
    # ... and resumed again from model_0000015.pth
    monkeypatch.setattr(Trainer, "run_step", original_run_step)
    run(shapes_pair, resumed, "--resume", "SOLVER.MAX_ITER=20", workers=2)
    assert "Resuming from" in (resumed / "log.txt").read_text().split("Starting training from iteration 15")[0]

    a, b = weights(straight / "model_final.pth"), weights(resumed / "model_final.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight_losses, resumed_losses = losses_by_iteration(straight), losses_by_iteration(resumed)
    assert list(resumed_losses) == list(range(1, 21))  # 16 and 17 were logged twice before the fix
    assert resumed_losses == straight_losses


def test_missing_pointer_target_falls_back_to_the_newest_checkpoint_and_overwrites_nothing(shapes_pair, tmp_path):
    out = tmp_path / "run"
    run(shapes_pair, out, "SOLVER.MAX_ITER=12", "SOLVER.CHECKPOINT_PERIOD=10")
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    (out / "model_final.pth").unlink()
    kept = (out / "model_0000010.pth").read_bytes()

    run(shapes_pair, out, "SOLVER.MAX_ITER=12", "SOLVER.CHECKPOINT_PERIOD=10", "--resume")
    log = (out / "log.txt").read_text()
    assert "names 'model_final.pth'; resuming from the newest usable checkpoint, model_0000010.pth" in log
    assert "Starting training from iteration 10 to 12" in log
    assert (out / "model_0000010.pth").read_bytes() == kept
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 12

    # without --resume the same folder is refused rather than overwritten from iteration 0
    with pytest.raises(ValueError, match=r"already holds checkpoints of another run \(model_final.pth, model_0000010.pth\)"):
        run(shapes_pair, out, "SOLVER.MAX_ITER=12", "SOLVER.CHECKPOINT_PERIOD=10")
    assert (out / "model_0000010.pth").read_bytes() == kept


def test_a_diverging_run_leaves_only_finite_checkpoints_and_resumes(shapes_pair, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError) as stopped:
        run(shapes_pair, out, "SOLVER.MAX_ITER=20", "SOLVER.CHECKPOINT_PERIOD=1", "SOLVER.BASE_LR=1000")
    newest = (out / "last_checkpoint").read_text()
    assert stopped.value.__notes__ == [
        f"The newest checkpoint, {out / newest}, was written before the failure and holds finite values; "
        "continue from it with --resume once the cause is fixed."
    ]
    checkpoints = sorted(out.glob("model_*.pth"))
    assert checkpoints and all(not non_finite_tensors(torch.load(p, weights_only=True)) for p in checkpoints)

    # the newest checkpoint is one --resume accepts (before, 17 non-finite BatchNorm variances made it fail)
    iteration = int(newest[len("model_") : -len(".pth")])
    run(shapes_pair, out, f"SOLVER.MAX_ITER={iteration}", "SOLVER.STEPS=[]", "SOLVER.BASE_LR=1000", "--resume")
    assert f"Resuming from {out / newest} at iteration {iteration}" in (out / "log.txt").read_text()


def test_resume_with_max_iter_below_the_checkpoint_stops_before_writing(shapes_pair, tmp_path):
    out = tmp_path / "run"
    run(shapes_pair, out, "SOLVER.MAX_ITER=10")
    final, config = (out / "model_final.pth").read_bytes(), (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"model_final.pth, is at iteration 10, beyond SOLVER.MAX_ITER=5\. Set SOLVER"):
        run(shapes_pair, out, "SOLVER.MAX_ITER=5", "SOLVER.STEPS=[]", "--resume")
    assert (out / "model_final.pth").read_bytes() == final
    assert (out / "config.yaml").read_text() == config
    assert "Ran -" not in (out / "log.txt").read_text()
