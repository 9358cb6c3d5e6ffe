"""Speed, memory and FLOPs of a detector, measured as `tools/benchmark.py` reports them (docs/benchmarks.md).

Inference is timed on one image of the config's test size (INPUT.MIN_SIZE_TEST x INPUT.MAX_SIZE_TEST, e.g.
600 x 1000) with the config's test proposal count; training on SOLVER.IMS_PER_BATCH images of the training size with
a few boxes each, one training iteration (SOLVER.ACCUMULATE forward and backward passes, then one SGD step). Each is
run `warmup` times untimed, then `runs` times: the median and the spread (fastest, slowest) are reported, and the
seconds per image (the median over the images of a run: IMS_PER_BATCH x ACCUMULATE in training). FLOPs come from
`torch.utils.flop_counter` per stage (trunk, RPN, res5 head, box predictor; RoIAlign and NMS have no FLOP formula
there and fall in "other", which is then 0), and the FLOP/s reached is set beside that of a large 3x3 convolution
timed in the same process, the machine's practical peak for this kind of work.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..evaluation.evaluator import synchronize_device
from ..modeling.backbone.resnet import BasicBlock, Bottleneck
from .events import peak_memory_mb

# module paths of the stages inside FlopCounterMode's hierarchy (both detectors' classes are named FasterRCNN)
STAGES = {
    "trunk": "FasterRCNN.backbone",
    "rpn": "FasterRCNN.rpn",
    "res5_head": "FasterRCNN.roi_heads.res5",
    "box_predictor": "FasterRCNN.roi_heads.predictor",
}
TORCHVISION_STAGES = {
    "trunk": "FasterRCNN.backbone",
    "rpn": "FasterRCNN.rpn",
    "res5_head": "FasterRCNN.roi_heads.box_head",
    "box_predictor": "FasterRCNN.roi_heads.box_predictor",
}
# the modules whose forward calls are timed (`StageTimer`), by their paths inside each detector
TIMED_STAGES = {
    "trunk": "backbone",
    "rpn": "rpn",
    "roi_align": "roi_heads.pooler",
    "res5_head": "roi_heads.res5",
    "box_predictor": "roi_heads.predictor",
}
TORCHVISION_TIMED_STAGES = {
    "trunk": "backbone",
    "rpn": "rpn",
    "roi_align": "roi_heads.box_roi_pool",
    "res5_head": "roi_heads.box_head",
    "box_predictor": "roi_heads.box_predictor",
}
DETECTRON2_TIMED_STAGES = {
    "trunk": "backbone",
    "rpn": "proposal_generator",
    "roi_align": "roi_heads.pooler",
    "res5_head": "roi_heads.res5",
    "box_predictor": "roi_heads.box_predictor",
}
DETECTRON2_STAGES = {
    "trunk": "GeneralizedRCNN.backbone",
    "rpn": "GeneralizedRCNN.proposal_generator",
    "res5_head": "GeneralizedRCNN.roi_heads.res5",
    "box_predictor": "GeneralizedRCNN.roi_heads.box_predictor",
}


def zero_init_residuals(model: nn.Module) -> int:
    """Sets the scale of the last norm of every residual block to 0 (torchvision's `zero_init_residual`), so that
    each block starts as its shortcut: a deep random trunk's activations then stay of the input's order (a random
    R101 reaches 1e5 at res4 otherwise, and its RPN's boxes leave the image), while every layer does the same work.
    Returns the number of blocks changed."""
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    with torch.no_grad():
        for block in blocks:
            (block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight.zero_()
    return len(blocks)


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


def loader_throughput(loader: Iterable[list[dict]], *, warmup: int, batches: int) -> dict:
    """Images per second that a training data loader delivers with nothing consuming them (decode, resize, flip,
    batch): `warmup` batches untimed (the workers start and fill their prefetch queues), then `batches` timed in one
    stretch. Returns {"images", "seconds", "images_per_s", "batch_wait": `summary` of the wait for each batch}."""
    if batches < 1 or warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got batches={batches}, warmup={warmup}")
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    waits, images = [], 0
    start = time.perf_counter()
    for _ in range(batches):
        before = time.perf_counter()
        images += len(next(iterator))
        waits.append(time.perf_counter() - before)
    seconds = time.perf_counter() - start
    del iterator  # its workers stop here, not when the caller's next loader starts
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "batch_wait": summary(waits, images=images // batches)}


def stage_flops(step: Callable[[], object], stages: dict[str, str] = STAGES) -> dict[str, int]:
    """FLOPs of one call of `step` (which runs a FasterRCNN) per stage of `stages` (name: module path), "other"
    (the rest) and "total"."""
    with FlopCounterMode(depth=None, display=False) as counter:
        step()
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    flops = {stage: int(counts.get(path, 0)) for stage, path in stages.items()}
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


def training_step(
    call: Callable[[], dict[str, Tensor]], optimizer: torch.optim.Optimizer, *, accumulate: int = 1
) -> Callable[[], object]:
    """One training iteration of a model whose `call()` returns its losses, as `Trainer.run_step` does it (which
    cannot be reused here: it pulls its batches from a data loader and calls an `nn.Module` on one argument, where
    the compared detectors take other arguments): `accumulate` forward and backward passes (SOLVER.ACCUMULATE), each
    loss divided by `accumulate` so that the gradients summed are their mean, then one optimizer step. Not
    included: the trainer's loss logging and finiteness check, its hooks, AMP and gradient clipping. Returns the last
    pass's losses."""
    if accumulate < 1:
        raise ValueError(f"accumulate (SOLVER.ACCUMULATE) must be at least 1, got {accumulate}")

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            losses = call()
            total = sum(losses.values())
            if accumulate > 1:
                total = total / accumulate
            total.backward()
        optimizer.step()
        return losses

    return step


class Candidate(NamedTuple):
    """A model to time: `call()` runs `module` once on its inputs (`images` of them); `stages` maps stage names to
    module paths for `stage_flops`; `optimizer` steps it in train mode; `timed_stages` maps stage names to the paths
    of submodules of `module` whose forward calls `StageTimer` times."""

    module: nn.Module
    call: Callable[[], object]
    images: int
    stages: dict[str, str]
    optimizer: torch.optim.Optimizer | None = None
    timed_stages: dict[str, str] | None = None


class StageTimer:
    """Seconds spent in the forward calls of some submodules (stage name: path inside `module`), summed over each
    call of the step that `wrap` returns, by forward pre- and post-hooks (CUDA synchronised in each). Backward
    passes and whatever runs outside those modules (pre- and post-processing, the losses, backward, the optimizer)
    are the "other" of `medians`."""

    def __init__(self, module: nn.Module, stages: dict[str, str], device: torch.device):
        self.stages, self.device = stages, device
        self.current: dict[str, float] = {}
        self.runs: list[dict[str, float]] = []
        self.handles = []
        for name, path in stages.items():
            submodule = module.get_submodule(path)
            self.handles.append(submodule.register_forward_pre_hook(self._start(name)))
            self.handles.append(submodule.register_forward_hook(self._stop(name)))
        self.started: dict[str, float] = {}

    def _start(self, name: str) -> Callable:
        def hook(module, inputs):
            synchronize_device(self.device)
            self.started[name] = time.perf_counter()

        return hook

    def _stop(self, name: str) -> Callable:
        def hook(module, inputs, output):
            synchronize_device(self.device)
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - self.started.pop(name)

        return hook

    def wrap(self, step: Callable[[], object]) -> Callable[[], object]:
        """`step`, recording its stages' seconds and its total in `runs`."""

        def timed() -> object:
            self.current = {name: 0.0 for name in self.stages}
            start = time.perf_counter()
            result = step()
            synchronize_device(self.device)
            self.runs.append({**self.current, "total": time.perf_counter() - start})
            return result

        return timed

    def medians(self) -> dict[str, float]:
        """Per stage, "other" (the total less the stages) and "total": the median over the recorded runs."""
        rows = [{**run, "other": run["total"] - sum(run[name] for name in self.stages)} for run in self.runs]
        return {key: statistics.median(row[key] for row in rows) for key in [*self.stages, "other", "total"]}

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self.handles:
            handle.remove()


def benchmark_models(
    candidates: dict[str, Candidate], *, mode: str, warmup: int, runs: int, count_flops: bool = True,
    accumulate: int = 1,
) -> dict[str, dict]:
    """Times each candidate in "infer" mode (eval, under inference_mode) or "train" mode (`training_step`: one
    training iteration per run, `accumulate` forward/backward passes of the candidate's `images` and one optimizer
    step); with several, their timed runs alternate (A, B, A, B, ...).

    Returns per name the timing summary of the runs ("median_s" etc.: seconds of one run, i.e. in train mode of one
    iteration), "images_per_run" (in train mode `images` x `accumulate`), "seconds_per_image" (the median over
    them; "images_per_s" is its inverse), "peak_memory_mb", for a candidate with `timed_stages` "stage_seconds" (the
    medians over the timed runs of `StageTimer`: the forward passes of its stages, and "other") and, with
    `count_flops`, "flops" (per stage) and "flops_per_s"; stage seconds and FLOPs are of a whole run (in train mode
    summed over its passes). Peak memory: on CUDA the allocator's peak during that
    model's warm-up; on the CPU the process's peak RSS, known for the first candidate only (after its warm-up, run
    before any other; None for the others, which share its process).
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if mode == "infer" and accumulate != 1:
        raise ValueError(f"accumulate applies to mode 'train' only, got {accumulate} in mode 'infer'")
    steps = {}
    for name, candidate in candidates.items():
        if mode == "infer":
            candidate.module.eval()
            steps[name] = _in_inference_mode(candidate.call)
        else:
            if candidate.optimizer is None:
                raise ValueError(f"mode 'train' needs an optimizer for {name!r}")
            candidate.module.train()
            steps[name] = training_step(candidate.call, candidate.optimizer, accumulate=accumulate)
    device = next(next(iter(candidates.values())).module.parameters()).device
    peaks: dict[str, float | None] = {}
    for index, (name, step) in enumerate(steps.items()):  # warm-up, one model after the other
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        peaks[name] = peak_memory_mb(device) if device.type == "cuda" or index == 0 else None
    timers = {
        name: StageTimer(candidate.module, candidate.timed_stages, device)
        for name, candidate in candidates.items()
        if candidate.timed_stages
    }
    timed_steps = {name: timers[name].wrap(step) if name in timers else step for name, step in steps.items()}
    seconds = time_alternating(timed_steps, warmup=0, runs=runs, device=device)
    for timer in timers.values():
        timer.remove()
    if len(steps) == 1 and device.type == "cpu":  # alone in the process: its peak includes the timed runs
        (only,) = steps
        peaks[only] = peak_memory_mb(device)
    results = {}
    for name, candidate in candidates.items():
        images = candidate.images * accumulate  # per run: in train mode, every pass of the iteration
        result = summary(seconds[name], images=images)
        result["images_per_run"] = images
        result["seconds_per_image"] = result["median_s"] / images
        result["peak_memory_mb"] = peaks[name]
        if name in timers:
            result["stage_seconds"] = timers[name].medians()
        if count_flops:
            result["flops"] = stage_flops(steps[name], candidate.stages)
            result["flops_per_s"] = result["flops"]["total"] / result["median_s"]
        results[name] = result
    return results


def _in_inference_mode(call: Callable[[], object]) -> Callable[[], object]:
    def step() -> object:
        with torch.inference_mode():
            return call()

    return step


def torchvision_equivalent(model: nn.Module, *, min_size: int, max_size: int) -> nn.Module:
    """The same C4 detector built from `torchvision.models.detection.FasterRCNN`, as a torchvision user would build
    it, with `model`'s weights copied in: torchvision's ResNet (conv1..layer3 as the backbone, layer4 + average
    pooling as the box head, FrozenBatchNorm2d, the same frozen stages), its RPNHead, a 14 x 14 `MultiScaleRoIAlign`
    (adaptive sampling), FastRCNNPredictor, and `model`'s anchors (the same cell anchors on the same grid),
    proposal counts, IoU thresholds, box coder weights, score and NMS thresholds. Its transform normalises 0-1
    images with the same mean and std at the `min_size` / `max_size` of the config and pads to the same multiple.

    Class order: ours has background last, torchvision first (its box regressor also predicts a box for
    background, given zero weights here). Not identical to ours in the details torchvision does not expose:
    RoIAlign's half-pixel alignment, the RPN's minimum proposal size (0.001) and its training-time sampling."""
    from torchvision.models import resnet as torchvision_resnet
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    trunk, rpn, heads = model.backbone, model.rpn, model.roi_heads
    predictor = heads.predictor
    depth = {6: 50, 23: 101, 36: 152}.get(len(trunk.layer3))
    if depth is None or trunk.conv1.out_channels != 64 or heads.global_context:
        raise ValueError("the torchvision comparison needs a standard-width ResNet-50/101/152 C4 model without "
                         "global context")  # fmt: skip
    resnet = getattr(torchvision_resnet, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {k: v for k, v in trunk.state_dict().items()}
    state.update({f"layer4.{k}": v for k, v in heads.res5.state_dict().items()})
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise ValueError(f"torchvision ResNet-{depth} does not take the model's weights: missing {missing}, "
                         f"unexpected {unexpected}")  # fmt: skip
    for name, parameter in trunk.named_parameters():  # the same frozen stages
        resnet.get_parameter(name).requires_grad_(parameter.requires_grad)
    backbone = nn.Sequential(*[getattr(resnet, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                            "layer3")])  # fmt: skip
    backbone.out_channels = trunk.out_channels
    anchor_generator = AnchorGenerator(sizes=((128,),), aspect_ratios=((1.0,),))
    anchor_generator.cell_anchors = [rpn.anchor_generator.cell_anchors.clone()]  # ours, in our order
    rpn_head = RPNHead(trunk.out_channels, rpn.anchor_generator.num_anchors)
    rpn_head.conv[0][0].load_state_dict(rpn.head.conv.state_dict())
    rpn_head.cls_logits.load_state_dict(rpn.head.objectness_logits.state_dict())
    rpn_head.bbox_pred.load_state_dict(rpn.head.anchor_deltas.state_dict())
    box_predictor = FastRCNNPredictor(predictor.cls_score.in_features, predictor.num_classes + 1)
    with torch.no_grad():  # background: ours last, torchvision's first
        order = torch.cat([torch.tensor([predictor.num_classes]), torch.arange(predictor.num_classes)])
        box_predictor.cls_score.weight.copy_(predictor.cls_score.weight[order])
        box_predictor.cls_score.bias.copy_(predictor.cls_score.bias[order])
        box_predictor.bbox_pred.weight.zero_()
        box_predictor.bbox_pred.bias.zero_()
        box_predictor.bbox_pred.weight[4:].copy_(predictor.bbox_pred.weight)
        box_predictor.bbox_pred.bias[4:].copy_(predictor.bbox_pred.bias)
    detector = TorchvisionFasterRCNN(
        backbone,
        min_size=min_size,
        max_size=max_size,
        image_mean=(model.pixel_mean.flatten() / 255).tolist(),
        image_std=(model.pixel_std.flatten() / 255).tolist(),
        size_divisible=model.size_divisibility,
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk[0],
        rpn_pre_nms_top_n_test=rpn.pre_nms_topk[1],
        rpn_post_nms_top_n_train=rpn.post_nms_topk[0],
        rpn_post_nms_top_n_test=rpn.post_nms_topk[1],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.matcher.low_threshold,
        rpn_batch_size_per_image=rpn.sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.sampler.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(
            ["0"], output_size=heads.pooler.output_size, sampling_ratio=heads.pooler.sampling_ratio
        ),
        box_head=nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        box_predictor=box_predictor,
        box_score_thresh=predictor.score_thresh,
        box_nms_thresh=predictor.nms_thresh,
        box_detections_per_img=predictor.detections_per_image,
        box_fg_iou_thresh=heads.fg_iou_thresh,
        box_bg_iou_thresh=heads.fg_iou_thresh,
        box_batch_size_per_image=heads.sampler.batch_size_per_image,
        box_positive_fraction=heads.sampler.positive_fraction,
        bbox_reg_weights=predictor.box_coder.weights,
    )
    detector.rpn.box_coder = type(detector.rpn.box_coder)(rpn.box_coder.weights)
    return detector.to(model.device)


def torchvision_inputs(inputs: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict] | None]:
    """Our model inputs as torchvision's detector takes them: 0-1 float images, and in training targets whose
    labels are 1..K (0 is background there)."""
    images = [x["image"].to(device).float() / 255 for x in inputs]
    if "gt_boxes" not in inputs[0]:
        return images, None
    targets = [{"boxes": x["gt_boxes"].to(device), "labels": x["gt_classes"].to(device) + 1} for x in inputs]
    return images, targets


def time_alternating(
    steps: dict[str, Callable[[], object]], *, warmup: int, runs: int, device: torch.device
) -> dict[str, list[float]]:
    """`time_runs` of several steps in turn (A, B, A, B, ...), so that both see the same machine state."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            seconds[name] += time_runs(step, warmup=0, runs=1, device=device)
    return seconds


def import_detectron2() -> tuple[Callable, Callable]:
    """detectron2's `get_cfg` and `build_model`, or ValueError with one line saying why detectron2 is not
    importable (it is never a requirement of detectron_res: `--compare detectron2` takes it from the environment,
    e.g. its source on PYTHONPATH; docs/benchmarks.md)."""
    try:
        with warnings.catch_warnings():  # its imports warn about torch.jit.script on recent torch
            warnings.simplefilter("ignore")
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
    except ImportError as error:
        raise ValueError(
            f"detectron2 is not importable ({error}): install it, or put its source folder (the clone of "
            "github.com/facebookresearch/detectron2) and its Python dependencies on PYTHONPATH"
        ) from error
    return get_cfg, build_model


def detectron2_config_problem(cfg) -> str | None:
    """Why detectron2's GeneralizedRCNN cannot be configured as our `cfg`'s detector (the first key at fault, with
    its value), or None."""
    model, rpn, heads, test = cfg.MODEL, cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS, cfg.TEST
    problems = {
        "MODEL.META_ARCHITECTURE": (model.META_ARCHITECTURE, model.META_ARCHITECTURE == "FasterRCNN"),
        "MODEL.BACKBONE.DEPTH": (model.BACKBONE.DEPTH, model.BACKBONE.DEPTH in (50, 101, 152)),
        "MODEL.BACKBONE.WIDTH": (model.BACKBONE.WIDTH, model.BACKBONE.WIDTH == 64),
        "MODEL.BACKBONE.NORM": (model.BACKBONE.NORM, model.BACKBONE.NORM == "FrozenBN"),
        "MODEL.RPN.MIN_SIZE": (rpn.MIN_SIZE, rpn.MIN_SIZE == 0),
        "MODEL.ROI_HEADS.POOLER": (heads.POOLER, heads.POOLER == "ROIAlign"),
        "MODEL.ROI_HEADS.BG_IOU_THRESH_LO": (heads.BG_IOU_THRESH_LO, heads.BG_IOU_THRESH_LO == 0),
        "MODEL.ROI_HEADS.GLOBAL_CONTEXT": (heads.GLOBAL_CONTEXT, not heads.GLOBAL_CONTEXT),
        "INPUT.SIZE_DIVISIBILITY": (cfg.INPUT.SIZE_DIVISIBILITY, cfg.INPUT.SIZE_DIVISIBILITY in (0, 1)),
        "TEST.AMP.ENABLED": (test.AMP.ENABLED, not test.AMP.ENABLED),
        "TEST.BOX_REFINEMENT.ENABLED": (test.BOX_REFINEMENT.ENABLED, not test.BOX_REFINEMENT.ENABLED),
        "TEST.BOX_VOTING.ENABLED": (test.BOX_VOTING.ENABLED, not test.BOX_VOTING.ENABLED),
        "TEST.MULTI_SCALE.ENABLED": (test.MULTI_SCALE.ENABLED, not test.MULTI_SCALE.ENABLED),
        "TEST.FLIP": (test.FLIP, not test.FLIP),
    }
    for key, (value, expressible) in problems.items():
        if not expressible:
            return (f"{key}={value} has no equivalent in detectron2's R-CNN C4 (a config that it can express: "
                    "configs/d2_r50_c4.yaml, d2_r101_c4.yaml)")
    return None


def detectron2_equivalent(model: nn.Module, cfg) -> nn.Module:
    """detectron2's GeneralizedRCNN with Res5ROIHeads (its R50-C4 config, Base-RCNN-C4.yaml, with `cfg`'s depth,
    anchors, proposal counts, IoU thresholds, sampling, box coder weights, losses' betas, score and NMS thresholds
    and detections per image), built by detectron2's own `build_model`, with `model`'s weights copied in (our names
    mapped to detectron2's by `weight_formats.detectron2_name`, the inverse of reading a detectron2 checkpoint;
    every one of its tensors is filled). Its images are in `cfg.INPUT.FORMAT`'s channel order (`detectron2_inputs`).

    Raises:
        ValueError: detectron2 not importable, or a `cfg` key detectron2 cannot express (named).
    """
    from ..modeling.weight_formats import detectron2_name

    get_cfg, build_detectron2 = import_detectron2()
    problem = detectron2_config_problem(cfg)
    if problem:
        raise ValueError(problem)
    rpn, heads = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    d2 = get_cfg()
    d2.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"  # Base-RCNN-C4.yaml and faster_rcnn_R_50_C4_*.yaml
    d2.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    d2.MODEL.MASK_ON = False
    d2.MODEL.WEIGHTS = ""
    d2.MODEL.DEVICE = str(model.device)
    d2.MODEL.PIXEL_MEAN = list(cfg.MODEL.PIXEL_MEAN)
    d2.MODEL.PIXEL_STD = list(cfg.MODEL.PIXEL_STD)
    d2.INPUT.FORMAT = cfg.INPUT.FORMAT
    d2.MODEL.BACKBONE.FREEZE_AT = cfg.MODEL.BACKBONE.FREEZE_AT
    d2.MODEL.RESNETS.DEPTH = cfg.MODEL.BACKBONE.DEPTH
    d2.MODEL.RESNETS.NORM = "FrozenBN"
    d2.MODEL.RESNETS.STRIDE_IN_1X1 = cfg.MODEL.BACKBONE.STRIDE_IN_1X1
    d2.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    d2.MODEL.ANCHOR_GENERATOR.SIZES = [list(rpn.ANCHOR_SIZES)]
    d2.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(rpn.ASPECT_RATIOS)]
    d2.MODEL.ANCHOR_GENERATOR.OFFSET = rpn.ANCHOR_OFFSET
    d2.MODEL.RPN.IN_FEATURES = ["res4"]
    d2.MODEL.RPN.CONV_DIMS = [rpn.HEAD_CHANNELS or -1]
    d2.MODEL.RPN.IOU_THRESHOLDS = [rpn.NEGATIVE_IOU, rpn.POSITIVE_IOU]
    d2.MODEL.RPN.BOUNDARY_THRESH = rpn.BOUNDARY_THRESH
    d2.MODEL.RPN.BATCH_SIZE_PER_IMAGE = rpn.BATCH_SIZE_PER_IMAGE
    d2.MODEL.RPN.POSITIVE_FRACTION = rpn.POSITIVE_FRACTION
    d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN, d2.MODEL.RPN.POST_NMS_TOPK_TRAIN = rpn.PRE_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TRAIN
    d2.MODEL.RPN.PRE_NMS_TOPK_TEST, d2.MODEL.RPN.POST_NMS_TOPK_TEST = rpn.PRE_NMS_TOPK_TEST, rpn.POST_NMS_TOPK_TEST
    d2.MODEL.RPN.NMS_THRESH = rpn.NMS_THRESH
    d2.MODEL.RPN.BBOX_REG_WEIGHTS = list(rpn.BBOX_REG_WEIGHTS)
    d2.MODEL.RPN.SMOOTH_L1_BETA = rpn.SMOOTH_L1_BETA
    d2.MODEL.RPN.LOSS_WEIGHT = rpn.LOSS_WEIGHT
    d2.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.NUM_CLASSES
    d2.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    d2.MODEL.ROI_HEADS.IOU_THRESHOLDS = [heads.FG_IOU_THRESH]
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = heads.BATCH_SIZE_PER_IMAGE
    d2.MODEL.ROI_HEADS.POSITIVE_FRACTION = heads.POSITIVE_FRACTION
    d2.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = heads.PROPOSAL_APPEND_GT
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = heads.SCORE_THRESH_TEST
    d2.MODEL.ROI_HEADS.NMS_THRESH_TEST = heads.NMS_THRESH_TEST
    d2.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2" if heads.POOLER_ALIGNED else "ROIAlign"
    d2.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = heads.POOLER_RESOLUTION
    d2.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = heads.POOLER_SAMPLING_RATIO
    d2.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = list(heads.BBOX_REG_WEIGHTS)
    d2.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = heads.SMOOTH_L1_BETA
    d2.TEST.DETECTIONS_PER_IMAGE = heads.DETECTIONS_PER_IMAGE
    d2.freeze()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = build_detectron2(d2)
    ours = model.state_dict()
    theirs = detector.state_dict()
    unmapped = [key for key in theirs if detectron2_name(key) not in ours]
    if unmapped:
        raise ValueError(f"detectron2's model has {len(unmapped)} tensors without a counterpart in ours: "
                         f"{', '.join(unmapped[:5])}")  # fmt: skip
    detector.load_state_dict({key: ours[detectron2_name(key)] for key in theirs})
    return detector.to(model.device)


def detectron2_inputs(inputs: list[dict], *, input_format: str) -> list[dict]:
    """Our model inputs (RGB uint8 images) as detectron2's GeneralizedRCNN takes them: images in `input_format`'s
    channel order, and in training the boxes and classes (0..K-1 in both) as its "instances"."""
    from detectron2.structures import Boxes, Instances

    converted = []
    for x in inputs:
        image = x["image"].flip(0).contiguous() if input_format == "BGR" else x["image"]
        item = {"image": image, "height": x["height"], "width": x["width"]}
        if "gt_boxes" in x:
            instances = Instances(tuple(image.shape[1:]))
            instances.gt_boxes = Boxes(x["gt_boxes"].clone())
            instances.gt_classes = x["gt_classes"].clone()
            item["instances"] = instances
        converted.append(item)
    return converted


def detectron2_call(detector: nn.Module, inputs: list[dict]) -> Callable[[], object]:
    """`detector(inputs)`; in training inside the EventStorage that detectron2's heads log to."""
    from detectron2.utils.events import EventStorage

    def call() -> object:
        if not detector.training:
            return detector(inputs)
        with EventStorage():
            return detector(inputs)

    return call


def synthetic_coco_evaluation(
    *, num_images: int = 5000, boxes_per_image: float = 7.0, detections_per_image: int = 100, num_classes: int = 80,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """A COCO ground truth and results of COCO val2017's size (5,000 images of 640 x 480, a Poisson number of boxes,
    ~7 on average, over 80 classes, sizes spread over COCO's small, medium and large) and `detections_per_image`
    detections per image: each ground-truth box found with its corners jittered by up to ~15 % of its size (and at
    times the wrong class), the rest random boxes, all with random scores. What COCOeval's time depends on (images,
    boxes and detections per image and class) is as on COCO; the AP itself means nothing."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images = [{"id": index + 1, "width": width, "height": height, "file_name": f"{index + 1:012d}.jpg"}
              for index in range(num_images)]  # fmt: skip
    categories = [{"id": index + 1, "name": f"class_{index + 1}"} for index in range(num_classes)]
    annotations: list[dict] = []
    results: list[dict] = []
    for image in images:
        count = int(rng.poisson(boxes_per_image))
        sides = np.exp(rng.uniform(np.log(8), np.log(400), size=(count, 2)))  # small to large boxes
        corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - np.minimum(sides, [width - 1, height - 1]))
        boxes = np.concatenate([corners, np.minimum(sides, [width - 1, height - 1])], axis=1)  # x, y, w, h
        labels = rng.integers(1, num_classes + 1, size=count)
        for box, label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(label),
                                "bbox": box.round(2).tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})  # fmt: skip
        found = boxes + rng.uniform(-0.15, 0.15, size=boxes.shape) * np.repeat(boxes[:, 2:], 2, axis=1)
        found_labels = np.where(rng.uniform(size=count) < 0.1, rng.integers(1, num_classes + 1, size=count), labels)
        extra = detections_per_image - count
        random_sides = np.exp(rng.uniform(np.log(8), np.log(400), size=(extra, 2)))
        random_boxes = np.concatenate([rng.uniform(0, 1, size=(extra, 2)) * [width, height], random_sides], axis=1)
        all_boxes = np.concatenate([found, random_boxes])[:detections_per_image]
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], 1.0)
        all_labels = np.concatenate([found_labels, rng.integers(1, num_classes + 1, size=extra)])[:detections_per_image]
        scores = rng.uniform(0.05, 1.0, size=len(all_boxes)).round(5)
        results.extend({"image_id": image["id"], "category_id": int(label), "bbox": box.round(2).tolist(),
                        "score": float(score)} for box, label, score in zip(all_boxes, all_labels, scores))  # fmt: skip
    return {"images": images, "categories": categories, "annotations": annotations}, results


def coco_eval_times(gt: dict, results: list[dict], *, backends: Iterable[str], runs: int = 3) -> dict:
    """Seconds of `evaluate_coco_results` (loading the results, COCOeval's evaluate, accumulate and summarize) with
    each backend, timed in turn (A, B, A, B, ...) in this process on the same in-memory ground truth (loaded once,
    outside the timing) and results; with the metrics of each backend's last run and the largest difference of any
    metric between the backends (percent points), so that the timing is only reported next to equal numbers."""
    from ..evaluation.coco import evaluate_coco_results, load_coco_ground_truth

    backends = list(backends)
    coco_gt = load_coco_ground_truth(gt)
    metrics: dict[str, dict] = {}

    def step(backend: str) -> Callable[[], object]:
        def run() -> None:
            metrics[backend] = evaluate_coco_results(coco_gt, results, backend=backend)["bbox"]
        return run

    seconds = time_alternating({name: step(name) for name in backends}, warmup=0, runs=runs,
                               device=torch.device("cpu"))  # fmt: skip
    timed = {name: {"seconds": values, "median_s": statistics.median(values)} for name, values in seconds.items()}
    first = metrics[backends[0]]
    difference = max(
        (abs((value or 0.0) - (metrics[name][key] or 0.0)) for name in backends[1:] for key, value in first.items()),
        default=0.0,
    )
    return {"images": len(gt["images"]), "annotations": len(gt["annotations"]), "detections": len(results),
            "backends": timed, "max_metric_difference": difference,
            "AP": {name: metrics[name]["AP"] for name in backends}}  # fmt: skip
