"""tools/benchmark.py: timing summaries, FLOPs per stage against a count made by hand from the layers' shapes, the
reference convolution's FLOPs, and the tool's JSON."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron_res.config import load_config
from detectron_res.engine import benchmark as engine_benchmark
from detectron_res.engine import solver as engine_solver
from detectron_res.engine.benchmark import (
    StageTimer,
    conv_reference,
    stage_flops,
    summary,
    synthetic_inputs,
    time_runs,
    training_step,
    zero_init_residuals,
)
from detectron_res.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402

TINY = ["MODEL.DEVICE=cpu", "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96", "INPUT.MIN_SIZE_TRAIN=[64]",
        "INPUT.MAX_SIZE_TRAIN=96", "SOLVER.IMS_PER_BATCH=2"]  # fmt: skip


def test_summary_of_timed_runs():
    assert summary([0.5, 0.25, 1.0], images=2) == {
        "seconds": [0.5, 0.25, 1.0], "median_s": 0.5, "min_s": 0.25, "max_s": 1.0, "images_per_s": 4.0,
    }  # fmt: skip
    calls = []
    seconds = time_runs(lambda: calls.append(1), warmup=2, runs=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(seconds) == 3
    with pytest.raises(ValueError, match="runs >= 1"):
        time_runs(lambda: None, warmup=0, runs=0, device=torch.device("cpu"))


def test_the_stage_timer_sums_each_stage_over_its_calls(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(engine_benchmark.time, "perf_counter", lambda: clock["now"])

    class Takes(nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            clock["now"] += self.seconds
            return x

    model = nn.Module()
    model.head = nn.Module()
    model.trunk, model.head.box = Takes(2.0), Takes(3.0)

    def step():  # the trunk once, the head's box stage twice (as res5 runs on RoI chunks), 1 s elsewhere
        model.head.box(model.trunk(0))
        clock["now"] += 1.0
        return model.head.box(0)

    timer = StageTimer(model, {"trunk": "trunk", "box": "head.box"}, torch.device("cpu"))
    timed = timer.wrap(step)
    timed()
    clock["now"] += 100.0  # between runs: not counted
    model.head.box.seconds = 5.0
    timed()
    assert timer.runs == [{"trunk": 2.0, "box": 6.0, "total": 9.0}, {"trunk": 2.0, "box": 10.0, "total": 13.0}]
    assert timer.medians() == {"trunk": 2.0, "box": 8.0, "other": 1.0, "total": 11.0}
    timer.remove()
    timed()
    assert timer.runs[-1] == {"trunk": 0.0, "box": 0.0, "total": 13.0}  # no hooks any more


def test_the_reference_convolution_counts_two_flops_per_multiply_add():
    result = conv_reference(torch.device("cpu"), channels=8, size=4, warmup=0, runs=2)
    assert result["flops"] == 2 * 8 * 8 * 9 * 16 == 18432
    assert result["flops_per_s"] == result["flops"] / result["median_s"]


def hand_counted_flops(model: nn.Module, prefix: str, monkeypatch) -> tuple[dict, list]:
    """Adds 2 x (multiply-adds) of every Conv2d and Linear under `prefix` as they run: convolutions through
    `Conv2d._conv_forward` (also reached with a folded norm's weights), linear layers through forward hooks."""
    counted = {"flops": 0}
    convs = {id(m) for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.Conv2d)}
    conv_forward = nn.Conv2d._conv_forward

    def counting_conv_forward(module, input, weight, bias):  # noqa: A002 - torch's name
        output = conv_forward(module, input, weight, bias)
        if id(module) in convs:
            k_h, k_w = module.kernel_size
            weights = module.in_channels // module.groups * module.out_channels * k_h * k_w
            counted["flops"] += 2 * weights * output[:, 0].numel()  # each output position of each channel
        return output

    def linear(module, inputs, output):
        counted["flops"] += 2 * module.in_features * module.out_features * output.shape[0]

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counting_conv_forward)
    handles = [
        m.register_forward_hook(linear)
        for name, m in model.named_modules()
        if name.startswith(prefix) and isinstance(m, nn.Linear)
    ]
    assert convs or handles
    return counted, handles


