#!/usr/bin/env python
"""Check and measure detectron_res on a CUDA GPU in one command of at most a few minutes, keeping what it measured.

    python tools/gpu_check.py --output gpu_check            # on a machine with CUDA: about 8 minutes at most
    python tools/gpu_check.py --dry-run --output /tmp/gc    # the same steps with the CPU in place of CUDA, tiny sizes
    python tools/gpu_check.py --output gpu_check --steps benchmark,export --budget-s 300

A GPU is often lent for minutes: every step below is run in turn, each within what is left of `--budget-s`
(default 480 s). A step whose usual duration (`Step.estimate_s`) no longer fits is "skipped" with the reason; a step
still running when the budget ends is stopped (SIGALRM) and "skipped" with the values it had measured; a step that
raises is "failed" with its one-line error, and the others go on. After every step `OUTPUT/gpu_check.json`
(`{"device", "torch", ..., "steps": [{"name", "status": "ok" | "failed" | "skipped", "seconds", ...}]}`) and
`OUTPUT/gpu_check.md` (one row per step) are rewritten atomically, so an interrupted run (Ctrl-C, SIGTERM: exit
status 130 or 143) or a machine taken back keeps what was measured. The exit status is 1 when a step failed.

Steps (docs/benchmarks.md, "The GPU check", states their tolerances):
  cuda_vs_cpu  R50-C4 (configs/coco_r50.yaml, random seeded weights, the RPN's and box predictor's last layers
               spread by `calibrate_heads`), one 600 x 1000 image: res4 features,
               proposals and detections on CUDA against the CPU's with the same weights, in strict float32 (TF32
               off), and the res4 features with torch's default TF32 convolutions.
  train_step   R50-C4 training steps (2 images, 4 boxes each) through `engine.trainer.Trainer`: 3 in float32 and
               bfloat16, 6 in float16 autocast with its GradScaler (`engine.runner.amp_settings`): finite losses,
               the scaler's scale, whether each optimizer step was taken.
  syncbn       A 1-process NCCL group (a FileStore): MODEL.BACKBONE.NORM=SyncBN converted to torch's
               `nn.SyncBatchNorm` in DistributedDataParallel, one training step against the same model with plain
               BatchNorm (losses, gradients, running statistics); torch's fused SyncBN kernels (the autograd function
               that `nn.SyncBatchNorm` calls with several processes) against `F.batch_norm` on one layer's input.
  cuda_tests   `pytest -m cuda` (the tests that need CUDA) on the test files that mention `mark.cuda`, in a
               subprocess with a time limit: passed, failed and skipped counts (OUTPUT/cuda_tests.log and .xml).
  benchmark    Images/s and peak memory (`torch.cuda.max_memory_allocated`) of R50-C4 and R101-C4
               (configs/d2_r50_c4.yaml, d2_r101_c4.yaml: detectron2's setup, 800 x 1067 images): inference in
               float32 and bfloat16 (`engine.benchmark.benchmark_models`), training steps (2 images) in float32 and
               float16 AMP through the Trainer.
  export       `engine.export`: the R50-C4 inference path traced to TorchScript on CUDA, run, and compared with the
               eager model on two image sizes (the tolerances of tools/export.py).

`--dry-run` runs the same steps on the CPU ("cpu" where "cuda" stands, the CPU against itself) with a narrow
ResNet-18 (configs/shapes_r18.yaml; a narrow ResNet-34 for R101) on 64 x 96 images with few RoIs, gloo in place of
NCCL, one thread, in under a minute; without it and without CUDA the tool stops with one line. Before anything
runs, `--output`'s files are checked against what the tool reads (utils.paths.check_tool_paths).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detectron_res.config import config_files, load_config, merge_overrides
from detectron_res.engine.benchmark import (
    STAGES,
    TIMED_STAGES,
    Candidate,
    benchmark_models,
    synthetic_inputs,
    zero_init_residuals,
)
from detectron_res.engine.export import (
    ExportableDetector,
    compare_detections,
    detections_agree,
    eager_detections,
    export_torchscript,
)
from detectron_res.engine.runner import amp_settings, run_tool
from detectron_res.engine.solver import build_optimizer
from detectron_res.engine.trainer import HookBase, Trainer
from detectron_res.evaluation.evaluator import synchronize_device
from detectron_res.layers.norm import SyncBatchNorm
from detectron_res.modeling import build_model
from detectron_res.utils import atomic_write_text
from detectron_res.utils.paths import check_tool_paths, check_writable
from detectron_res.utils.signals import interruption_name

REPO = Path(__file__).resolve().parents[1]
JSON_FILE = "gpu_check.json"
MARKDOWN_FILE = "gpu_check.md"
TESTS_LOG = "cuda_tests.log"
TESTS_XML = "cuda_tests.xml"
DEFAULT_BUDGET_S = 480.0

# Tolerances (docs/benchmarks.md). CUDA against the CPU in strict float32: the same arithmetic in another order.
FEATURES_REL_TOL = 1e-4  # ||res4_cuda - res4_cpu|| / ||res4_cpu||
FEATURES_TF32_REL_TOL = 1e-2  # the same with torch's default TF32 convolutions (10-bit mantissa products)
MATCH_IOU = 0.99  # a box matches when its IoU with the other device's box (same class for detections) is this high
PROPOSALS_TOPK = 100
PROPOSALS_MIN_OVERLAP = 0.95  # share of the CPU's top-k proposals matched among CUDA's top-k
DETECTIONS_MIN_MATCHED = 0.95  # matched pairs over the larger detection count
DETECTIONS_BOX_TOL = 0.05  # pixels, the largest coordinate difference of a matched pair
DETECTIONS_SCORE_TOL = 1e-3
# One process: SyncBN converted to torch's layer in DistributedDataParallel against plain BatchNorm.
SYNCBN_LOSS_REL_TOL = 1e-4
SYNCBN_GRAD_REL_TOL = 1e-3  # ||g_sync - g_bn|| / ||g_bn|| over all parameters (atomic adds in the backward)
SYNCBN_STATS_REL_TOL = 1e-4
SYNCBN_FUSED_REL_TOL = 1e-4  # the fused kernels' output and gradients against F.batch_norm's
# The export against the eager model on the same device: tools/export.py's check.
EXPORT_BOX_TOL = 0.01
EXPORT_SCORE_TOL = 1e-4
CUDA_TESTS_LIMIT_S = 180.0  # the pytest subprocess's time limit (less when less of the budget is left)
TRAIN_ITERATIONS = 3  # train_step: per precision
FLOAT16_ITERATIONS = 6  # float16 with its GradScaler, which skips the steps whose gradients overflow at first

TINY_OVERRIDES = [  # --dry-run: a narrow ResNet-18 C4 on 64 x 96 images with few RoIs and proposals
    "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96", "INPUT.MIN_SIZE_TRAIN=[64]", "INPUT.MAX_SIZE_TRAIN=96",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=16", "MODEL.RPN.PRE_NMS_TOPK_TEST=300", "MODEL.RPN.POST_NMS_TOPK_TEST=50",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN=300", "MODEL.RPN.POST_NMS_TOPK_TRAIN=100", "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=50",
    "TEST.MULTI_SCALE.ENABLED=false",
]  # fmt: skip


class CheckFailed(RuntimeError):
    """A step ran but a measured value is outside its tolerance (the message names each)."""


class BudgetExceeded(BaseException):
    """The time budget ended during a step (raised by SIGALRM). A BaseException, so that no `except Exception` in
    the code the step runs can swallow it."""


# ------------------------------------------------------------------------------------------------------ set-up
class Budget:
    """Seconds left of `total_s` from the moment it is made (time.monotonic)."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    @contextlib.contextmanager
    def alarm(self) -> Iterator[None]:
        """Raises BudgetExceeded in the main thread when the budget ends inside the block (elsewhere the block runs
        without a deadline: only the main thread may take signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        left = self.remaining()
        if left <= 0:
            raise BudgetExceeded()

        def ring(signum: int, frame: object) -> None:
            raise BudgetExceeded()

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


class Context:
    """What the steps share: the device checked ("cuda", or the CPU in a dry run), the reference CPU, the output
    folder, the time budget, the test paths of the cuda tests, and which configs the models come from."""

    def __init__(self, *, device: torch.device, dry_run: bool, output: Path, budget: Budget, tests: list[str],
                 seed: int = 0):  # fmt: skip
        self.device, self.dry_run, self.output, self.budget, self.tests, self.seed = (
            device, dry_run, output, budget, tests, seed)

    @property
    def cpu(self) -> torch.device:
        return torch.device("cpu")

    def config(self, name: str, *overrides: str):
        """The config of a model the steps use: "r50" (the check's R50-C4 at 600 x 1000), "bench_r50" or
        "bench_r101" (detectron2's setup), with `overrides`; a dry run's narrow ResNet-18/34 at 64 x 96."""
        file, base = CONFIGS[name][1 if self.dry_run else 0]
        return load_config(REPO / file, [*base, *overrides, f"SEED={self.seed}"])

    def image_size(self, name: str) -> tuple[int, int]:
        cfg = self.config(name)
        if name == "r50":
            return cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        return cfg.INPUT.MIN_SIZE_TEST, round(cfg.INPUT.MIN_SIZE_TEST * 4 / 3)  # a 4:3 COCO photo at the test size


CONFIGS = {  # name: ((file, overrides) with CUDA, (file, overrides) in a dry run)
    "r50": (("configs/coco_r50.yaml", ["SOLVER.IMS_PER_BATCH=2", "INPUT.MIN_SIZE_TRAIN=[600]"]),
            ("configs/shapes_r18.yaml", [*TINY_OVERRIDES, "SOLVER.IMS_PER_BATCH=2"])),
    "bench_r50": (("configs/d2_r50_c4.yaml", ["SOLVER.IMS_PER_BATCH=2"]),
                  ("configs/shapes_r18.yaml", [*TINY_OVERRIDES, "SOLVER.IMS_PER_BATCH=2"])),
    "bench_r101": (("configs/d2_r101_c4.yaml", ["SOLVER.IMS_PER_BATCH=2"]),
                   ("configs/shapes_r18.yaml", [*TINY_OVERRIDES, "SOLVER.IMS_PER_BATCH=2", "MODEL.BACKBONE.DEPTH=34"])),
}  # fmt: skip


def random_detector(cfg, device: torch.device, *, seed: int) -> nn.Module:
    """The config's detector built for `device` (MODEL.DEVICE: the settings a user of that device gets, e.g.
    channels-last and chunked RoIs on the CPU only) with random seeded weights, each residual block starting as its
    shortcut (`zero_init_residuals`: a deep random trunk keeps finite activations, and every layer does its work)."""
    torch.manual_seed(seed)
    model = build_model(merge_overrides(cfg, [f"MODEL.DEVICE={device}"]))
    zero_init_residuals(model)
    return model


CALIBRATION = {"objectness_logits": 2.0, "anchor_deltas": 0.1, "cls_score": 2.0, "bbox_pred": 0.5}


def calibrate_heads(model: nn.Module, inputs: list[dict], *, seed: int, rois: int = 32) -> None:
    """Re-draws (seeded) the last layers of the RPN (objectness, anchor deltas) and of the box predictor (class
    scores, box deltas) so that on `inputs` their outputs vary from cell to cell and from RoI to RoI with the
    standard deviations of `CALIBRATION` (in logits; deltas before the box coder's weights): each weight row is
    N(0, 1) times scale / sqrt(the summed variance of the layer's inputs), and the bias cancels the inputs' mean.
    With random weights (std 0.01), every RPN score and class probability is nearly the same, so the order of
    proposals and detections, which the CUDA-versus-CPU and export checks compare, would be decided by rounding;
    calibrated, the scores differ by far more than float rounding and a few RoIs score above the test threshold."""
    rpn_head, predictor = model.rpn.head, model.roi_heads.predictor
    layers = {"objectness_logits": rpn_head.objectness_logits, "anchor_deltas": rpn_head.anchor_deltas,
              "cls_score": predictor.cls_score, "bbox_pred": predictor.bbox_pred}  # fmt: skip
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            seen[name] = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x  # (samples, channels)

        return hook

    generator = torch.Generator().manual_seed(seed)

    def redraw(names: tuple[str, ...], x: Tensor) -> None:
        x = x.cpu()
        mean, spread = x.mean(dim=0), x.var(dim=0).sum().sqrt().clamp(min=1e-6)
        for name in names:
            layer = layers[name]
            weight = torch.randn(layer.weight.shape, generator=generator) * CALIBRATION[name] / spread
            layer.weight.copy_(weight.to(layer.weight))
            layer.bias.copy_((-weight.flatten(1) @ mean).to(layer.bias))

    with torch.no_grad():
        prepared = model.prepare(inputs)
        handle = rpn_head.objectness_logits.register_forward_pre_hook(keep("rpn"))
        model.propose(prepared)
        handle.remove()
        redraw(("objectness_logits", "anchor_deltas"), seen["rpn"])
        proposals = model.propose(prepared)  # the calibrated RPN's, on which the box predictor is calibrated
        handle = predictor.cls_score.register_forward_pre_hook(keep("box"))
        model.detection_candidates(inputs, prepared, [p[:rois] for p in proposals])
        handle.remove()
        redraw(("cls_score", "bbox_pred"), seen["box"])


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def strict_float32() -> Iterator[dict]:
    """CUDA's float32 convolutions and matrix products without TF32 inside the block (torch's default lets cuDNN's
    convolutions use TF32 on Ampere and later GPUs); yields the settings found, restored afterwards."""
    found = float32_precision()
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield found
        finally:
            conv.fp32_precision, matmul.fp32_precision = found["cudnn_conv"], found["cuda_matmul"]
    else:  # torch before the fp32_precision settings
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield found
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = found["cudnn_conv"], found["cuda_matmul"]


def float32_precision() -> dict:
    """torch's settings of CUDA float32 arithmetic: {"cudnn_conv", "cuda_matmul"}, "tf32"/"ieee"/"none" (or
    True/False for TF32 allowed, before torch had fp32_precision)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):
        return {"cudnn_conv": conv.fp32_precision, "cuda_matmul": matmul.fp32_precision}
    return {"cudnn_conv": torch.backends.cudnn.allow_tf32, "cuda_matmul": matmul.allow_tf32}


