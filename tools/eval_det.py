"""Evaluate existing detections against their ground truth, with no model involved.

    python tools/eval_det.py --format coco --gt instances_val2017.json --dets coco_instances_results.json \
        [--json-out metrics.json]
    python tools/eval_det.py --format voc --voc-root VOCdevkit/VOC2007 --split test --dets RESULTS_DIR \
        [--json-out metrics.json]

COCO: prints the COCOeval summary and a per-category AP table; the json gets ``{"bbox": {...}}`` in percent.
VOC: RESULTS_DIR holds the devkit's ``comp4_det_test_<class>.txt`` files (lines ``image_id score x1 y1 x2 y2`` in
the devkit's 1-based pixels, like the XML); prints per-class AP and mAP for the VOC2007 11-point and the
VOC2010+ area metrics; the json gets ``{"voc": {"mAP_07", "mAP_area", "per_class"}}`` as fractions.
``--json-out`` merges into an existing json file; with matplotlib installed the per-class precision-recall curves
and AP bars are drawn beside it (``coco_pr_curves.png`` and ``coco_ap_per_class.png``, or ``voc_*.png``). Each
format is one ``_evaluate_<format>`` function registered in ``EVALUATORS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from detectron_res.engine.logger import setup_logging
from detectron_res.evaluation.coco import evaluate_coco_results
from detectron_res.evaluation.metrics import format_per_category_table, per_category_values, write_metrics_json
from detectron_res.evaluation.voc import evaluate_voc_devkit_results, format_voc_table


def _evaluate_coco(args: argparse.Namespace) -> dict:
    """COCO: ``--gt`` a COCO instances json, ``--dets`` a COCO results json."""
    if not args.gt:
        raise ValueError("--format coco needs --gt, the COCO instances json")
    metrics = evaluate_coco_results(args.gt, args.dets, plot_dir=_plot_dir(args))
    print(format_per_category_table(per_category_values(metrics["bbox"])))
    return metrics


def _evaluate_voc(args: argparse.Namespace) -> dict:
    """VOC: ``--voc-root`` a year folder (Annotations/, ImageSets/Main/), ``--split``, ``--dets`` a folder of
    devkit result files."""
    if not args.voc_root:
        raise ValueError("--format voc needs --voc-root, the VOC year folder (e.g. VOCdevkit/VOC2007)")
    metrics = evaluate_voc_devkit_results(
        voc_root=args.voc_root, split=args.split, dets_dir=args.dets, plot_dir=_plot_dir(args)
    )
    print(format_voc_table(metrics))
    return metrics


def _plot_dir(args: argparse.Namespace) -> Path | None:
    """The folder of ``--json-out``, where the evaluation plots go; None (no plots) without ``--json-out``."""
    return Path(args.json_out).parent if args.json_out else None


EVALUATORS: dict[str, Callable[[argparse.Namespace], dict]] = {"coco": _evaluate_coco, "voc": _evaluate_voc}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=sorted(EVALUATORS), default="coco", help="ground-truth/detections format")
    parser.add_argument("--gt", default=None, help="COCO: the ground-truth instances json")
    parser.add_argument("--voc-root", default=None, help="VOC: the year folder holding Annotations/ and ImageSets/")
    parser.add_argument("--split", default="test", help="VOC: the image set, ImageSets/Main/<split>.txt (default: test)")
    parser.add_argument("--dets", required=True, help="detections: COCO results json, or VOC devkit results folder")
    parser.add_argument("--json-out", default=None, help="merge the metrics into this json file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 1 bad input files)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()  # the package's log lines, the COCOeval summary among them, on stdout
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