@pytest.mark.parametrize(
    ("stage", "prefix"),
    [("trunk", "backbone"), ("rpn", "rpn"), ("res5_head", "roi_heads.res5"), ("box_predictor", "roi_heads.predictor")],
)
def test_stage_flops_equal_a_count_from_the_layer_shapes(stage, prefix, monkeypatch):
    cfg = load_config(REPO / "configs/shapes_r18.yaml", TINY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = synthetic_inputs(num_images=1, height=64, width=96)
    counted, handles = hand_counted_flops(model, prefix, monkeypatch)

    def step():
        with torch.inference_mode():
            return model(inputs)

    flops = stage_flops(step)
    for handle in handles:
        handle.remove()
    assert counted["flops"] > 0 and flops[stage] == counted["flops"]
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total") and flops["other"] == 0


def test_the_tool_writes_timings_memory_and_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--mode", "train", "--runs", "2",
                              "--warmup", "1", "--json-out", str(out), *TINY])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    ours = results["ours"]
    assert results["input"] == [2, 3, 64, 96] and len(ours["seconds"]) == 2
    assert ours["images_per_s"] == 2 / ours["median_s"] and ours["peak_memory_mb"] > 0
    assert results["accumulate"] == 1 and ours["images_per_run"] == 2
    assert ours["seconds_per_image"] == ours["median_s"] / 2
    assert ours["flops"]["res5_head"] > ours["flops"]["trunk"] > 0  # 32 RoIs x 2 images through res5
    assert ours["fraction_of_conv_flops_per_s"] == ours["flops_per_s"] / results["conv_reference"]["flops_per_s"]
    assert "GFLOP/s" in capsys.readouterr().out


def test_the_tool_compares_with_torchvision(tmp_path, capsys):
    out = tmp_path / "compare.json"
    results = benchmark.main(["--cfg", str(REPO / "configs/coco_r50.yaml"), "--compare", "torchvision", "--runs", "2",
                              "--warmup", "1", "--json-out", str(out), "MODEL.RPN.POST_NMS_TOPK_TEST=8",
                              *TINY])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    ours, theirs = results["ours"], results["torchvision"]
    assert len(ours["seconds"]) == len(theirs["seconds"]) == 2
    assert results["speedup"] == ours["images_per_s"] / theirs["images_per_s"]
    assert ours["peak_memory_mb"] > 0 and theirs["peak_memory_mb"] is None  # not separable in one process
    stages = ["trunk", "rpn", "roi_align", "res5_head", "box_predictor", "other", "total"]
    for result in (ours, theirs):  # every stage ran, and the stage timer's total is inside the tool's timing
        assert list(result["stage_seconds"]) == stages and min(result["stage_seconds"].values()) > 0
        assert result["stage_seconds"]["total"] <= result["max_s"]
    # the same architecture: the same FLOPs in every stage with a FLOP formula (the RoI counts may differ: the
    # RPNs' proposals are not identical)
    for stage in ("trunk", "rpn"):
        assert theirs["flops"][stage] == ours["flops"][stage] > 0
    printed = capsys.readouterr().out
    assert "torchvision: median" in printed and "speedup (our images/s over torchvision's)" in printed


def test_train_mode_without_flops():
    results = benchmark.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--mode", "train", "--runs", "1",
                              "--warmup", "0", "--no-flops", *TINY])  # fmt: skip
    assert "flops" not in results["ours"] and "fraction_of_conv_flops_per_s" not in results["ours"]
    assert results["ours"]["peak_memory_mb"] > 0


def test_a_training_step_steps_once_on_the_mean_gradient_of_its_passes():
    weight = nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    xs = iter([2.0, 4.0, 10.0])

    def call():  # loss = w * x: its gradient is x, 2 then 4
        return {"loss": (weight * next(xs)).sum()}

    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(weight.grad.item()))
    training_step(call, optimizer, accumulate=2)()
    # one step on the mean gradient (2 + 4) / 2 = 3 at learning rate 1: w = 1 - 3
    assert steps == [3.0] and weight.item() == -2.0
    training_step(call, optimizer)()  # accumulate 1: the gradient 10 alone (the previous one cleared)
    assert steps == [3.0, 10.0] and weight.item() == -12.0
    with pytest.raises(ValueError, match="SOLVER.ACCUMULATE.*got 0"):
        training_step(call, optimizer, accumulate=0)


