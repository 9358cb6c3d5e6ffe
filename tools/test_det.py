#!/usr/bin/env python
"""Run a trained detector over the config's test data sets, write the results and evaluate them.

    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth
    python tools/test_det.py --cfg configs/coco_r50.yaml --ckpt output/coco_r50/model_final.pth --ablation

The results, metrics.json and the evaluation's config (inference/config.yaml) go to the output folder; a training
run's own config.yaml there is left as it is. The test-time add-ons (box refinement, voting, multi-scale, flip) are
TEST.* keys (docs/addons.md). `--ablation` evaluates the checkpoint once per row of the paper's Table 9, each row
changing one thing from the row above (baseline, NMS at the refinement's 0.3 where the config's differs, + box
refinement, + box voting, + multi-scale testing), into ablation/<row>/, prints the table with each row's changed keys
and NMS threshold, and writes ablation.json. `--report DIR` then writes an evaluation report to browse into DIR
(index.html with the metrics, TIDE's error breakdown, a sortable per-class table, precision-recall curves and a
gallery of the images with the most errors; errors.json with the dAPs; one subfolder per data set when there are
several), as `tools/report.py OUTPUT_DIR` does for an earlier run (docs/evaluation.md). Flags may come before or after
KEY=VALUE overrides.
"""

from __future__ import annotations

import sys

from detectron_res.engine.ablation import run_ablation
from detectron_res.engine.report import add_report_arguments, check_report_dir, write_run_reports
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
from detectron_res.utils import comm


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
    add_report_arguments(parser, report_help="write an evaluation report (index.html, errors.json) into DIR")
    add_num_gpus_argument(parser)
    args = parse_args(parser, argv)
    if args.report and args.ablation:
        parser.error("--report is for one evaluation, not --ablation: run tools/report.py OUTPUT_DIR/ablation/<row> "
                     "--cfg OUTPUT_DIR/inference/config.yaml for a row")
    launched, result = launch_processes(main, sys.argv[1:] if argv is None else argv, args.num_gpus)
    if launched:
        return result
    if args.report:  # before minutes of inference
        check_report_dir(args.report, inputs={"--cfg": args.cfg, "--ckpt": args.ckpt})
    cfg = setup(args, config_file=EVAL_CONFIG_FILE, inputs={"--ckpt": args.ckpt})
    model, _ = load_for_inference(cfg, args.ckpt)
    if args.ablation:
        return run_ablation(cfg, model, evaluate)
    metrics = evaluate(cfg, model)
    if args.report and comm.is_main_process():
        write_run_reports(cfg, args.report, gallery_size=args.gallery, show_score=args.show_score)
    return metrics


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
