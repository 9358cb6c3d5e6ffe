"""Speed, memory and FLOPs of a detector, measured as `tools/benchmark.py` reports them (docs/benchmarks.md).

Inference is timed on one image of the config's test size (INPUT.MIN_SIZE_TEST x INPUT.MAX_SIZE_TEST, e.g.
600 x 1000) with the config's test proposal count; training on SOLVER.IMS_PER_BATCH images of the training size with
a few boxes each, one full step (forward, backward, SGD). Each is run `warmup` times untimed, then `runs` times:
the median and the spread (fastest, slowest) are reported. FLOPs come from `torch.utils.flop_counter` per stage
(trunk, RPN, res5 head, box predictor; RoIAlign and NMS have no FLOP formula there and fall in "other", which is
then 0), and the FLOP/s reached is set beside that of a large 3x3 convolution timed in the same process, the
machine's practical peak for this kind of work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..evaluation.evaluator import synchronize_device
from .events import peak_memory_mb

# module paths of the stages inside FlopCounterMode's hierarchy (the model is FasterRCNN)
STAGES = {
    "trunk": "FasterRCNN.backbone",
    "rpn": "FasterRCNN.rpn",
    "res5_head": "FasterRCNN.roi_heads.res5",
    "box_predictor": "FasterRCNN.roi_heads.predictor",
}


def synthetic_inputs(
    *, num_images: int, height: int, width: int, num_boxes: int = 0, num_classes: int = 1, seed: int = 0
) -> list[dict]:
    """Model inputs of random uint8 (3, height, width) images, already at the model's input size; with `num_boxes`,
    also random ground-truth boxes (each side at least a tenth of the image) and classes for training."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(num_images):
        item = {
            "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
            "height": height,
            "width": width,
        }
        if num_boxes:
            corner = torch.rand(num_boxes, 2, generator=generator) * 0.6
            size = 0.1 + torch.rand(num_boxes, 2, generator=generator) * 0.3
            scale = torch.tensor([width, height], dtype=torch.float32)
            item["gt_boxes"] = torch.cat([corner * scale, (corner + size) * scale], dim=1)
            item["gt_classes"] = torch.randint(0, num_classes, (num_boxes,), generator=generator)
        inputs.append(item)
    return inputs


def time_runs(step: Callable[[], object], *, warmup: int, runs: int, device: torch.device) -> list[float]:
    """Seconds of each of `runs` calls of `step` after `warmup` untimed ones (CUDA synchronised around each)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(runs):
        synchronize_device(device)
        start = time.perf_counter()
        step()
        synchronize_device(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], *, images: int) -> dict:
    """{"seconds": [...], "median_s", "min_s", "max_s", "images_per_s"} of timed runs of `images` images each."""
    median = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "images_per_s": images / median,
    }


def stage_flops(step: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of `step` (which runs a FasterRCNN) per stage of `STAGES`, "other" (the rest) and
    "total"."""
    with FlopCounterMode(depth=None, display=False) as counter:
        step()
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    flops = {stage: int(counts.get(path, 0)) for stage, path in STAGES.items()}
    total = int(counter.get_total_flops())
    flops["other"] = total - sum(flops.values())
    flops["total"] = total
    return flops


def conv_reference(
    device: torch.device, *, channels: int = 256, size: int = 128, warmup: int = 2, runs: int = 5
) -> dict:
    """FLOP/s of a 3x3 convolution of `channels` to `channels` on a (1, channels, size, size) input with padding 1:
    2 * channels^2 * 9 * size^2 FLOPs (multiply and add), its median time over `runs`."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device).eval()
    x = torch.randn(1, channels, size, size, device=device)
    flops = 2 * channels * channels * 9 * size * size
    with torch.inference_mode():
        seconds = time_runs(lambda: conv(x), warmup=warmup, runs=runs, device=device)
    median = statistics.median(seconds)
    return {"shape": [1, channels, size, size], "flops": flops, "median_s": median, "flops_per_s": flops / median}


def benchmark_model(
    model: nn.Module,
    *,
    mode: str,
    inputs: list[dict],
    warmup: int,
    runs: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Times `model` on `inputs` ("infer": eval mode under inference_mode; "train": training steps with
    `optimizer`) and counts its FLOPs per stage; the result holds the timing summary, "peak_memory_mb" (the
    process's peak RSS on the CPU, the allocator's peak on CUDA), "flops" and "flops_per_s"."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "infer":
        model.eval()

        def step() -> object:
            with torch.inference_mode():
                return model(inputs)

    elif mode == "train":
        if optimizer is None:
            raise ValueError("mode 'train' needs an optimizer")
        model.train()

        def step() -> object:
            losses = model(inputs)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            return losses

    else:
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    result = summary(time_runs(step, warmup=warmup, runs=runs, device=device), images=len(inputs))
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["flops"] = stage_flops(step)
    result["flops_per_s"] = result["flops"]["total"] / result["median_s"]
    return result

