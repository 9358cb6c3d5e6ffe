#!/usr/bin/env python
"""Run a trained detector over the config's test data sets, write the results and evaluate them.

    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth
    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth --ablation

The results, metrics.json and the evaluation's config (inference/config.yaml) go to the output folder; a training
run's own config.yaml there is left as it is. The test-time add-ons (box refinement, voting, multi-scale, flip) are
TEST.* keys (docs/addons.md). `--ablation` evaluates the checkpoint once per row of the paper's Table 9, each row
changing one thing from the row above (baseline, NMS at the refinement's 0.3 where the config's differs, + box
refinement, + box voting, + multi-scale testing), into ablation/<row>/, prints the table with each row's changed keys
and NMS threshold, and writes ablation.json. Flags may come before or after KEY=VALUE overrides.
"""

from __future__ import annotations

import sys

from detectron_res.engine.ablation import run_ablation
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
)


@releasing_run_folders
def main(argv: list[str] | None = None) -> dict | list[dict]:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", default=None, help="checkpoint to evaluate (default: MODEL.WEIGHTS, else the output folder's newest)"
    )
    parser.add_argument(
        "--ablation", action="store_true",
        help="evaluate Table 9's rows of test-time add-ons, one change per row; writes ablation.json",
    )
    add_num_gpus_argument(parser)
    args = parse_args(parser, argv)
    launched, result = launch_processes(main, sys.argv[1:] if argv is None else argv, args.num_gpus)
    if launched:
        return result
    cfg = setup(args, config_file=EVAL_CONFIG_FILE, inputs={"--ckpt": args.ckpt})
    model, _ = load_for_inference(cfg, args.ckpt)
    if args.ablation:
        return run_ablation(cfg, model, evaluate)
    return evaluate(cfg, model)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
