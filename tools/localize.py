#!/usr/bin/env python
"""ImageNet localization (the paper's Appendix C): score an ILSVRC CLS-LOC submission file.

    python tools/localize.py --evaluate --submission submission.txt --gt LOC_val_solution.csv \
        --synsets LOC_synset_mapping.txt [--image-list images.txt] [--json-out metrics.json]

Prints the top-1 and top-5 localization errors and the top-5 classification error (docs/localization.md). Line i of
the submission belongs to line i of --image-list (image ids such as ILSVRC2012_val_00000001), or without it to the
ground truth's image ids in sorted order. `--json-out` merges {"loc": {"top1_loc_err", "top5_loc_err",
"top5_cls_err", "num_images"}} (fractions) into the file. Writing submissions with the class-specific RPN and the
R-CNN stage is not built yet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detectron_res.evaluation.imagenet_loc import evaluate_submission_file
from detectron_res.evaluation.metrics import write_metrics_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localize.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluate", action="store_true", help="score --submission against --gt (no model)")
    parser.add_argument("--submission", help="the submission file: one line per image, 'label x1 y1 x2 y2' groups")
    parser.add_argument("--gt", help="the ground truth, LOC_val_solution.csv form")
    parser.add_argument("--synsets", help="LOC_synset_mapping.txt: line i is label i")
    parser.add_argument("--image-list", default=None, help="the image id of each submission line, one per line")
    parser.add_argument("--json-out", default=None, help="merge the errors into this json file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.evaluate:
        parser.error("only --evaluate exists so far: writing submissions with a model is not built yet")
    missing = [flag for flag in ("submission", "gt", "synsets") if not getattr(args, flag)]
    if missing:
        parser.error("--evaluate needs " + ", ".join(f"--{flag}" for flag in missing))
    try:
        metrics = evaluate_submission_file(
            args.submission, ground_truth=args.gt, synsets=args.synsets, image_list=args.image_list
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    loc = metrics["loc"]
    print(f"images: {loc['num_images']}")
    for key, name in (("top1_loc_err", "top-1 localization error"), ("top5_loc_err", "top-5 localization error"),
                      ("top5_cls_err", "top-5 classification error")):
        print(f"{name:28s} {100 * loc[key]:6.2f} %")
    if args.json_out:
        write_metrics_json(args.json_out, metrics)
        print(f"metrics written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
