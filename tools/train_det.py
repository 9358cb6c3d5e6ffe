#!/usr/bin/env python
"""Train a detector, then evaluate it on the config's test data sets.

    python tools/train_det.py --cfg configs/shapes_r18.yaml --output output/shapes
    python tools/train_det.py --cfg configs/coco_r101.yaml SOLVER.IMS_PER_BATCH=8 --resume
    python tools/train_det.py --cfg configs/coco_r50.yaml --eval-only --output output/coco_r50
    python tools/train_det.py --cfg configs/coco_r101.yaml --num-gpus 8
    torchrun --nproc_per_node=8 tools/train_det.py --cfg configs/coco_r101.yaml  (more: docs/distributed.md)

Flags may come before or after the KEY=VALUE overrides. An error stops the tool with one line on stderr and exit
status 1 (the traceback goes to OUTPUT_DIR/log.txt).
"""

from __future__ import annotations

import sys

from detectron_res.engine.runner import (
    EVAL_CONFIG_FILE,
    add_num_gpus_argument,
    default_argument_parser,
    evaluate,
    launch_processes,
    load_for_inference,
    parse_args,
    releasing_run_folders,
    run_tool,
    setup,
    train,
)


@releasing_run_folders
def main(argv: list[str] | None = None) -> dict:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder, exactly"
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate MODEL.WEIGHTS (default: the newest checkpoint in the output folder)",
    )
    add_num_gpus_argument(parser)
    args = parse_args(parser, argv)
    launched, result = launch_processes(main, sys.argv[1:] if argv is None else argv, args.num_gpus)
    if launched:
        return result
    if args.eval_only:
        cfg = setup(args, config_file=EVAL_CONFIG_FILE)
        model, _ = load_for_inference(cfg)
        return evaluate(cfg, model)
    cfg = setup(args, config_file=None)  # training writes config.yaml once its checks pass
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
