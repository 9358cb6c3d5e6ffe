#!/usr/bin/env python
"""Write the evaluation report of an earlier test run: its metrics, error breakdown, per-class table, curves and worst
images, to browse.

    python tools/report.py output/coco_r50                       # -> output/coco_r50/report/index.html
    python tools/report.py output/coco_r50 --out /tmp/report --gallery 48 --show-score 0.5
    python tools/report.py output/coco_r50/ablation/2 --cfg output/coco_r50/inference/config.yaml

OUTPUT_DIR is the folder `tools/test_det.py` evaluated into (its OUTPUT_DIR): the detections are read from
`OUTPUT_DIR/inference/<data set>/coco_instances_results.json` and evaluated again against each data set of the
config's DATASETS.TEST, as the test run did. The config is `--cfg`, else `OUTPUT_DIR/inference/config.yaml` (the test
run's), else `OUTPUT_DIR/config.yaml` (a training run's), with any KEY=VALUE overrides (e.g. DATASETS.ROOT=...);
OUTPUT_DIR is always the folder given. `tools/test_det.py --report DIR` writes the same report right after testing,
and `tools/eval_det.py --report DIR` for a results json without a run folder. What the page shows:
docs/evaluation.md. Nothing is written until the report's folder has been checked against the files it reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from detectron_res.config import load_config
from detectron_res.engine.logger import setup_logging
from detectron_res.engine.report import add_report_arguments, write_run_reports
from detectron_res.engine.runner import CONFIG_FILE, EVAL_CONFIG_FILE
from detectron_res.engine.tool import run_tool

DEFAULT_REPORT_FOLDER = "report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the folder tools/test_det.py evaluated into")
    parser.add_argument("--cfg", default=None, help=f"the config (default: OUTPUT_DIR/{EVAL_CONFIG_FILE}, else "
                        f"OUTPUT_DIR/{CONFIG_FILE})")
    add_report_arguments(parser, report_help=f"the report's folder (default: OUTPUT_DIR/{DEFAULT_REPORT_FOLDER})")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def find_config(output_dir: Path) -> Path:
    """The test run's config in `output_dir`, else the training run's."""
    for name in (EVAL_CONFIG_FILE, CONFIG_FILE):
        if (output_dir / name).is_file():
            return output_dir / name
    if not output_dir.is_dir():
        raise FileNotFoundError(f"OUTPUT_DIR {output_dir} is not a folder")
    raise FileNotFoundError(f"{output_dir} has neither {EVAL_CONFIG_FILE} nor {CONFIG_FILE}: give the run's config "
                            "with --cfg (is it the folder tools/test_det.py evaluated into?)")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging()
    output_dir = Path(args.output_dir)
    config = Path(args.cfg) if args.cfg else find_config(output_dir)
    cfg = load_config(config, [*args.opts, f"OUTPUT_DIR={output_dir}"])
    report_dir = Path(args.report) if args.report else output_dir / DEFAULT_REPORT_FOLDER
    errors = write_run_reports(cfg, report_dir, gallery_size=args.gallery, show_score=args.show_score,
                               flag="--report" if args.report else "the report folder", inputs={"--cfg": config})
    print(f"report written to {report_dir / 'index.html'}")
    return errors


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:]))
