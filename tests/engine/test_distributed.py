"""Distributed training and inference on 2 CPU processes (gloo), started through the package's launcher (the same
elastic agent torchrun runs): DDP gradients equal one process's on the same images, sharded inference equals one
process's detections and metrics, a resumed 2-process run repeats an uninterrupted one bit for bit, and a failing
rank brings the job down with its own error."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from detectron_res.config import load_config
from detectron_res.data.datasets import generate_loc_shapes, generate_shapes
from detectron_res.engine.launch import DistributedJobError, launch
from detectron_res.engine.runner import wrap_distributed
from detectron_res.layers.norm import SyncBatchNorm
from detectron_res.modeling import build_model
from detectron_res.utils import comm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import test_det  # noqa: E402
import train_det  # noqa: E402
import train_loc  # noqa: E402

LOSSES = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Each worker gets one thread (what `launch` gives 2 processes on 2 cores) and so does the single-process
    reference, so that both sum in the same order."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=12, num_val=5, image_size=96, seed=1)
    return {
        "train": f"{root}/annotations/instances_train.json:{root}/train",
        "val": f"{root}/annotations/instances_val.json:{root}/val",
        "root": root,
    }


# -- acceptance 1: one DDP step on 2 x 1 images gives one process's gradients on the 2 images -------------------

# Every anchor and every RoI is a training sample (batch sizes above their counts, all foreground RoIs kept), and
# both images get the same number of RoIs (20 proposals + 2 ground-truth boxes), so that the losses' normalisers
# (sampled anchors / RoIs of the batch, as in detectron2) split evenly over the two processes.
GRADIENT_OVERRIDES = [
    "MODEL.DEVICE=cpu", "MODEL.BACKBONE.FREEZE_AT=0",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE=1000", "MODEL.RPN.POST_NMS_TOPK_TRAIN=20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=64", "MODEL.ROI_HEADS.POSITIVE_FRACTION=1.0",
]  # fmt: skip


def two_images() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    boxes = [torch.tensor([[8.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 88.0]]),
             torch.tensor([[20.0, 5.0, 70.0, 45.0], [4.0, 50.0, 44.0, 94.0]])]  # fmt: skip
    return [
        {"image": torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=generator), "height": 96,
         "width": 96, "gt_boxes": image_boxes, "gt_classes": torch.tensor([0, 2 - i])}
        for i, image_boxes in enumerate(boxes)
    ]  # fmt: skip


def gradient_model(norm: str):
    """The model in float64: in float32 the rounding of 2 processes' SyncBN reductions against 1 process's differs
    by up to 1e-3 of the largest gradient on some CPUs (seen on one CI machine, not another), in float64 by 1e-12."""
    cfg = load_config(REPO / "configs/shapes_r18.yaml", [*GRADIENT_OVERRIDES, f"MODEL.BACKBONE.NORM={norm}"])
    torch.manual_seed(0)
    return build_model(cfg).double().train(), cfg


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def ddp_step(argv: list[str]) -> dict:
    """Worker: rank r trains on image r through DistributedDataParallel (argv: [norm])."""
    comm.init_distributed(backend="gloo")
    model, cfg = gradient_model(argv[0])
    wrapped = wrap_distributed(model, cfg)  # kept alive through backward: its reducer averages the gradients
    losses = wrapped([two_images()[comm.get_rank()]])
    sum(losses.values()).backward()
    buffers = {name: b.clone().numpy() for name, b in model.named_buffers()}
    return {"rank": comm.get_rank(), "world_size": comm.get_world_size(), "buffers": buffers,
            "grads": {name: grad.numpy() for name, grad in gradients(model).items()},
            "cumulative": cumulative_statistics(SyncBatchNorm, comm.get_rank())}  # fmt: skip


def cumulative_statistics(norm, rank: int | None) -> list:
    """A BatchNorm with a cumulative average (momentum None) after two steps on 1 x 3 x 1 x 1 inputs per rank (both
    ranks' for rank None): few values, so that the unbiased variance's n / (n - 1) matters."""
    x = torch.tensor([[1.0, -2.0, 4.0], [3.0, 0.0, 5.0]]).view(2, 3, 1, 1)
    layer = norm(3, momentum=None).train()
    for step in (1.0, 2.0):
        layer(step * (x if rank is None else x[rank : rank + 1]))
    return [layer.running_mean.clone().numpy(), layer.running_var.clone().numpy(), int(layer.num_batches_tracked)]


@pytest.mark.parametrize(
    ("norm", "num_weights"),
    [("FrozenBN", 30), ("SyncBN", 70)],  # SyncBN: the 2 processes' BatchNorm statistics are those of both images
)
def test_a_ddp_step_on_two_processes_gives_the_gradients_of_one_process_on_both_images(norm, num_weights):
    results = launch(ddp_step, [norm], num_processes=2)
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]

    model, _ = gradient_model(norm)
    sum(model(two_images()).values()).backward()
    expected = gradients(model)
    assert len(expected) == len(list(model.parameters())) == num_weights  # every weight trains (FREEZE_AT=0)
    for result in results:
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(torch.from_numpy(result["grads"][name]), grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, buffer in model.named_buffers():  # SyncBN: the running statistics of a BN on both images
            torch.testing.assert_close(torch.from_numpy(result["buffers"][name]), buffer, rtol=1e-5, atol=1e-7)
        mean, var, steps = result["cumulative"]
        # by hand: step 1 has means (2, -1, 4.5) and unbiased variances (2, 2, 0.5), step 2 twice the means and
        # four times the variances; the cumulative average of the two steps: (3, -1.5, 6.75) and (5, 5, 1.25)
        assert steps == 2
        torch.testing.assert_close(torch.from_numpy(mean), torch.tensor([3.0, -1.5, 6.75]))
        torch.testing.assert_close(torch.from_numpy(var), torch.tensor([5.0, 5.0, 1.25]))
        expected_mean, expected_var, _ = cumulative_statistics(torch.nn.BatchNorm2d, None)
        assert (mean == expected_mean).all() and (var == expected_var).all()  # and so does torch's BatchNorm

    # without DDP's averaging each process would hold its own image's gradient, far from the mean
    if norm == "SyncBN":
        return
    model.zero_grad()
    sum(model(two_images()[:1]).values()).backward()
    assert not torch.allclose(gradients(model)["rpn.head.conv.weight"], expected["rpn.head.conv.weight"], rtol=1e-2)


# -- acceptance 2: inference over 2 processes gives one process's detections and metrics ---------------------------


def test_inference_over_two_processes_equals_one_process(shapes, tmp_path):
    cfg = load_config(REPO / "configs/shapes_r18.yaml", ["MODEL.DEVICE=cpu"])
    torch.manual_seed(5)
    weights = tmp_path / "random.pth"
    torch.save(build_model(cfg).state_dict(), weights)
    args = [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "MODEL.DEVICE=cpu", f"MODEL.WEIGHTS={weights}",
        f"DATASETS.TEST=[{shapes['val']}]", "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TEST=96",
        "INPUT.MAX_SIZE_TEST=96", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
    ]  # fmt: skip
    single = test_det.main([*args, "--output", str(tmp_path / "single")])
    double = test_det.main([*args, "--output", str(tmp_path / "double"), "--num-gpus", "2"])

    def detections(run: str) -> list[dict]:
        return json.loads((tmp_path / run / "inference/instances_val/coco_instances_results.json").read_text())

    assert len(detections("single")) > 100  # 5 images (3 on rank 0, 2 on rank 1), a random model's many boxes
    assert detections("double") == detections("single")  # the same floats, the same order
    assert double == single
    assert json.loads((tmp_path / "double/metrics.json").read_text()) == json.loads(
        (tmp_path / "single/metrics.json").read_text()
    )


# -- acceptance 3: a 2-process run stopped and resumed repeats an uninterrupted one -------------------------------


def train_args(shapes, out: Path, *extra: str) -> list[str]:
    return [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{shapes['train']}]", "DATASETS.TEST=[]", "DATALOADER.NUM_WORKERS=0",
        "INPUT.MIN_SIZE_TRAIN=[80,96]", "INPUT.MAX_SIZE_TRAIN=96", "INPUT.HFLIP_PROB=0.5", "SOLVER.IMS_PER_BATCH=4",
        "SOLVER.WARMUP_ITERS=2", "SOLVER.STEPS=[3]", "SOLVER.CHECKPOINT_PERIOD=4", "LOG_PERIOD=1",
        "DISTRIBUTED.TIMEOUT=120", *extra,
    ]  # fmt: skip


def logged_losses(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in records] == sorted({r["iteration"] for r in records})
    return {r["iteration"]: {k: r[k] for k in LOSSES} for r in records}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_a_resumed_two_process_run_repeats_an_uninterrupted_one_exactly(shapes, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_det.main([*train_args(shapes, straight, "SOLVER.MAX_ITER=10"), "--num-gpus", "2"])
    train_det.main([*train_args(shapes, resumed, "SOLVER.MAX_ITER=4"), "--num-gpus", "2"])
    state = torch.load(resumed / "model_final.pth", weights_only=True)["trainer"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # the ranks draw differently
    train_det.main([*train_args(shapes, resumed, "SOLVER.MAX_ITER=10"), "--resume", "--num-gpus", "2"])

    log = (resumed / "log.txt").read_text()
    assert "Training on 2 processes: global batch 4 images (SOLVER.IMS_PER_BATCH), 2 per process, base LR 0.02" in log
    assert "Resuming from" in log and "Starting training from iteration 4 to 10" in log
    straight_losses, resumed_losses = logged_losses(straight), logged_losses(resumed)
    assert list(resumed_losses) == list(range(1, 11))
    assert resumed_losses == straight_losses
    a, b = weights(straight / "model_final.pth"), weights(resumed / "model_final.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(resumed.glob("log.txt.rank*"))  # rank 1 logged no warning


def test_a_resume_on_another_world_size_says_so_and_goes_on(shapes, tmp_path):
    out = tmp_path / "run"
    train_det.main([*train_args(shapes, out, "SOLVER.MAX_ITER=4"), "--num-gpus", "2"])
    train_det.main([*train_args(shapes, out, "SOLVER.MAX_ITER=6"), "--resume"])  # 2 processes -> 1
    log = (out / "log.txt").read_text()
    assert (
        "The checkpoint was written by a run of 2 processes, this one has 1: training goes on with the new sharding "
        "from the same place in the data, but its random draws differ from an uninterrupted run's"
    ) in log
    assert "Training on 1 process: global batch 4 images (SOLVER.IMS_PER_BATCH), 4 per process" in log
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert state["iteration"] == 6 and state["trainer"]["world_size"] == len(state["trainer"]["rng"]) == 1

    train_det.main([*train_args(shapes, out, "SOLVER.MAX_ITER=8"), "--resume", "--num-gpus", "2"])  # 1 -> 2
    assert "this one has 2" in (out / "log.txt").read_text()
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 8


def test_both_localization_stages_train_and_evaluate_on_two_processes(tmp_path):
    root = tmp_path / "loc"
    generate_loc_shapes(root, num_train=10, num_val=4, seed=3)
    out = tmp_path / "out"
    results = launch(train_loc.main, [
        "--cfg", str(REPO / "configs/loc_shapes_r18.yaml"), "MODEL.DEVICE=cpu", "DATALOADER.NUM_WORKERS=0",
        "MODEL.RPN.POST_NMS_TOPK_TEST=4", f"OUTPUT_DIR={out}",
        f"DATASETS.TRAIN=[{root}/LOC_train_solution.csv:{root}/train]",
        f"DATASETS.TEST=[{root}/LOC_val_solution.csv:{root}/val]", "SOLVER.IMS_PER_BATCH=4", "SOLVER.MAX_ITER=3",
        "SOLVER.STEPS=[]", "LOC.RCNN.IMS_PER_BATCH=4", "LOC.RCNN.MAX_ITER=3", "LOC.RCNN.STEPS=[]",
    ], num_processes=2)  # fmt: skip
    assert results[0] == results[1]  # rank 0 evaluated, rank 1 got its metrics
    assert results[0]["rcnn"] == json.loads((out / "rcnn/metrics.json").read_text())
    assert results[0]["rcnn"]["loc_oracle"]["num_images"] == 4
    assert (out / "rpn/model_final.pth").is_file() and (out / "rcnn/model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    assert log.count("Training on 2 processes: global batch 4 images (SOLVER.IMS_PER_BATCH), 2 per process") == 1
    assert log.count("Training on 2 processes: global batch 4 RoIs (LOC.RCNN.IMS_PER_BATCH), 2 per process") == 1


# -- failures -----------------------------------------------------------------------------------------------------


def first_training_image_of_rank(shapes, rank: int) -> Path:
    """The file of the first image the given rank trains on (the shared order's place `rank`, see TrainingSampler)."""
    from detectron_res.data.samplers import TrainingSampler

    annotations = json.loads((shapes["root"] / "annotations/instances_train.json").read_text())
    index = next(iter(TrainingSampler(len(annotations["images"]), seed=0, rank=rank, world_size=2)))
    return shapes["root"] / "train" / annotations["images"][index]["file_name"]


def test_a_failing_rank_stops_the_job_with_its_own_error(shapes, tmp_path):
    copy = tmp_path / "shapes"
    import shutil

    shutil.copytree(shapes["root"], copy)
    broken = dict(shapes, root=copy, train=shapes["train"].replace(str(shapes["root"]), str(copy)))
    corrupt = first_training_image_of_rank(broken, rank=1)
    corrupt.write_bytes(b"not a PNG")
    with pytest.raises(DistributedJobError) as failed:
        train_det.main([*train_args(broken, tmp_path / "out", "SOLVER.MAX_ITER=4"), "--num-gpus", "2"])
    message = str(failed.value)
    assert message.startswith("rank 1 of 2 failed (exit code 1): ")
    assert "BadImageError" in message and str(corrupt) in message
    assert not list((tmp_path / "out").glob("model_*.pth"))


def test_tool_options_are_refused_before_any_process_trains(shapes, tmp_path):
    with pytest.raises(DistributedJobError, match=r"SOLVER.IMS_PER_BATCH=3 is not divisible by the 2 processes"):
        train_det.main([*train_args(shapes, tmp_path / "odd", "SOLVER.MAX_ITER=3", "SOLVER.IMS_PER_BATCH=3"),
                        "--num-gpus", "2"])  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_on_cuda_with_float16_and_bfloat16(shapes, tmp_path, caplog):
    for dtype in ("float16", "bfloat16"):
        out = tmp_path / dtype
        with caplog.at_level(logging.INFO):
            train_det.main(train_args(shapes, out, "MODEL.DEVICE=cuda", "SOLVER.MAX_ITER=6", "SOLVER.AMP.ENABLED=true",
                                      f"SOLVER.AMP.DTYPE={dtype}"))  # fmt: skip
        state = torch.load(out / "model_final.pth", weights_only=True)
        assert ("grad_scaler" in state["trainer"]) == (dtype == "float16")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
