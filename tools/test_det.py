#!/usr/bin/env python
"""Run a trained detector over the config's test data sets, write the results and evaluate them.

    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth

The results, metrics.json and the evaluation's config (inference/config.yaml) go to the output folder; a training
run's own config.yaml there is left as it is. Flags may come before or after KEY=VALUE overrides.
"""

from __future__ import annotations

import sys

from detectron_res.engine.runner import (
    EVAL_CONFIG_FILE,
    default_argument_parser,
    evaluate,
    load_for_inference,
    parse_args,
    run_tool,
    setup,
)


def main(argv: list[str] | None = None) -> dict:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", default=None, help="checkpoint to evaluate (default: MODEL.WEIGHTS, else the output folder's newest)"
    )
    args = parse_args(parser, argv)
    cfg = setup(args, config_file=EVAL_CONFIG_FILE)
    model, _ = load_for_inference(cfg, args.ckpt)
    return evaluate(cfg, model)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
