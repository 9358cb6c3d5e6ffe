#!/usr/bin/env python
"""Train the ImageNet localization system (the paper's Appendix C): the class-specific RPN, then the R-CNN stage.

    python tools/train_loc.py --cfg configs/loc_shapes_r18.yaml
    python tools/train_loc.py --cfg configs/ilsvrc_loc_r101.yaml --stage rpn MODEL.BACKBONE.WEIGHTS=R-101.pth
    python tools/train_loc.py --cfg configs/ilsvrc_loc_r101.yaml --stage rcnn --rpn-ckpt output/.../rpn/model_final.pth

Stage 1 writes OUTPUT_DIR/rpn, stage 2 OUTPUT_DIR/rcnn (it first runs the RPN over the training images, cached in
OUTPUT_DIR/rcnn/rcnn_rois.pth). Each stage ends with the CLS-LOC errors on DATASETS.TEST. `--resume` continues a stage
exactly from its newest checkpoint. An error stops the tool with one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

from detectron_res.engine.runner import default_argument_parser, parse_args, releasing_run_folders, run_tool, setup
from detectron_res.localization.train import train_rcnn_stage, train_rpn_stage


@releasing_run_folders
def main(argv: list[str] | None = None) -> dict:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", choices=("all", "rpn", "rcnn"), default="all",
        help="which stage to train; all: rpn, then rcnn when LOC.RCNN.ENABLED",
    )
    parser.add_argument("--rpn-ckpt", default=None, help="stage 2: the RPN (default: newest in OUTPUT_DIR/rpn)")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its newest checkpoint")
    args = parse_args(parser, argv)
    cfg = setup(args, config_file="config.yaml", inputs={"--rpn-ckpt": args.rpn_ckpt})
    if cfg.MODEL.META_ARCHITECTURE != "LocalizationRPN":
        raise ValueError(
            f"{args.cfg} has MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE}: tools/train_loc.py trains the "
            "localization system (LocalizationRPN); detectors train with tools/train_det.py"
        )
    results = {}
    if args.stage in ("all", "rpn"):
        results["rpn"] = train_rpn_stage(cfg, resume=args.resume)
    if args.stage == "rcnn" or (args.stage == "all" and cfg.LOC.RCNN.ENABLED):
        results["rcnn"] = train_rcnn_stage(cfg, rpn_checkpoint=args.rpn_ckpt, resume=args.resume)
    return results


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
