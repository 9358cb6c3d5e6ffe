#!/usr/bin/env python
"""Run a trained detector over the config's test data sets, write the results and evaluate them.

    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth
"""

from __future__ import annotations

import sys

from detectron_res.engine.runner import default_argument_parser, evaluate, load_for_inference, setup


def main(argv: list[str] | None = None) -> dict:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", default=None, help="checkpoint to evaluate (default: MODEL.WEIGHTS, else the output folder's last)"
    )
    args = parser.parse_args(argv)
    cfg = setup(args)
    model, _ = load_for_inference(cfg, args.ckpt)
    return evaluate(cfg, model)


if __name__ == "__main__":
    main(sys.argv[1:])
