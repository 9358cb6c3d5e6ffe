#!/usr/bin/env python
"""Time a detector's inference or training step, with its peak memory and FLOPs per stage.

    python tools/benchmark.py --cfg configs/coco_r50.yaml --device cpu --mode infer --json-out r50_infer.json
    python tools/benchmark.py --cfg configs/coco_r50.yaml --device cpu --mode train --runs 3 --warmup 1
    python tools/benchmark.py --cfg configs/coco_r50.yaml --compare torchvision --json-out r50_vs_torchvision.json
    PYTHONPATH=path/to/detectron2 python tools/benchmark.py --cfg configs/d2_r50_c4.yaml --compare detectron2 \
        INPUT.MAX_SIZE_TEST=1067
    python tools/benchmark.py --mode coco-eval --runs 3 --json-out coco_eval_times.json

Inference: one random image of the config's test size (INPUT.MIN_SIZE_TEST x MAX_SIZE_TEST) with its test
proposal count (MODEL.RPN.POST_NMS_TOPK_TEST); training: SOLVER.IMS_PER_BATCH random images of the training size
(INPUT.MIN_SIZE_TRAIN[0] x MAX_SIZE_TRAIN) with 4 boxes each, one training iteration: SOLVER.ACCUMULATE forward and
backward passes on them, then one SGD step (at learning rate 0: the step does the same work, and the random weights,
on which timing does not depend, never diverge). Seconds are per timed run (one iteration in training); "seconds per
image" divides the median by the run's images (IMS_PER_BATCH x ACCUMULATE in training). The model is built as the
config says; random weights start each residual block at its shortcut (`zero_init_residuals`), so that deep
trunks keep finite activations. The FLOP/s of a large 3x3 convolution is measured in the same
run as the machine's reference. `--compare torchvision` also builds the same detector from torchvision's
FasterRCNN with the same weights (`engine.benchmark.torchvision_equivalent`) and times it in the same process, run
for run in turn with ours; "speedup" is our images/s over torchvision's. `--compare detectron2` does the same with
detectron2's own GeneralizedRCNN (`engine.benchmark.detectron2_equivalent`; detectron2 must be importable, e.g. its
source on PYTHONPATH, and the config one that detectron2 can express, e.g. configs/d2_r50_c4.yaml). See
docs/benchmarks.md. KEY=VALUE arguments override config keys.

`--mode coco-eval` (no config, no model) times COCO evaluation with each backend of TEST.COCO_BACKEND, pycocotools
and faster_coco_eval, in turn in this process (`engine.benchmark.coco_eval_times`) on a synthetic ground truth and
detections of COCO val2017's size (`engine.benchmark.synthetic_coco_evaluation`: --images images, ~7 boxes each
over 80 classes, 100 detections per image), and says the largest difference of any metric between them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from detectron_res.config import load_config, merge_overrides
from detectron_res.engine.benchmark import (
    DETECTRON2_STAGES,
    DETECTRON2_TIMED_STAGES,
    STAGES,
    TIMED_STAGES,
    TORCHVISION_STAGES,
    TORCHVISION_TIMED_STAGES,
    Candidate,
    benchmark_models,
    coco_eval_times,
    conv_reference,
    detectron2_call,
    detectron2_config_problem,
    detectron2_equivalent,
    detectron2_inputs,
    import_detectron2,
    loader_throughput,
    synthetic_coco_evaluation,
    synthetic_inputs,
    torchvision_equivalent,
    torchvision_inputs,
    zero_init_residuals,
)
from detectron_res.data.build import build_train_data_loader, build_train_dataset
from detectron_res.engine.runner import run_tool
from detectron_res.evaluation.coco import COCO_BACKENDS, check_coco_backend
from detectron_res.engine.solver import build_optimizer
from detectron_res.modeling import build_model, compile_for_inference
from detectron_res.utils import atomic_write_text
from detectron_res.utils.paths import check_tool_paths


COMPARED = ("torchvision", "detectron2")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default=None, help="config file (YAML); every mode but coco-eval needs one")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mode", choices=("infer", "train", "data", "coco-eval"), default="infer",
                        help="data: images/s of the training loader (DATASETS.TRAIN, decode, resize, flip, batch) for "
                        "each --workers count, no model; coco-eval: seconds of COCO evaluation with each backend")
    parser.add_argument("--images", type=int, default=5000, help="--mode coco-eval: images of the synthetic data")
    parser.add_argument("--workers", default="0,1,2", help="--mode data: the DATALOADER.NUM_WORKERS values to time")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--compare", choices=COMPARED, default=None,
                        help="also time the same detector built from torchvision or by detectron2 (importable, "
                        "e.g. its source on PYTHONPATH), with the same weights")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (a slow extra pass in train mode)")
    parser.add_argument("--json-out", default=None, help="write the results here as JSON")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.mode == "coco-eval":
        return coco_eval_benchmark(args)
    if args.cfg is None:
        parser.error(f"--mode {args.mode} needs --cfg, the config file")
    cfg = load_config(args.cfg, [*args.opts, f"MODEL.DEVICE={args.device}"])
    check_tool_paths(  # before the minutes of timing: --json-out must not overwrite what was read
        inputs={"--cfg": args.cfg, "MODEL.WEIGHTS": cfg.MODEL.WEIGHTS,
                "MODEL.BACKBONE.WEIGHTS": cfg.MODEL.BACKBONE.WEIGHTS},
        outputs={"--json-out": args.json_out},
    )
    if args.mode == "data":
        results = data_throughput(cfg, args)
        print(format_data_results(results))
        if args.json_out:
            atomic_write_text(args.json_out, json.dumps(results, indent=2) + "\n")
        return results
    if args.compare == "detectron2":  # before any model is built: a missing detectron2 is known in a second
        try:
            import_detectron2()
        except ValueError as error:
            raise ValueError(f"--compare detectron2: {error}") from error
        problem = detectron2_config_problem(cfg)
        if problem:
            raise ValueError(f"--compare detectron2: {problem}")
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    if not cfg.MODEL.BACKBONE.WEIGHTS:
        zero_init_residuals(model)  # random weights that keep a deep trunk's activations finite
    if args.mode == "infer" and cfg.TEST.COMPILE:
        compile_for_inference(model)
    device = model.device
    if args.mode == "infer":
        inputs = synthetic_inputs(num_images=1, height=cfg.INPUT.MIN_SIZE_TEST, width=cfg.INPUT.MAX_SIZE_TEST)
    else:
        inputs = synthetic_inputs(
            num_images=cfg.SOLVER.IMS_PER_BATCH, height=cfg.INPUT.MIN_SIZE_TRAIN[0], width=cfg.INPUT.MAX_SIZE_TRAIN,
            num_boxes=4, num_classes=cfg.MODEL.NUM_CLASSES,
        )  # fmt: skip
    candidates = {"ours": Candidate(model, lambda: model(inputs), len(inputs), STAGES, sgd_at_rate_0(cfg, model, args),
                                    TIMED_STAGES)}  # fmt: skip
    if args.compare == "torchvision":
        height, width = inputs[0]["height"], inputs[0]["width"]
        theirs = torchvision_equivalent(model, min_size=min(height, width), max_size=max(height, width))
        images, targets = torchvision_inputs(inputs, device)
        call = (lambda: theirs(images)) if targets is None else (lambda: theirs(images, targets))
        candidates["torchvision"] = Candidate(theirs, call, len(inputs), TORCHVISION_STAGES,
                                              sgd_at_rate_0(cfg, theirs, args), TORCHVISION_TIMED_STAGES)  # fmt: skip
    elif args.compare == "detectron2":
        theirs = detectron2_equivalent(model, cfg)
        call = detectron2_call(theirs, detectron2_inputs(inputs, input_format=cfg.INPUT.FORMAT))
        candidates["detectron2"] = Candidate(theirs, call, len(inputs), DETECTRON2_STAGES,
                                             sgd_at_rate_0(cfg, theirs, args), DETECTRON2_TIMED_STAGES)  # fmt: skip
    accumulate = cfg.SOLVER.ACCUMULATE if args.mode == "train" else 1
    results = {
        "config": args.cfg,
        "mode": args.mode,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input": [len(inputs), 3, inputs[0]["height"], inputs[0]["width"]],  # of one pass
        **({"accumulate": accumulate} if args.mode == "train" else {}),  # passes per iteration
        **benchmark_models(candidates, mode=args.mode, warmup=args.warmup, runs=args.runs,
                           count_flops=not args.no_flops, accumulate=accumulate),
    }  # fmt: skip
    reference = conv_reference(device)
    results["conv_reference"] = reference
    for name in candidates:
        if "flops" in results[name]:
            results[name]["fraction_of_conv_flops_per_s"] = results[name]["flops_per_s"] / reference["flops_per_s"]
    if args.compare:
        results["speedup"] = results["ours"]["images_per_s"] / results[args.compare]["images_per_s"]
    print(format_results(results))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(results, indent=2) + "\n")
    return results


def coco_eval_benchmark(args: argparse.Namespace) -> dict:
    """--mode coco-eval: both COCOeval backends timed in turn, --runs times each, on synthetic data of --images."""
    if args.images < 1 or args.runs < 1:
        raise ValueError(f"--mode coco-eval needs --images >= 1 and --runs >= 1, got {args.images} and {args.runs}")
    check_tool_paths(inputs={}, outputs={"--json-out": args.json_out})
    check_coco_backend("faster_coco_eval")  # the comparison needs it: one line saying how to install it
    gt, detections = synthetic_coco_evaluation(num_images=args.images)
    results = {"mode": "coco-eval", "threads": torch.get_num_threads(),
               **coco_eval_times(gt, detections, backends=COCO_BACKENDS, runs=args.runs)}  # fmt: skip
    results["speedup"] = (results["backends"]["pycocotools"]["median_s"]
                          / results["backends"]["faster_coco_eval"]["median_s"])  # fmt: skip
    print(format_coco_eval_results(results))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(results, indent=2) + "\n")
    return results


def format_coco_eval_results(results: dict) -> str:
    lines = [f"COCO evaluation of {results['detections']} detections on {results['images']} images "
             f"({results['annotations']} boxes), {results['threads']} threads"]  # fmt: skip
    for name, timed in results["backends"].items():
        runs = ", ".join(f"{value:.2f}" for value in timed["seconds"])
        lines.append(f"{name}: median {timed['median_s']:.2f} s (runs {runs}), AP {results['AP'][name]:.4f}")
    lines.append(f"speedup (pycocotools' seconds over faster_coco_eval's): {results['speedup']:.2f}x; largest "
                 f"difference of any metric: {results['max_metric_difference']:.2e} AP points")  # fmt: skip
    return "\n".join(lines)


def sgd_at_rate_0(cfg, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer | None:
    """Train mode: the config's optimizer at learning rate 0 (the same work per step, but random weights, on which
    timing does not depend, never diverge); None for inference."""
    if args.mode != "train":
        return None
    optimizer = build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return optimizer


def data_throughput(cfg, args: argparse.Namespace) -> dict:
    """--mode data: the training loader of cfg (its DATASETS.TRAIN, SOLVER.IMS_PER_BATCH, INPUT sizes) timed for
    each of --workers (`loader_throughput`: --warmup batches, then --runs); "per_worker" is images/s over the
    worker count (the main process's own for 0 workers)."""
    try:
        counts = [int(value) for value in args.workers.split(",")]
    except ValueError:
        raise ValueError(f"--workers must be a comma-separated list of worker counts, got {args.workers!r}") from None
    if not counts or min(counts) < 0:
        raise ValueError(f"--workers must be worker counts >= 0, got {args.workers!r}")
    dataset = build_train_dataset(cfg)
    results = {"config": args.cfg, "mode": "data", "dataset": list(cfg.DATASETS.TRAIN), "images_in_dataset":
               len(dataset), "batch_size": cfg.SOLVER.IMS_PER_BATCH, "input": {"min_size_train":
               list(cfg.INPUT.MIN_SIZE_TRAIN), "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN, "resize_backend":
               cfg.INPUT.RESIZE_BACKEND}, "threads": torch.get_num_threads(), "workers": {}}  # fmt: skip
    for count in counts:
        loader = build_train_data_loader(merge_overrides(cfg, [f"DATALOADER.NUM_WORKERS={count}"]), dataset)
        measured = loader_throughput(loader, warmup=args.warmup, batches=args.runs)
        measured["per_worker"] = measured["images_per_s"] / max(count, 1)
        results["workers"][str(count)] = measured
    return results


def format_data_results(results: dict) -> str:
    lines = [f"{results['config']} training loader on {', '.join(results['dataset'])} ({results['images_in_dataset']} "
             f"images), batches of {results['batch_size']}, sizes {results['input']}"]
    for count, r in results["workers"].items():
        lines.append(f"{count} workers: {r['images_per_s']:.2f} images/s ({r['per_worker']:.2f} per worker), "
                     f"{r['images']} images in {r['seconds']:.2f} s, median wait per batch "
                     f"{r['batch_wait']['median_s']:.3f} s")
    return "\n".join(lines)


def format_results(results: dict) -> str:
    names = [name for name in ("ours", *COMPARED) if name in results]
    passes = f" x {results['accumulate']} passes per iteration" if "accumulate" in results else ""
    per_run = "per iteration" if "accumulate" in results else "per run"
    lines = [
        f"{results['config']} {results['mode']} on {results['device']} ({results['threads']} threads), input "
        f"{'x'.join(map(str, results['input']))}{passes}; a 3x3 convolution reaches "
        f"{results['conv_reference']['flops_per_s'] / 1e9:.1f} GFLOP/s in the same run"
    ]
    for name in names:
        r = results[name]
        memory = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f} MB"
        lines.append(
            f"{name}: median {r['median_s']:.3f} s {per_run} (min {r['min_s']:.3f}, max {r['max_s']:.3f}, "
            f"{len(r['seconds'])} runs), {r['seconds_per_image']:.3f} s per image ({r['images_per_run']} per run), "
            f"{r['images_per_s']:.3f} images/s, peak memory {memory}"
        )
        if "stage_seconds" in r:
            lines.append("  seconds in the forward calls (medians): " + ", ".join(
                f"{stage} {value:.3f}" for stage, value in r["stage_seconds"].items()))
        if "flops" in r:
            lines.append(
                "  GFLOPs: " + ", ".join(f"{stage} {value / 1e9:.1f}" for stage, value in r["flops"].items())
                + f"; {r['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_conv_flops_per_s']:.0f}% of the "
                "convolution's"
            )
    if "speedup" in results:
        (other,) = [name for name in COMPARED if name in results]
        lines.append(f"speedup (our images/s over {other}'s): {results['speedup']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