# --------------------------------------------------------------------------------------------- a. CUDA vs CPU
def relative_error(value: Tensor, reference: Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius, float64, on the CPU); 0 for two zero tensors."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    norm = reference.norm().item()
    difference = (value - reference).norm().item()
    return difference / norm if norm > 0 else difference


def proposal_overlap(reference: Tensor, proposals: Tensor, *, topk: int = PROPOSALS_TOPK) -> dict:
    """How many of `reference`'s top-k proposals (by objectness, their order) have a box in `proposals`' top-k with
    IoU >= MATCH_IOU: {"reference_count", "count", "topk", "topk_overlap" (a share), "max_box_diff" (pixels, of each
    matched box against its best match)}."""
    reference, proposals = reference.detach().float().cpu(), proposals.detach().float().cpu()
    k = min(topk, len(reference), len(proposals))
    result = {"reference_count": len(reference), "count": len(proposals), "topk": k}
    if k == 0:
        return {**result, "topk_overlap": 1.0 if len(reference) == len(proposals) else 0.0, "max_box_diff": 0.0}
    iou, index = box_iou(reference[:k], proposals[:k]).max(dim=1)
    matched = iou >= MATCH_IOU
    diff = (reference[:k] - proposals[:k][index]).abs().amax(dim=1)[matched]
    return {**result, "topk_overlap": matched.float().mean().item(),
            "max_box_diff": diff.max().item() if len(diff) else None}  # fmt: skip


