#!/usr/bin/env python
"""Train a detector, then evaluate it on the config's test data sets.

    python tools/train_det.py --cfg configs/shapes_r18.yaml --output output/shapes
    python tools/train_det.py --cfg configs/coco_r101.yaml SOLVER.IMS_PER_BATCH=8 --resume
    python tools/train_det.py --cfg configs/coco_r50.yaml --eval-only --output output/coco_r50
"""

from __future__ import annotations

import sys

from detectron_res.engine.runner import default_argument_parser, evaluate, load_for_inference, setup, train


def main(argv: list[str] | None = None) -> dict:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate MODEL.WEIGHTS (default: the last checkpoint in the output folder)",
    )
    args = parser.parse_args(argv)
    cfg = setup(args)
    if args.eval_only:
        model, _ = load_for_inference(cfg)
        return evaluate(cfg, model)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
