#!/usr/bin/env python
"""Evaluate an ensemble of trained detectors: each model runs on every test image; on the union of their proposals
each RoI's predictions are averaged over the models (the paper's ensemble), or all models' detections go through one
per-class NMS with box voting.

    python tools/ensemble_det.py --model configs/coco_r101.yaml output/coco_r101/model_final.pth \
        --model output/coco_r101_context/config.yaml output/coco_r101_context/model_final.pth \
        --proposals union --output output/ensemble TEST.BOX_REFINEMENT.ENABLED=true TEST.BOX_VOTING.ENABLED=true

Each model is built from its own config (depth, global context, ...). The first config, with the KEY=VALUE
overrides, is the evaluation's: its data sets, test input size and test-time add-ons (TEST.*) apply to every model;
the overrides also apply to every model's config. The models must have the same classes.

`--proposals own` (default): each model classifies its own RPN's proposals; `union`: every model classifies the
union of all models' proposals. `--merge average` (the default with `union`, the paper's "ensemble of per-region
classifiers"): each RoI's class probabilities and decoded boxes are averaged over the models, then post-processed
once as TEST.* says (refinement, NMS, voting); needs `union`. `--merge nms` (the default with `own`; not in the
paper): every model's candidates go through one per-class NMS and box voting, which is on unless
TEST.BOX_VOTING.ENABLED=false is given (every model votes too, so an ensemble of one model is that model with
voting). Writes metrics.json, the evaluation config (inference/config.yaml) and ensemble.json (the members, the
proposals and the merge) to the output folder (default: the first config's OUTPUT_DIR/ensemble).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detectron_res.config import load_config
from detectron_res.engine.runner import (
    EVAL_CONFIG_FILE,
    evaluate,
    load_for_inference,
    parse_args,
    releasing_run_folders,
    run_tool,
    setup,
)
from detectron_res.modeling import DetectorEnsemble, build_test_time
from detectron_res.modeling.ensemble import ENSEMBLE_MERGES
from detectron_res.utils import atomic_write_text

logger = logging.getLogger("detectron_res.ensemble")

# the "nms" merge is NMS then box voting over every model's candidates: voting on unless the command line says
# TEST.BOX_VOTING.ENABLED=false. The "average" merge post-processes as configured, like one model.
NMS_MERGE_OVERRIDES = ("TEST.BOX_VOTING.ENABLED=true",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="KEY=VALUE arguments override config keys of every model"
    )
    parser.add_argument(
        "--model", nargs=2, action="append", required=True, metavar=("CONFIG", "CHECKPOINT"),
        help="a member: its config file and checkpoint (repeat for each model)",
    )
    parser.add_argument(
        "--proposals", choices=("own", "union"), default="own", help="which proposals each model classifies"
    )
    parser.add_argument(
        "--merge", choices=ENSEMBLE_MERGES, default=None,
        help="average: each RoI's predictions averaged over the models (the paper's; default with --proposals union); "
        "nms: all models' detections through one NMS with voting (default with --proposals own)",
    )
    parser.add_argument(
        "--output", default=None, help="output folder (default: the first config's OUTPUT_DIR/ensemble)"
    )
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides, for every model")
    return parser


def check_num_classes(members: list[tuple[str, str]], configs: list) -> None:
    """Every model must predict as many classes as the first (MODEL.NUM_CLASSES); checked before loading weights."""
    first_config = members[0][0]
    for (config, _), cfg in zip(members[1:], configs[1:]):
        if cfg.MODEL.NUM_CLASSES != configs[0].MODEL.NUM_CLASSES:
            raise ValueError(
                f"The ensemble's models disagree on the classes: MODEL.NUM_CLASSES={configs[0].MODEL.NUM_CLASSES} in "
                f"{first_config} but {cfg.MODEL.NUM_CLASSES} in {config}"
            )


def check_class_names(members: list[tuple[str, str]], metadata: list[dict]) -> None:
    """The class names the checkpoints record (those that record them) must be the same, in the same order."""
    known = [(ckpt, list(meta["class_names"])) for (_, ckpt), meta in zip(members, metadata) if meta.get("class_names")]
    for ckpt, class_names in known[1:]:
        if class_names != known[0][1]:
            differ = next(i for i, (a, b) in enumerate(zip(known[0][1], class_names)) if a != b)
            raise ValueError(
                f"The ensemble's models disagree on the classes: class {differ} is {known[0][1][differ]!r} in "
                f"{known[0][0]} but {class_names[differ]!r} in {ckpt}"
            )


@releasing_run_folders
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    members = [(config, ckpt) for config, ckpt in args.model]
    merge = args.merge or ("average" if args.proposals == "union" else "nms")
    if merge == "average" and args.proposals == "own" and len(members) > 1:
        raise ValueError(
            "--merge average averages every model's predictions for the same RoIs: it needs --proposals union "
            "(or --merge nms for each model's own proposals)"
        )
    overrides = [*(NMS_MERGE_OVERRIDES if merge == "nms" else ()), *args.opts]
    first = load_config(members[0][0], overrides)
    output = args.output or str(Path(first.OUTPUT_DIR) / "ensemble")
    cfg = setup(
        argparse.Namespace(cfg=members[0][0], opts=overrides, output=output),
        config_file=EVAL_CONFIG_FILE,
        inputs={"--model": [path for member in members for path in member if path]},
    )
    configs = [cfg] + [load_config(config, overrides) for config, _ in members[1:]]
    check_num_classes(members, configs)
    models, metadata = [], []
    for (config, ckpt), model_cfg in zip(members, configs):
        model, meta = load_for_inference(model_cfg, ckpt)
        model.test_time = build_test_time(cfg)  # the evaluation's add-ons for every model
        models.append(model)
        metadata.append(meta)
    check_class_names(members, metadata)
    logger.info("Ensemble of %d models, %s proposals, %s merge: %s", len(models), args.proposals, merge, members)
    written = {"models": [{"config": c, "checkpoint": k} for c, k in members], "proposals": args.proposals,
               "merge": merge}
    atomic_write_text(Path(cfg.OUTPUT_DIR) / "ensemble.json", json.dumps(written, indent=2) + "\n")
    ensemble = DetectorEnsemble(models=models, shared_proposals=args.proposals == "union", merge=merge)
    return evaluate(cfg, ensemble)


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