def test_train_mode_times_accumulate_passes_and_one_step_per_iteration(monkeypatch, capsys):
    events = []

    def spied_model(cfg):  # each forward pass and each backward pass (through the class scores' weight) recorded
        model = build_model(cfg)
        model.register_forward_hook(lambda *args: events.append("forward"))
        model.roi_heads.predictor.cls_score.weight.register_post_accumulate_grad_hook(
            lambda p: events.append("backward"))
        return model

    def spied_optimizer(cfg, model):
        optimizer = engine_solver.build_optimizer(cfg, model)
        optimizer.register_step_post_hook(lambda *args: events.append("step"))
        return optimizer

    monkeypatch.setattr(benchmark, "build_model", spied_model)
    monkeypatch.setattr(benchmark, "build_optimizer", spied_optimizer)
    results = benchmark.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--mode", "train", "--runs", "2",
                              "--warmup", "1", "--no-flops", *TINY, "SOLVER.ACCUMULATE=2"])  # fmt: skip
    # 1 warm-up + 2 timed iterations, each 2 passes of 2 images then one optimizer step
    assert events == ["forward", "backward", "forward", "backward", "step"] * 3
    ours = results["ours"]
    assert results["input"] == [2, 3, 64, 96] and results["accumulate"] == 2 and len(ours["seconds"]) == 2
    assert ours["images_per_run"] == 4  # IMS_PER_BATCH 2 x ACCUMULATE 2
    assert ours["seconds_per_image"] == ours["median_s"] / 4 and ours["images_per_s"] == 4 / ours["median_s"]
    printed = capsys.readouterr().out
    assert "input 2x3x64x96 x 2 passes per iteration" in printed and "s per iteration" in printed
    assert "s per image (4 per run)" in printed


def test_zero_init_residuals_keeps_a_deep_random_trunk_finite():
    overrides = ["MODEL.DEVICE=cpu", "MODEL.RPN.POST_NMS_TOPK_TEST=50", "INPUT.MIN_SIZE_TEST=128",
                 "INPUT.MAX_SIZE_TEST=192"]  # fmt: skip
    cfg = load_config(REPO / "configs/coco_r101.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert zero_init_residuals(model) == 3 + 4 + 23 + 3  # every block of the trunk and of res5
    assert model.roi_heads.res5[2].bn3.weight.abs().sum() == 0 and model.backbone.layer3[5].bn3.weight.sum() == 0
    inputs = synthetic_inputs(num_images=1, height=128, width=192)
    with torch.inference_mode():
        prepared = model.prepare(inputs)
        assert prepared.features.abs().max() < 100  # without it: about 1e5
        assert len(model.propose(prepared)[0]) == 50


def test_loader_throughput_times_only_the_batches_after_the_warm_up(monkeypatch):
    """A fake loader whose batches take 1, 2, 3, ... s on a fake clock: warm-up batches 1-2 (2 and 3 images) are
    not counted; batches 3-5 hold 1, 2 and 3 images and take 3 + 4 + 5 = 12 s: 6 images / 12 s = 0.5 images/s."""
    clock = {"now": 0.0}
    monkeypatch.setattr(engine_benchmark.time, "perf_counter", lambda: clock["now"])

    def loader():
        for number, size in enumerate([2, 3, 1, 2, 3, 4], start=1):
            clock["now"] += number
            yield list(range(size))

    measured = engine_benchmark.loader_throughput(loader(), warmup=2, batches=3)
    assert measured["images"] == 6 and measured["seconds"] == 12.0 and measured["images_per_s"] == 0.5
    assert measured["batch_wait"]["seconds"] == [3.0, 4.0, 5.0] and measured["batch_wait"]["median_s"] == 4.0
    with pytest.raises(ValueError, match="batches >= 1"):
        engine_benchmark.loader_throughput(loader(), warmup=0, batches=0)


def test_data_mode_times_the_training_loader_for_each_worker_count(tmp_path, capsys):
    from detectron_res.data.datasets import generate_shapes

    generate_shapes(tmp_path / "shapes", num_train=12, num_val=1, image_size=64, seed=1)
    train = f"{tmp_path}/shapes/annotations/instances_train.json:{tmp_path}/shapes/train"
    results = benchmark.main([
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--mode", "data", "--workers", "0,2", "--runs", "3",
        "--warmup", "1", f"DATASETS.TRAIN=[{train}]", "SOLVER.IMS_PER_BATCH=2", "--json-out", str(tmp_path / "d.json"),
    ])  # fmt: skip
    assert list(results["workers"]) == ["0", "2"] and results["images_in_dataset"] == 12
    for count, measured in results["workers"].items():
        assert measured["images"] == 6  # 3 timed batches of 2
        assert measured["per_worker"] == pytest.approx(measured["images_per_s"] / max(int(count), 1))
    assert json.loads((tmp_path / "d.json").read_text())["workers"]["2"]["images"] == 6
    assert "2 workers: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="--workers must be a comma-separated list of worker counts, got 'two'"):
        benchmark.main(["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--mode", "data", "--workers", "two"])
