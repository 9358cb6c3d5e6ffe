#!/usr/bin/env python
"""Plot a training run's curves from its JSON-lines log (OUTPUT_DIR/metrics.jsonl) as PNG files.

    python tools/plot_log.py output/shapes                 # -> output/shapes/plots/*.png
    python tools/plot_log.py output/shapes --out /tmp/plots
    python tools/plot_log.py output/shapes/metrics.jsonl

One PNG per group of quantities: losses.png (the total and each loss term, one panel each), lr.png, time.png
(seconds per iteration and data time), memory.png, and for the evaluation results logged during and after training
eval_<task>.png (e.g. eval_bbox.png: AP, AP50, ...) and eval_<task>_per_class.png. Needs matplotlib
(pip install detectron_res[viz]); works on a run that is still training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detectron_res.utils.plots import INSTALL_HINT, MatplotlibMissingError, plot_training_log, read_training_log

TRAIN_LOG_FILE = "metrics.jsonl"  # engine.runner.TRAIN_LOG_FILE, not imported: the runner pulls in torch (seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help=f"a training run's folder (or its {TRAIN_LOG_FILE})")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default: OUTPUT_DIR/plots)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0: plots written, 1: a missing or malformed log, or no matplotlib)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = Path(args.output_dir)
    log_file = source if source.is_file() else source / TRAIN_LOG_FILE
    out_dir = Path(args.out) if args.out else log_file.parent / "plots"
    try:
        records = read_training_log(log_file)
        written = plot_training_log(records, out_dir)
    except MatplotlibMissingError:
        print(f"{parser.prog}: error: plotting needs matplotlib, which is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"{len(records)} records of {log_file}, iterations {records[0]['iteration']} to {records[-1]['iteration']}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
