#!/usr/bin/env python
"""Time a detector's inference or training step, with its peak memory and FLOPs per stage.

    python tools/benchmark.py --cfg configs/coco_r50.yaml --device cpu --mode infer --json-out r50_infer.json
    python tools/benchmark.py --cfg configs/coco_r50.yaml --device cpu --mode train --runs 3 --warmup 1

Inference: one random image of the config's test size (INPUT.MIN_SIZE_TEST x MAX_SIZE_TEST) with its test
proposal count (MODEL.RPN.POST_NMS_TOPK_TEST); training: SOLVER.IMS_PER_BATCH random images of the training size
(INPUT.MIN_SIZE_TRAIN[0] x MAX_SIZE_TRAIN) with 4 boxes each, one SGD step (at learning rate 0: the step does the
same work, and the random weights, on which timing does not depend, never diverge). The model is built as the
config says. The FLOP/s of a large 3x3 convolution is measured in the same
run as the machine's reference. See docs/benchmarks.md. KEY=VALUE arguments override config keys.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from detectron_res.config import load_config
from detectron_res.engine.benchmark import benchmark_model, conv_reference, synthetic_inputs
from detectron_res.engine.runner import run_tool
from detectron_res.engine.solver import build_optimizer
from detectron_res.modeling import build_model
from detectron_res.utils import atomic_write_text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="config file (YAML)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--json-out", default=None, help="write the results here as JSON")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.cfg, [*args.opts, f"MODEL.DEVICE={args.device}"])
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    if args.mode == "infer":
        inputs = synthetic_inputs(num_images=1, height=cfg.INPUT.MIN_SIZE_TEST, width=cfg.INPUT.MAX_SIZE_TEST)
        optimizer = None
    else:
        inputs = synthetic_inputs(
            num_images=cfg.SOLVER.IMS_PER_BATCH, height=cfg.INPUT.MIN_SIZE_TRAIN[0], width=cfg.INPUT.MAX_SIZE_TRAIN,
            num_boxes=4, num_classes=cfg.MODEL.NUM_CLASSES,
        )  # fmt: skip
        optimizer = build_optimizer(cfg, model)
        for group in optimizer.param_groups:  # the same work per step, but random weights that never diverge
            group["lr"] = 0.0
    device = next(model.parameters()).device
    ours = benchmark_model(model, mode=args.mode, inputs=inputs, warmup=args.warmup, runs=args.runs,
                           optimizer=optimizer)  # fmt: skip
    reference = conv_reference(device)
    ours["fraction_of_conv_flops_per_s"] = ours["flops_per_s"] / reference["flops_per_s"]
    results = {
        "config": args.cfg,
        "mode": args.mode,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input": [len(inputs), 3, inputs[0]["height"], inputs[0]["width"]],
        "ours": ours,
        "conv_reference": reference,
    }
    print(format_results(results))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: dict) -> str:
    ours, flops = results["ours"], results["ours"]["flops"]
    lines = [
        f"{results['config']} {results['mode']} on {results['device']} ({results['threads']} threads), input "
        f"{'x'.join(map(str, results['input']))}: median {ours['median_s']:.3f} s (min {ours['min_s']:.3f}, max "
        f"{ours['max_s']:.3f}, {len(ours['seconds'])} runs), {ours['images_per_s']:.2f} images/s, peak memory "
        f"{ours['peak_memory_mb']:.0f} MB",
        "GFLOPs: " + ", ".join(f"{stage} {value / 1e9:.1f}" for stage, value in flops.items()),
        f"{ours['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * ours['fraction_of_conv_flops_per_s']:.0f}% of a 3x3 "
        f"convolution's {results['conv_reference']['flops_per_s'] / 1e9:.1f} GFLOP/s in the same run",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
