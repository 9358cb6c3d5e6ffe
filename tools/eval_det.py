"""Evaluate existing detections against their ground truth, with no model involved.

    python tools/eval_det.py --format coco --gt instances_val2017.json --dets coco_instances_results.json \
        [--json-out metrics.json] [--backend faster_coco_eval] [--report DIR --images val2017/]
    python tools/eval_det.py --format voc --voc-root VOCdevkit/VOC2007 --split test --dets RESULTS_DIR \
        [--json-out metrics.json]

COCO: prints the COCOeval summary and a per-category AP table; the json gets ``{"bbox": {...}}`` in percent.
``--backend`` picks the COCOeval implementation as TEST.COCO_BACKEND does for training and testing: auto (default:
faster_coco_eval where the optional faster-coco-eval package imports, else pycocotools; the same numbers, see
docs/benchmarks.md), pycocotools or faster_coco_eval. The summary's log line names the one that ran.
VOC: RESULTS_DIR holds the devkit's ``comp4_det_test_<class>.txt`` files (lines ``image_id score x1 y1 x2 y2`` in
the devkit's 1-based pixels, like the XML); prints per-class AP and mAP for the VOC2007 11-point and the
VOC2010+ area metrics; the json gets ``{"voc": {"mAP_07", "mAP_area", "per_class"}}`` as fractions.
``--json-out`` merges into an existing json file; with matplotlib installed the per-class precision-recall curves
and AP bars are drawn beside it (``coco_pr_curves.png`` and ``coco_ap_per_class.png``, or ``voc_*.png``). Each
format is one ``_evaluate_<format>`` function registered in ``EVALUATORS``.

``--report DIR`` (COCO) also writes an evaluation report to browse: ``DIR/index.html`` (the metrics, TIDE's error
breakdown, a sortable per-class table, precision-recall curves and a gallery of the images with the most errors, drawn
from ``--images``, the folder the ground truth's ``file_name`` entries are under) and ``DIR/errors.json`` (the dAPs);
docs/evaluation.md.

``--as-devkit`` (VOC) scores every numeric box as the official devkit and py-faster-rcnn's ``voc_eval`` do, with
no check on the box, and says how many lines looked 0-based (xmin or ymin below 1) and which was the first; without
it such a file is refused, naming the line. Before anything is evaluated or written, ``--json-out`` and the plots
beside it are checked: none may be (or, through ``..`` or a symlink, alias) ``--gt``, ``--dets`` or ``--voc-root``
or lie inside them, an existing ``--json-out`` must hold a JSON object, and its folder must be writable; each
refusal is one line naming the path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from detectron_res.engine.logger import setup_logging
from detectron_res.engine.report import add_report_arguments, check_report_dir
from detectron_res.evaluation.coco import (
    COCO_BACKEND_CHOICES,
    DEFAULT_COCO_BACKEND,
    COCOEvaluation,
    check_coco_backend,
    run_coco_evaluation,
    write_coco_plots,
)
from detectron_res.evaluation.metrics import (
    format_per_category_table,
    per_category_values,
    read_metrics_json,
    write_metrics_json,
)
from detectron_res.evaluation.pr_curves import AP_BARS_FILE, PR_CURVES_FILE
from detectron_res.evaluation.report import write_report
from detectron_res.evaluation.voc import evaluate_voc_devkit_results, format_voc_table
from detectron_res.utils.io import DiskFullError
from detectron_res.utils.paths import check_tool_paths, check_writable


def _evaluate_coco(args: argparse.Namespace) -> tuple[dict, COCOEvaluation]:
    """COCO: ``--gt`` a COCO instances json, ``--dets`` a COCO results json."""
    if not args.gt:
        raise ValueError("--format coco needs --gt, the COCO instances json")
    evaluation = run_coco_evaluation(args.gt, args.dets, backend=args.backend)
    if _plot_dir(args) is not None:
        write_coco_plots(evaluation, _plot_dir(args))
    print(format_per_category_table(per_category_values(evaluation.metrics["bbox"])))
    return evaluation.metrics, evaluation


def _write_report(args: argparse.Namespace, evaluation: COCOEvaluation) -> None:
    """``--report``: the evaluation report, its gallery drawn from the images under ``--images``."""
    images = Path(args.images) if args.images else None
    write_report(
        args.report,
        evaluation,
        image_files={image["id"]: images / image["file_name"] for image in evaluation.coco_gt.dataset["images"]
                     if images is not None and image.get("file_name")},
        title=f"Evaluation report: {Path(args.dets).name}",
        sources={"ground truth": args.gt, "detections": args.dets, "images": args.images or "not given (--images)"},
        gallery_size=args.gallery,
        show_score=args.show_score,
    )


def _evaluate_voc(args: argparse.Namespace) -> tuple[dict, None]:
    """VOC: ``--voc-root`` a year folder (Annotations/, ImageSets/Main/), ``--split``, ``--dets`` a folder of
    devkit result files."""
    if not args.voc_root:
        raise ValueError("--format voc needs --voc-root, the VOC year folder (e.g. VOCdevkit/VOC2007)")
    metrics = evaluate_voc_devkit_results(
        voc_root=args.voc_root, split=args.split, dets_dir=args.dets, plot_dir=_plot_dir(args), as_devkit=args.as_devkit
    )
    print(format_voc_table(metrics))
    return metrics, None


def _plot_dir(args: argparse.Namespace) -> Path | None:
    """The folder of ``--json-out``, where the evaluation plots go; None (no plots) without ``--json-out``."""
    return Path(args.json_out).parent if args.json_out else None


def check_outputs(args: argparse.Namespace) -> None:
    """Refuses, before anything is evaluated or written, a ``--json-out`` (or a plot beside it) that is or lies inside
    an input, a ``--json-out`` that is a folder, lies under a file or in a folder this user cannot write, or is an
    existing file that is not a metrics json (the metrics are merged into it)."""
    if args.report:
        check_report_dir(args.report, inputs={"--gt": args.gt, "--dets": args.dets, "--images": args.images,
                                              "--json-out": args.json_out})
    if not args.json_out:
        return
    json_out = Path(args.json_out)
    plots = [json_out.parent / name.format(prefix=args.format) for name in (PR_CURVES_FILE, AP_BARS_FILE)]
    check_tool_paths(
        inputs={"--gt": args.gt, "--dets": args.dets, "--voc-root": args.voc_root},
        outputs={"--json-out": json_out, "the plot beside --json-out": plots},
    )
    if json_out.is_dir():
        raise IsADirectoryError(f"--json-out {json_out} is a folder: give the json file to write (e.g. "
                                f"{json_out / 'metrics.json'})")
    check_writable(json_out, flag="--json-out")
    read_metrics_json(json_out)  # an existing file must hold a JSON object to merge into


def write_json_out(path: str, metrics: dict) -> None:
    """``write_metrics_json``, its failure named after ``--json-out``."""
    try:
        write_metrics_json(path, metrics)
    except DiskFullError:
        raise  # one line naming the file, the space left and what was kept
    except OSError as error:
        raise OSError(f"could not write --json-out {path}: {error.strerror or error}") from error


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


# each returns the metrics and, for COCO, the evaluation the report is written from
EVALUATORS: dict[str, Callable[[argparse.Namespace], tuple[dict, COCOEvaluation | None]]] = {
    "coco": _evaluate_coco, "voc": _evaluate_voc}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=sorted(EVALUATORS), default="coco", help="ground-truth/detections format")
    parser.add_argument("--gt", default=None, help="COCO: the ground-truth instances json")
    parser.add_argument("--voc-root", default=None, help="VOC: the year folder holding Annotations/ and ImageSets/")
    parser.add_argument("--split", default="test", help="VOC: the image set, ImageSets/Main/<split>.txt (default: test)")
    parser.add_argument("--dets", required=True, help="detections: COCO results json, or VOC devkit results folder")
    parser.add_argument("--json-out", default=None, help="merge the metrics into this json file")
    parser.add_argument(
        "--as-devkit", action="store_true",
        help="VOC: score every numeric box as the official devkit and py-faster-rcnn's voc_eval do (no check on the "
        "box; says how many lines looked 0-based) instead of refusing a file with 0-based lines",
    )
    add_report_arguments(parser, report_help="COCO: also write an evaluation report (index.html, errors.json) to DIR")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="COCO: the folder of the ground truth's images, for the report's gallery")
    parser.add_argument(
        "--backend", choices=COCO_BACKEND_CHOICES, default=None,
        help=f"COCO: the COCOeval implementation, as TEST.COCO_BACKEND (default: {DEFAULT_COCO_BACKEND}, "
        "faster_coco_eval when the faster-coco-eval package imports, else pycocotools; faster_coco_eval needs pip "
        "install faster-coco-eval)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 1 bad input files)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()  # the package's log lines, the COCOeval summary among them, on stdout
    if args.as_devkit and args.format != "voc":
        parser.error("--as-devkit is for --format voc (the devkit's result files)")
    if args.backend is not None and args.format != "coco":
        parser.error("--backend is for --format coco (COCOeval)")
    args.backend = args.backend or DEFAULT_COCO_BACKEND
    if args.report and args.format != "coco":
        parser.error("--report is for --format coco; for a VOC data set, tools/test_det.py --report reports its "
                     "COCO-style evaluation")
    if args.images and not args.report:
        parser.error("--images is for --report (the gallery's images)")
    try:
        if args.format == "coco":
            check_coco_backend(args.backend)  # a missing faster-coco-eval is said before anything is read
        check_outputs(args)
        metrics, evaluation = EVALUATORS[args.format](args)
        if args.json_out:
            write_json_out(args.json_out, metrics)
        if args.report:  # after --json-out: a report that cannot be written loses no metrics
            _write_report(args, evaluation)
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return 1
    if args.json_out:
        print(f"metrics written to {args.json_out}")
    if args.report:
        print(f"report written to {Path(args.report) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