def detection_agreement(reference: dict[str, Tensor], detections: dict[str, Tensor]) -> dict:
    """Each of `reference`'s detections matched to the other device's detection of the same class with the highest
    IoU, matched when that IoU >= MATCH_IOU: {"reference_count", "count", "matched" (pairs over the larger count),
    "max_box_diff" (pixels), "max_score_diff"} (the differences over the matched pairs; None without any)."""
    ref = {key: value.detach().cpu() for key, value in reference.items()}
    det = {key: value.detach().cpu() for key, value in detections.items()}
    n_ref, n = len(ref["scores"]), len(det["scores"])
    result = {"reference_count": n_ref, "count": n}
    if n_ref == 0 or n == 0:
        return {**result, "matched": 1.0 if n_ref == n else 0.0, "max_box_diff": None, "max_score_diff": None}
    iou = box_iou(ref["boxes"].float(), det["boxes"].float())
    iou[ref["labels"][:, None] != det["labels"][None, :]] = -1.0  # another class never matches
    best, index = iou.max(dim=1)
    matched = best >= MATCH_IOU
    pairs = matched.sum().item()
    box_diff = (ref["boxes"][matched] - det["boxes"][index[matched]]).abs()
    score_diff = (ref["scores"][matched] - det["scores"][index[matched]]).abs()
    return {**result, "matched": pairs / max(n_ref, n),
            "max_box_diff": box_diff.max().item() if pairs else None,
            "max_score_diff": score_diff.max().item() if pairs else None}  # fmt: skip


def detection_problems(name: str, agreement: dict) -> list[str]:
    """The tolerance violations of a `detection_agreement` (none for a detection-free reference there is nothing
    to compare with: that is reported as a problem too, since the check would prove nothing)."""
    if agreement["reference_count"] == 0:
        return [f"{name}: the CPU found no detection, nothing was compared"]
    problems = []
    if agreement["matched"] < DETECTIONS_MIN_MATCHED:
        problems.append(f"{name}: {agreement['matched']:.3f} of the detections matched (< {DETECTIONS_MIN_MATCHED})")
    if agreement["max_box_diff"] is not None and agreement["max_box_diff"] > DETECTIONS_BOX_TOL:
        problems.append(f"{name}: box difference {agreement['max_box_diff']:.3g} px > {DETECTIONS_BOX_TOL}")
    if agreement["max_score_diff"] is not None and agreement["max_score_diff"] > DETECTIONS_SCORE_TOL:
        problems.append(f"{name}: score difference {agreement['max_score_diff']:.3g} > {DETECTIONS_SCORE_TOL}")
    return problems


def run_inference_steps(model: nn.Module, inputs: list[dict], proposals: list[Tensor] | None = None):
    """`FasterRCNN.inference` step by step: (res4 features, proposals, detections); with `proposals` (moved to the
    model's device), the RoI head runs on those instead of the model's own."""
    with torch.no_grad():
        prepared = model.prepare(inputs)
        own = model.propose(prepared)
        used = own if proposals is None else [p.to(model.device) for p in proposals]
        candidates = model.detection_candidates(inputs, prepared, used)
        detections = model.rescale(inputs, prepared, model.select_detections(candidates))
    return prepared.features, own, detections


