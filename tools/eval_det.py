"""Evaluate an existing detections file against its ground truth, with no model involved.

    python tools/eval_det.py --format coco --gt instances_val2017.json --dets coco_instances_results.json \
        [--json-out metrics.json]

Prints the COCOeval summary and a per-category AP table; with ``--json-out`` merges the metrics
(``{"bbox": {...}}``, in percent) into that json file. Each format is one ``_evaluate_<format>`` function
registered in ``EVALUATORS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from detectron_res.evaluation.coco import evaluate_coco_results
from detectron_res.evaluation.metrics import format_per_category_table, per_category_values, write_metrics_json


def _evaluate_coco(args: argparse.Namespace) -> dict:
    """COCO: ``--gt`` a COCO instances json, ``--dets`` a COCO results json."""
    metrics = evaluate_coco_results(args.gt, args.dets)
    print(format_per_category_table(per_category_values(metrics["bbox"])))
    return metrics


EVALUATORS: dict[str, Callable[[argparse.Namespace], dict]] = {"coco": _evaluate_coco}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=sorted(EVALUATORS), default="coco", help="ground-truth/detections format")
    parser.add_argument("--gt", required=True, help="ground truth (COCO: instances json)")
    parser.add_argument("--dets", required=True, help="detections (COCO: results json)")
    parser.add_argument("--json-out", default=None, help="merge the metrics into this json file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 1 bad input files)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = EVALUATORS[args.format](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    if args.json_out:
        write_metrics_json(args.json_out, metrics)
        print(f"metrics written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