def check_cuda_vs_cpu(ctx: Context, record: dict) -> None:
    cfg = ctx.config("r50")
    height, width = ctx.image_size("r50")
    reference = random_detector(cfg, ctx.cpu, seed=ctx.seed).eval()
    inputs = synthetic_inputs(num_images=1, height=height, width=width, seed=ctx.seed)
    calibrate_heads(reference, inputs, seed=ctx.seed)
    model = random_detector(cfg, ctx.device, seed=ctx.seed).eval()  # as built for CUDA, with the CPU's weights
    model.load_state_dict(reference.state_dict())
    record.update(config=CONFIGS["r50"][int(ctx.dry_run)][0], image=[height, width])
    features_cpu, proposals_cpu, detections_cpu = run_inference_steps(reference, inputs)
    with strict_float32() as found:
        features, proposals, detections = run_inference_steps(model, inputs)
        _, _, detections_same = run_inference_steps(model, inputs, proposals=proposals_cpu)
    record["float32_precision_default"] = found
    with torch.no_grad():  # torch's defaults (TF32 convolutions on Ampere and later)
        features_default = model.prepare(inputs).features
    record["features"] = {"rel_error": relative_error(features, features_cpu), "tolerance": FEATURES_REL_TOL,
                          "max_abs_diff": (features.cpu() - features_cpu).abs().max().item(),
                          "shape": list(features.shape)}  # fmt: skip
    record["features_default_precision"] = {"rel_error": relative_error(features_default, features_cpu),
                                            "tolerance": FEATURES_TF32_REL_TOL}  # fmt: skip
    record["proposals"] = {**proposal_overlap(proposals_cpu[0], proposals[0]), "min_overlap": PROPOSALS_MIN_OVERLAP}
    tolerances = {"match_iou": MATCH_IOU, "min_matched": DETECTIONS_MIN_MATCHED, "box_tol": DETECTIONS_BOX_TOL,
                  "score_tol": DETECTIONS_SCORE_TOL}  # fmt: skip
    record["detections"] = {**detection_agreement(detections_cpu[0], detections[0]), **tolerances}
    record["detections_same_proposals"] = {**detection_agreement(detections_cpu[0], detections_same[0]), **tolerances}
    problems = []
    if not record["features"]["rel_error"] <= FEATURES_REL_TOL:
        problems.append(f"res4 relative error {record['features']['rel_error']:.3g} > {FEATURES_REL_TOL}")
    if not record["features_default_precision"]["rel_error"] <= FEATURES_TF32_REL_TOL:
        problems.append(f"res4 relative error with the default precision "
                        f"{record['features_default_precision']['rel_error']:.3g} > {FEATURES_TF32_REL_TOL}")
    if record["proposals"]["topk_overlap"] < PROPOSALS_MIN_OVERLAP:
        proposals = record["proposals"]
        problems.append(f"proposals: top-{proposals['topk']} overlap {proposals['topk_overlap']:.3f} < "
                        f"{PROPOSALS_MIN_OVERLAP}")
    problems += detection_problems("detections", record["detections"])
    problems += detection_problems("detections from the CPU's proposals", record["detections_same_proposals"])
    d = record["detections"]
    record["summary"] = (
        f"res4 rel. error {record['features']['rel_error']:.2g} (TF32 default "
        f"{record['features_default_precision']['rel_error']:.2g}); proposals top-{record['proposals']['topk']} "
        f"overlap {record['proposals']['topk_overlap']:.3f}; detections {d['count']} vs {d['reference_count']}, "
        f"matched {d['matched']:.3f}, max box diff {fmt(d['max_box_diff'])} px, score diff {fmt(d['max_score_diff'])}"
    )
    if problems:
        raise CheckFailed("; ".join(problems))


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


# ------------------------------------------------------------------------------------------- b. training steps
class StepRecorder(HookBase):
    """Per iteration of a Trainer: the seconds of the step (the device synchronised), its losses, the gradient
    scaler's scale after it, and whether the optimizer changed the weights (a float16 step whose gradients
    overflowed is skipped by the scaler)."""

    def __init__(self, watched: Tensor, device: torch.device):
        self.watched, self.device = watched, device
        self.iterations: list[dict] = []

    def before_step(self) -> None:
        self.before = self.watched.detach().clone()
        synchronize_device(self.device)
        self.start = time.perf_counter()

    def after_step(self) -> None:
        synchronize_device(self.device)
        seconds = time.perf_counter() - self.start
        storage = self.trainer.storage
        losses = {name: storage.latest(name) for name in storage.history if "loss" in name}
        scaler = self.trainer.grad_scaler
        self.iterations.append({
            "seconds": seconds, "losses": losses,
            "scale": scaler.get_scale() if scaler is not None else None,
            "step_taken": not torch.equal(self.before, self.watched.detach()),
        })  # fmt: skip


def train_iterations(
    model: nn.Module, cfg, inputs: list[dict], *, iterations: int, amp_dtype: torch.dtype | None,
    grad_scaler: torch.amp.GradScaler | None, learning_rate: float | None = None,
) -> list[dict]:
    """`iterations` steps of `engine.trainer.Trainer` on the same batch (the config's optimizer, at `learning_rate`
    when given), recorded by `StepRecorder`."""
    optimizer = build_optimizer(cfg, model)
    if learning_rate is not None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    recorder = StepRecorder(model.roi_heads.predictor.cls_score.weight, model.device)
    trainer = Trainer(model=model, data_loader=itertools.repeat(inputs), optimizer=optimizer, max_iter=iterations,
                      hooks=[recorder], amp_dtype=amp_dtype, grad_scaler=grad_scaler)  # fmt: skip
    trainer.train()
    return recorder.iterations


def precision_settings(ctx: Context, cfg, dtype: str) -> tuple[torch.dtype | None, torch.amp.GradScaler | None, str]:
    """(autocast dtype, scaler, note) for "float32", "bfloat16" or "float16", from `engine.runner.amp_settings`.
    On the CPU (a dry run), where that refuses float16, "float16" is bfloat16 autocast with a GradScaler built
    here, so that the dry run takes the scaler's path."""
    if dtype == "float32":
        return None, None, ""
    amp = merge_overrides(cfg, ["SOLVER.AMP.ENABLED=true", f"SOLVER.AMP.DTYPE={dtype}"]).SOLVER.AMP
    if ctx.device.type == "cpu" and dtype == "float16":  # a dry run: the scaler's path, at bfloat16's speed
        return torch.bfloat16, torch.amp.GradScaler("cpu"), ("dry run: autocast to bfloat16 with a GradScaler built "
                                                            "here (amp_settings refuses float16 on the CPU, and the "
                                                            "CPU's float16 convolutions take seconds)")
    amp_dtype, scaler = amp_settings(amp, device=ctx.device)
    return amp_dtype, scaler, ""


def check_train_step(ctx: Context, record: dict) -> None:
    cfg = ctx.config("r50")
    height, width = cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN
    inputs = synthetic_inputs(num_images=cfg.SOLVER.IMS_PER_BATCH, height=height, width=width, num_boxes=4,
                              num_classes=cfg.MODEL.NUM_CLASSES, seed=ctx.seed)  # fmt: skip
    record.update(config=CONFIGS["r50"][int(ctx.dry_run)][0], input=[len(inputs), 3, height, width],
                  iterations=TRAIN_ITERATIONS, precisions={})  # fmt: skip
    problems, parts = [], []
    for dtype in ("float32", "bfloat16", "float16"):
        amp_dtype, scaler, note = precision_settings(ctx, cfg, dtype)
        model = random_detector(cfg, ctx.device, seed=ctx.seed)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        initial_scale = scaler.get_scale() if scaler is not None else None
        iterations = FLOAT16_ITERATIONS if scaler is not None else TRAIN_ITERATIONS
        try:
            steps = train_iterations(model, cfg, inputs, iterations=iterations, amp_dtype=amp_dtype,
                                     grad_scaler=scaler)  # fmt: skip
        except FloatingPointError as error:  # a non-finite loss: this precision fails, the others still run
            record["precisions"][dtype] = {"error": one_line(error)}
            problems.append(f"{dtype}: {one_line(error)}")
            continue
        finally:
            del model
            free_memory()
        entry = {"autocast": None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
                 "iterations": steps, "last_losses": steps[-1]["losses"],
                 "peak_memory_mb": torch.cuda.max_memory_allocated(ctx.device) / 2**20
                 if ctx.device.type == "cuda" else None}  # fmt: skip
        taken = sum(step["step_taken"] for step in steps)
        if scaler is not None:
            entry["grad_scaler"] = {"initial_scale": initial_scale, "final_scale": steps[-1]["scale"],
                                    "steps_taken": taken, "note": note}  # fmt: skip
        record["precisions"][dtype] = entry
        if not all(math.isfinite(v) for step in steps for v in step["losses"].values()):
            problems.append(f"{dtype}: a loss is not finite")
        if scaler is None and taken < len(steps):  # without a scaler every step must change the weights
            problems.append(f"{dtype}: {len(steps) - taken} of {len(steps)} optimizer steps left the weights as "
                            "they were")
        if scaler is not None and taken == 0:  # the scaler skips steps whose gradients overflowed, halving its scale
            problems.append(f"{dtype}: the gradient scaler skipped all {len(steps)} steps (scale "
                            f"{initial_scale:g} -> {steps[-1]['scale']:g})")
        if scaler is not None and not (math.isfinite(steps[-1]["scale"]) and steps[-1]["scale"] > 0):
            problems.append(f"{dtype}: the gradient scaler's scale is {steps[-1]['scale']}")
        parts.append(f"{dtype} loss {steps[-1]['losses']['total_loss']:.3f}, {taken}/{len(steps)} steps taken"
                     + (f", scale {steps[-1]['scale']:g}" if scaler is not None else ""))
    record["summary"] = "; ".join(parts)
    if problems:
        raise CheckFailed("; ".join(problems))


# ------------------------------------------------------------------------------------------------------ c. SyncBN
@contextlib.contextmanager
def one_process_group(ctx: Context) -> Iterator[str]:
    """A process group of this process alone (NCCL on CUDA, gloo on the CPU) through a FileStore in a temporary
    folder; destroyed afterwards. Yields the backend."""
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process: run the GPU check on its own")
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu_check_store_") as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        options = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60), **options)  # fmt: skip
        try:
            yield backend
        finally:
            dist.destroy_process_group()


def losses_and_gradients(model: nn.Module, module: nn.Module, inputs: list[dict], seed: int):
    """One training forward and backward of `module` (the model or its DDP wrapper) with the random sampling
    seeded: (losses, {parameter name: gradient})."""
    torch.manual_seed(seed)
    losses = module(inputs)
    sum(losses.values()).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach().float() for name, value in losses.items()}, grads


def running_stats(model: nn.Module) -> Tensor:
    """Every BatchNorm's running mean and variance, concatenated."""
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]).detach().float()  # fmt: skip


FUSED_VALUES = ("output", "input_grad", "weight_grad", "running_stats")


def fused_syncbn_check(device: torch.device, x: Tensor, layer: nn.BatchNorm2d) -> dict:
    """torch's fused SyncBN (the autograd function nn.SyncBatchNorm runs with several processes: batch_norm_stats,
    an all-gather over the group, batch_norm_gather_stats_with_counts, batch_norm_elemt, and their backward) on
    `x` with `layer`'s affine parameters in this 1-process group, against F.batch_norm: relative errors of the
    output, the input's and the weight's gradients, and the running statistics."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    results = []
    for fused in (True, False):
        inp = x.detach().clone().requires_grad_(True)
        weight = layer.weight.detach().clone().requires_grad_(True)
        bias = layer.bias.detach().clone().requires_grad_(True)
        mean, var = torch.zeros_like(layer.running_mean), torch.ones_like(layer.running_var)
        if fused:
            out = SyncBatchNormFunction.apply(inp, weight, bias, mean, var, layer.eps, 0.1, dist.group.WORLD, 1)
        else:
            out = F.batch_norm(inp, mean, var, weight, bias, True, 0.1, layer.eps)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results.append((out.detach(), inp.grad, weight.grad, torch.cat([mean, var])))
    return {name: relative_error(a, b) for name, a, b in zip(FUSED_VALUES, results[0], results[1])}


def check_syncbn(ctx: Context, record: dict) -> None:
    cfg = ctx.config("r50", "MODEL.BACKBONE.NORM=SyncBN")
    height, width = cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN
    inputs = synthetic_inputs(num_images=cfg.SOLVER.IMS_PER_BATCH, height=height, width=width, num_boxes=4,
                              num_classes=cfg.MODEL.NUM_CLASSES, seed=ctx.seed)  # fmt: skip
    reference = random_detector(cfg, ctx.device, seed=ctx.seed).train()
    ours = sum(isinstance(m, SyncBatchNorm) for m in reference.modules())
    if ours == 0:
        raise CheckFailed("MODEL.BACKBONE.NORM=SyncBN built no SyncBatchNorm layer")
    with one_process_group(ctx) as backend:
        record.update(backend=backend, world_size=dist.get_world_size(), syncbn_layers=ours)
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
        fused_layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        same_state = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                           converted.state_dict().values()))  # fmt: skip
        record["converted"] = {"torch_syncbn_layers": fused_layers, "same_state": same_state}
        if ctx.device.type == "cuda":
            trained = converted
            record["norm_in_step"] = "torch.nn.SyncBatchNorm"
        else:  # torch's layer trains on GPUs only; the CPU path keeps ours (engine.runner.wrap_distributed)
            trained = copy.deepcopy(reference)
            record["norm_in_step"] = "detectron_res SyncBatchNorm (torch's layer trains on GPUs only)"
        ddp = nn.parallel.DistributedDataParallel(
            trained, device_ids=[ctx.device.index or 0] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False, find_unused_parameters=cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS,
        )  # as engine.runner.wrap_distributed builds it
        first = next(m for m in reference.modules() if isinstance(m, SyncBatchNorm))
        captured: list[Tensor] = []
        hook = first.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        with strict_float32(), warnings.catch_warnings():
            # DDP's note that a gradient's strides (channels-last 1x1 kernels) differ from its bucket's: speed only
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            losses, grads = losses_and_gradients(trained, ddp, inputs, ctx.seed)
            ref_losses, ref_grads = losses_and_gradients(reference, reference, inputs, ctx.seed)
            hook.remove()
            if ctx.device.type == "cuda":  # the first SyncBN layer's input in the step
                record["fused_kernel"] = {**fused_syncbn_check(ctx.device, captured[0], first),
                                          "input_shape": list(captured[0].shape), "tolerance": SYNCBN_FUSED_REL_TOL}
            else:
                record["fused_kernel"] = "not run: torch's fused SyncBN kernels exist for CUDA only"
    loss_error = max(abs(losses[k].item() - ref_losses[k].item()) / max(abs(ref_losses[k].item()), 1e-12)
                     for k in ref_losses)  # fmt: skip
    common = sorted(set(grads) & set(ref_grads))
    grad_error = relative_error(torch.cat([grads[k].flatten() for k in common]),
                                torch.cat([ref_grads[k].flatten() for k in common]))  # fmt: skip
    stats_error = relative_error(running_stats(trained), running_stats(reference))
    record.update(
        losses={k: v.item() for k, v in losses.items()}, loss_rel_error=loss_error, grad_rel_error=grad_error,
        gradients_compared=len(common), gradients_missing=sorted(set(ref_grads) ^ set(grads)),
        running_stats_rel_error=stats_error,
        tolerances={"loss": SYNCBN_LOSS_REL_TOL, "grad": SYNCBN_GRAD_REL_TOL, "running_stats": SYNCBN_STATS_REL_TOL},
    )  # fmt: skip
    problems = []
    if fused_layers != ours or not same_state:
        problems.append(f"conversion: {fused_layers} torch SyncBatchNorm layers for {ours}, same state {same_state}")
    if not loss_error <= SYNCBN_LOSS_REL_TOL:
        problems.append(f"loss relative error {loss_error:.3g} > {SYNCBN_LOSS_REL_TOL}")
    if not grad_error <= SYNCBN_GRAD_REL_TOL or record["gradients_missing"]:
        problems.append(f"gradient relative error {grad_error:.3g} (> {SYNCBN_GRAD_REL_TOL}?), missing "
                        f"{record['gradients_missing'][:3]}")
    if not stats_error <= SYNCBN_STATS_REL_TOL:
        problems.append(f"running statistics relative error {stats_error:.3g} > {SYNCBN_STATS_REL_TOL}")
    fused = record["fused_kernel"]
    fused_errors = {k: fused[k] for k in FUSED_VALUES} if isinstance(fused, dict) else {}
    bad = {k: v for k, v in fused_errors.items() if not v <= SYNCBN_FUSED_REL_TOL}
    if bad:
        problems.append(f"fused kernels against F.batch_norm: {bad} > {SYNCBN_FUSED_REL_TOL}")
    record["summary"] = (f"{ours} SyncBN layers -> {fused_layers} torch SyncBatchNorm ({backend}, 1 process); step "
                         f"against BN: loss {loss_error:.2g}, gradients {grad_error:.2g}, running stats "
                         f"{stats_error:.2g}; fused kernels "
                         + (f"{max(fused_errors.values()):.2g}" if fused_errors else "not run (CUDA only)"))
    if problems:
        raise CheckFailed("; ".join(problems))


# --------------------------------------------------------------------------------------------- d. the cuda tests
def junit_counts(path: Path) -> dict:
    """Passed, failed, errors and skipped counts and the failing tests' ids from pytest's JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def marked_test_files(paths: list[str]) -> list[Path]:
    """The test files under `paths` (files or folders) that mention `mark.cuda` (a decorator or a module's
    `pytestmark`): pytest then imports those alone, not the whole suite, to select the tests marked cuda."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"--tests {path}: no such file or folder")
        candidates = sorted(path.rglob("test_*.py")) + sorted(path.rglob("*_test.py")) if path.is_dir() else [path]
        files += [f for f in candidates if "mark.cuda" in f.read_text(encoding="utf-8", errors="replace")]
    return files


def check_cuda_tests(ctx: Context, record: dict) -> None:
    xml, log = ctx.output / TESTS_XML, ctx.output / TESTS_LOG
    xml.unlink(missing_ok=True)
    files = marked_test_files(ctx.tests)
    record["files"] = [os.path.relpath(f, REPO) if REPO in f.parents else str(f) for f in files]
    if not files:
        record.update(passed=0, failed=0, errors=0, skipped=0, failing=[], summary="no test is marked cuda")
        return
    limit = max(1.0, min(CUDA_TESTS_LIMIT_S, ctx.budget.remaining() - 5.0))
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *map(str, files)]  # fmt: skip
    record.update(command=" ".join(["python", *command[1:]]), time_limit_s=round(limit, 1), log=str(log))
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as error:
        output = error.stdout or ""
        atomic_write_text(log, output if isinstance(output, str) else output.decode("utf-8", "replace"))
        raise CheckFailed(f"pytest -m cuda ran past its {limit:.0f} s limit (see {log})") from None
    atomic_write_text(log, done.stdout + done.stderr)
    record["exit_status"] = done.returncode
    if not xml.exists():  # it could not start (a usage error)
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise CheckFailed(f"pytest -m cuda exited with status {done.returncode} without a report: {last[0]}")
    record.update(junit_counts(xml))
    record["summary"] = (f"{record['passed']} passed, {record['failed']} failed, {record['errors']} errors, "
                         f"{record['skipped']} skipped")
    if record["failed"] or record["errors"]:
        raise CheckFailed(f"{record['failed'] + record['errors']} cuda tests failed: "
                          f"{', '.join(record['failing'][:5])} (see {log})")


# -------------------------------------------------------------------------------------------------- e. benchmark
BENCHMARKS = [  # (model config, mode, precision); float16 AMP training as detectron2's AMP
    ("bench_r50", "infer", "float32"), ("bench_r50", "infer", "bfloat16"),
    ("bench_r101", "infer", "float32"), ("bench_r101", "infer", "bfloat16"),
    ("bench_r50", "train", "float32"), ("bench_r50", "train", "float16"),
    ("bench_r101", "train", "float32"), ("bench_r101", "train", "float16"),
]  # fmt: skip
# detectron2's model zoo (R50-C4 1x, R101-C4 3x, 8 V100s, 2 images per GPU), beside the float32 figures
DETECTRON2_PUBLISHED = {
    ("R50-C4", "infer", "float32"): "0.102 s/image",
    ("R50-C4", "train", "float32"): "0.551 s/iter, 4.8 GB",
    ("R101-C4", "infer", "float32"): "0.139 s/image",
    ("R101-C4", "train", "float32"): "0.619 s/iter, 5.9 GB",
}
BENCHMARK_ENTRY_ESTIMATE_S = {"infer": 15.0, "train": 25.0}  # on an H100, model building included (a guess)


def benchmark_entry(ctx: Context, name: str, mode: str, dtype: str, *, warmup: int, runs: int) -> dict:
    height, width = ctx.image_size(name)
    if mode == "infer":
        amp = [] if dtype == "float32" else ["TEST.AMP.ENABLED=true", f"TEST.AMP.DTYPE={dtype}"]
        cfg = ctx.config(name, *amp)
        model = random_detector(cfg, ctx.device, seed=ctx.seed).eval()
        inputs = synthetic_inputs(num_images=1, height=height, width=width, seed=ctx.seed)
        result = benchmark_models({"ours": Candidate(model, lambda: model(inputs), 1, STAGES, None, TIMED_STAGES)},
                                  mode="infer", warmup=warmup, runs=runs, count_flops=False)["ours"]  # fmt: skip
        if ctx.device.type != "cuda":
            result["peak_memory_mb"] = None  # the process's peak RSS, not this model's
        result["seconds_per_image"] = result["median_s"]
    else:
        cfg = ctx.config(name)
        amp_dtype, scaler, _ = precision_settings(ctx, cfg, dtype)
        model = random_detector(cfg, ctx.device, seed=ctx.seed)
        inputs = synthetic_inputs(num_images=cfg.SOLVER.IMS_PER_BATCH, height=height, width=width, num_boxes=4,
                                  num_classes=cfg.MODEL.NUM_CLASSES, seed=ctx.seed)  # fmt: skip
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        steps = train_iterations(model, cfg, inputs, iterations=warmup + runs, amp_dtype=amp_dtype,
                                 grad_scaler=scaler, learning_rate=0.0)  # rate 0: the same work, random weights kept
        seconds = [step["seconds"] for step in steps[warmup:]]
        median = statistics.median(seconds)
        result = {"seconds": seconds, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                  "images_per_s": len(inputs) / median, "seconds_per_iteration": median,
                  "peak_memory_mb": torch.cuda.max_memory_allocated(ctx.device) / 2**20
                  if ctx.device.type == "cuda" else None}  # fmt: skip
    file = CONFIGS[name][int(ctx.dry_run)][0]
    label = {"bench_r50": "R50-C4", "bench_r101": "R101-C4"}[name]
    images = 1 if mode == "infer" else cfg.SOLVER.IMS_PER_BATCH
    autocast = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}[dtype]
    if mode == "train" and amp_dtype is not None:
        autocast = str(amp_dtype).removeprefix("torch.")  # a dry run's "float16" is bfloat16 with a scaler
    return {"model": label, "config": file, "mode": mode, "precision": dtype, "autocast": autocast,
            "input": [images, 3, height, width],
            "warmup": warmup, "runs": runs, **result}  # fmt: skip


def check_benchmark(ctx: Context, record: dict) -> None:
    warmup, runs = (1, 2) if ctx.dry_run else (2, 5)
    record["entries"] = []
    for name, mode, dtype in BENCHMARKS:
        label = f"{'R50' if name == 'bench_r50' else 'R101'}-C4 {mode} {dtype}"
        estimate = 1.0 if ctx.dry_run else BENCHMARK_ENTRY_ESTIMATE_S[mode]
        if ctx.budget.remaining() < estimate:
            record["entries"].append({"entry": label, "status": "skipped", "reason": f"would not fit the time budget "
                                      f"(about {estimate:.0f} s, {ctx.budget.remaining():.0f} s left)"})
            continue
        try:
            entry = benchmark_entry(ctx, name, mode, dtype, warmup=warmup, runs=runs)
        except (RuntimeError, ValueError, FloatingPointError) as error:  # e.g. out of memory: the next entry runs
            record["entries"].append({"entry": label, "status": "failed", "error": one_line(error)})
            continue
        finally:
            free_memory()  # the entry's model is gone with its function
        record["entries"].append({"entry": label, "status": "ok", **entry})
    done = [e for e in record["entries"] if e["status"] == "ok"]
    record["summary"] = ", ".join(f"{e['entry']} {e['images_per_s']:.2f} img/s" for e in done) or "nothing measured"
    failed = [e for e in record["entries"] if e["status"] == "failed"]
    if failed:
        raise CheckFailed("; ".join(f"{e['entry']}: {e['error']}" for e in failed))


# ----------------------------------------------------------------------------------------------------- f. export
def smaller_image(image: Tensor) -> Tensor:
    """`image` at three quarters of its sides, odd numbers of pixels (another size and padding than the example's),
    as tools/export.py checks a second size."""
    height, width = (max(int(side) * 3 // 4, 16) | 1 for side in image.shape[-2:])
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def check_export(ctx: Context, record: dict) -> None:
    cfg = ctx.config("r50")
    height, width = ctx.image_size("r50")
    model = random_detector(cfg, ctx.device, seed=ctx.seed).eval()
    inputs = synthetic_inputs(num_images=1, height=height, width=width, seed=ctx.seed)
    calibrate_heads(model, inputs, seed=ctx.seed)
    example = inputs[0]["image"].to(ctx.device)
    detector = ExportableDetector(model=model)
    record.update(format="torchscript", device=str(ctx.device), tolerances={"box": EXPORT_BOX_TOL,
                                                                            "score": EXPORT_SCORE_TOL})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_check_export_") as folder:
        path = Path(folder) / "model.ts"
        start = time.perf_counter()
        export_torchscript(detector, path, example=example)
        record["export_s"] = time.perf_counter() - start
        record["file_mb"] = path.stat().st_size / 2**20
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*`torch\.jit")
            exported = torch.jit.load(str(path), map_location=ctx.device)
    checks = []
    with torch.no_grad():
        for image in (example, smaller_image(example)):
            outputs = exported(image)
            comparison = compare_detections(eager_detections(model, image), outputs)
            comparison = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in comparison.items()}
            comparison["image_size"] = [int(image.shape[-2]), int(image.shape[-1])]
            comparison["output_device"] = str(outputs[0].device)
            checks.append(comparison)
    record["checks"] = checks
    record["summary"] = "; ".join(
        f"{c['image_size'][0]}x{c['image_size'][1]}: {c['exported_detections']} detections, labels "
        f"{'same' if c['same_labels'] else 'differ'}, box diff {fmt(c['max_box_diff'])} px, score diff "
        f"{fmt(c['max_score_diff'])}" for c in checks)
    problems = [f"image {c['image_size']}: exported detections differ beyond {EXPORT_BOX_TOL} px / {EXPORT_SCORE_TOL}"
                for c in checks if not (c["same_labels"] and detections_agree(
                    {**c, "max_box_diff": c["max_box_diff"] or 0.0, "max_score_diff": c["max_score_diff"] or 0.0},
                    box_tol=EXPORT_BOX_TOL, score_tol=EXPORT_SCORE_TOL))]  # fmt: skip
    problems += [f"outputs on {c['output_device']}, not {ctx.device}" for c in checks
                 if torch.device(c["output_device"]).type != ctx.device.type]  # fmt: skip
    if checks[0]["reference_detections"] == 0:
        problems.append("the eager model found no detection on the example: nothing was compared")
    if problems:
        raise CheckFailed("; ".join(problems))


# ------------------------------------------------------------------------------------------------ the step runner
class Step(NamedTuple):
    """A step of the check: `run(ctx, record)` fills `record` with what it measures as it goes (so that a step
    stopped by the budget keeps it) and raises on a failure; `estimate_s` is about how long it takes (with CUDA on
    an H100, which nothing has measured yet, and in a dry run) and decides whether it still fits the budget."""

    title: str
    run: Callable[[Context, dict], None]
    estimate_s: float
    dry_run_estimate_s: float


STEPS: dict[str, Step] = {
    "cuda_vs_cpu": Step("a. R50-C4 on CUDA against the CPU: res4, proposals, detections", check_cuda_vs_cpu, 40, 3),
    "train_step": Step("b. R50-C4 training steps in float32, bfloat16, float16 AMP", check_train_step, 45, 5),
    "syncbn": Step("c. SyncBN as torch's nn.SyncBatchNorm in a 1-process group", check_syncbn, 30, 3),
    "cuda_tests": Step("d. the tests marked cuda (pytest -m cuda)", check_cuda_tests, 120, 10),
    "benchmark": Step("e. benchmark: R50-C4 and R101-C4 inference and training", check_benchmark, 150, 8),
    "export": Step("f. TorchScript export on CUDA, against the eager model", check_export, 40, 5),
}


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (its type's name when empty), at most 300 characters."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if not isinstance(error, CheckFailed):
        message = f"{type(error).__name__}: {message}"
    return message if len(message) <= 300 else message[:297] + "..."


def run_step(ctx: Context, name: str) -> tuple[dict, KeyboardInterrupt | None]:
    """Runs step `name` within the budget: (its record, the interruption that stopped it or None)."""
    step = STEPS[name]
    record: dict = {"name": name, "title": step.title}
    estimate = step.dry_run_estimate_s if ctx.dry_run else step.estimate_s
    left = ctx.budget.remaining()
    if left < estimate:
        record.update(status="skipped", seconds=0.0,
                      reason=f"would not fit the time budget: it takes about {estimate:.0f} s, {left:.0f} s left")
        return record, None
    values: dict = {}
    interruption = None
    start = time.perf_counter()
    try:
        with ctx.budget.alarm():
            step.run(ctx, values)
        status = {"status": "ok"}
    except BudgetExceeded:
        status = {"status": "skipped", "reason": f"stopped by the time budget ({ctx.budget.total_s:g} s) after "
                  f"{time.perf_counter() - start:.1f} s; the values measured so far are kept"}
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: record, then stop
        interruption = error
        status = {"status": "skipped", "reason": f"interrupted by {interruption_name(error)}"}
    except Exception as error:  # noqa: BLE001 - a failed step is recorded and the others go on
        status = {"status": "failed", "error": one_line(error)}
    finally:
        free_memory()
    record.update(status, seconds=round(time.perf_counter() - start, 3), **values)
    return record, interruption


def environment(ctx: Context) -> dict:
    """What the json says about the machine and the software."""
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor})"
    else:
        device = f"cpu in place of cuda (dry run): {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl_version() if ctx.device.type == "cuda" else None,
        "float32_precision": float32_precision(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "dry_run": ctx.dry_run,
        "budget_s": ctx.budget.total_s,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def markdown(report: dict) -> str:
    """The short Markdown report: one row per step, then the benchmark's figures."""
    lines = [f"# GPU check{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"{report['device']}; torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}; commit "
             f"{report['commit']}; {report['started']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:g} s "
             f"budget{'' if report['finished'] else ' (not finished)'}.", "",
             "| step | status | seconds | result |", "|---|---|---:|---|"]  # fmt: skip
    for step in report["steps"]:
        result = step.get("summary", "") if step["status"] == "ok" else step.get("error") or step.get("reason", "")
        if step["status"] == "failed" and step.get("summary"):
            result = f"{result} ({step['summary']})"
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {result.replace('|', '/')} |")
    entries = [e for step in report["steps"] if step["name"] == "benchmark" for e in step.get("entries", [])]
    if entries:
        lines += ["", "| benchmark | config | autocast | input | images/s | median s | peak memory | detectron2's, "
                  "8 V100s |", "|---|---|---|---|---:|---:|---:|---|"]  # fmt: skip
        for e in entries:
            if e["status"] != "ok":
                lines.append(f"| {e['entry']} | {e['status']}: {e.get('error') or e.get('reason')} | | | | | | |")
                continue
            memory = "n/a" if e["peak_memory_mb"] is None else f"{e['peak_memory_mb'] / 1024:.2f} GiB"
            published = DETECTRON2_PUBLISHED.get((e["model"], e["mode"], e["precision"]), "")
            shape = "x".join(map(str, e["input"]))
            lines.append(f"| {e['entry']} | {e['config']} | {e['autocast'] or 'none'} | {shape} | "
                         f"{e['images_per_s']:.2f} | {e['median_s']:.3f} | {memory} | {published} |")
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, report: dict) -> None:
    report["elapsed_s"] = round(ctx.budget.elapsed(), 1)
    atomic_write_text(ctx.output / JSON_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(ctx.output / MARKDOWN_FILE, markdown(report))


def json_safe(value):
    """NaN and infinities (a diverged loss) as strings, so that the json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------------ main
def parse_steps(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise ValueError(f"--steps {text!r}: unknown step {unknown[0] if unknown else '(none given)'}; the steps are "
                         f"{','.join(STEPS)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help=f"folder for {JSON_FILE}, {MARKDOWN_FILE} and the cuda "
                        "tests' log")
    parser.add_argument("--dry-run", action="store_true", help="the CPU in place of CUDA, tiny models and images")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all steps; a step that no longer fits is skipped (default 480)")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated steps to run (default all: "
                        f"{','.join(STEPS)})")
    parser.add_argument("--tests", nargs="+", default=[str(REPO / "tests")],
                        help="where pytest -m cuda collects (default: the checkout's tests folder)")
    args = parser.parse_args(argv)
    names = parse_steps(args.steps)
    if args.budget_s < 0 or not math.isfinite(args.budget_s):
        raise ValueError(f"--budget-s must be a number of seconds >= 0, got {args.budget_s}")
    if args.dry_run:
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.type != "cuda":
            raise ValueError(f"--device {args.device}: the check is of a CUDA device (--dry-run runs it on the CPU)")
        if not torch.cuda.is_available():
            raise RuntimeError(f"CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
                               "run this on a machine with a GPU, or add --dry-run to run the steps on the CPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    output = Path(args.output)
    files = {"--output's " + name: output / name for name in (JSON_FILE, MARKDOWN_FILE, TESTS_LOG, TESTS_XML)}
    configs = {file for pair in CONFIGS.values() for file, _ in pair}
    check_tool_paths(
        inputs={"the configs": [p for file in sorted(configs) for p in config_files(REPO / file)],
                "--tests": args.tests},
        outputs=files,
    )  # fmt: skip
    check_writable(output, flag="--output", folder=True)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file: give a folder")
    ctx = Context(device=device, dry_run=args.dry_run, output=output, budget=Budget(args.budget_s),
                  tests=[str(Path(t).resolve()) for t in args.tests])  # fmt: skip
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and leaves the other cores to pytest
    report = {**environment(ctx), "steps": [], "finished": False}
    try:
        write_report(ctx, report)
        for index, name in enumerate(names):
            print(f"[{index + 1}/{len(names)}] {STEPS[name].title} ...", flush=True)
            record, interruption = run_step(ctx, name)
            report["steps"].append(json_safe(record))
            said = record.get("summary") if record["status"] == "ok" else record.get("error") or record.get("reason")
            print(f"    {record['status']} in {record['seconds']:.1f} s: {said}", flush=True)
            if interruption is not None:
                for rest in names[index + 1 :]:
                    report["steps"].append({"name": rest, "title": STEPS[rest].title, "status": "skipped",
                                            "seconds": 0.0, "reason": "not run: the check was interrupted"})
                write_report(ctx, report)
                raise interruption
            write_report(ctx, report)
        report["finished"] = True
        write_report(ctx, report)
    finally:
        torch.set_num_threads(threads)
    print(f"Wrote {output / JSON_FILE} and {output / MARKDOWN_FILE}")
    failed = [step["name"] for step in report["steps"] if step["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(names)} steps failed ({', '.join(failed)}): see "
                           f"{output / MARKDOWN_FILE}")
    return report


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
