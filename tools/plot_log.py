#!/usr/bin/env python
"""Plot a training run's curves from its JSON-lines log (OUTPUT_DIR/metrics.jsonl) as PNG files.

    python tools/plot_log.py output/shapes                 # -> output/shapes/plots/*.png
    python tools/plot_log.py output/shapes --out /tmp/plots
    python tools/plot_log.py output/shapes/metrics.jsonl

One PNG per group of quantities: losses.png (the total and each loss term, one panel each), lr.png, time.png
(seconds per iteration and data time), memory.png, and for the evaluation results logged during and after training
eval_<task>.png (e.g. eval_bbox.png: AP, AP50, ...) and eval_<task>_per_class.png. Needs matplotlib
(pip install detectron_res[viz]); works on a run that is still training.

Before any PNG is written, the plots are checked against the log: `--out` and every PNG it would get must not be
(or alias, through `..` or a symlink) the log file; `--out` may be the run folder itself. An `--out` that is a file,
lies under one or is not writable is refused too, in one line naming it, as is a log that is not UTF-8 text.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detectron_res.utils.paths import check_tool_paths, check_writable
from detectron_res.utils.plots import (
    INSTALL_HINT,
    MatplotlibMissingError,
    plot_training_log,
    read_training_log,
    training_plot_paths,
)

TRAIN_LOG_FILE = "metrics.jsonl"  # engine.runner.TRAIN_LOG_FILE, not imported: the runner pulls in torch (seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help=f"a training run's folder (or its {TRAIN_LOG_FILE})")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default: OUTPUT_DIR/plots)")
    return parser


def check_out_dir(out_dir: Path, *, log_file: Path, pngs: Sequence[Path]) -> None:
    """Refuses, before any PNG is written, an --out (or a PNG in it) that is the log file, and an --out that is a
    file, lies under one or is not writable by this user. The log may lie in --out (the run folder): no PNG is named
    metrics.jsonl, and one that resolves to it (a symlink) is refused."""
    check_tool_paths(inputs={"training log": log_file}, outputs={"--out": out_dir, "plot": pngs}, run_folders=["--out"])
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder: give the folder the PNGs go to")
    check_writable(out_dir, flag="--out", folder=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0: plots written, 1: a missing or malformed log, an --out refused or
    unwritable, or no matplotlib)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: the error line only
    source = Path(args.output_dir)
    log_file = source if source.is_file() else source / TRAIN_LOG_FILE
    out_dir = Path(args.out) if args.out else log_file.parent / "plots"
    try:
        records = read_training_log(log_file)
        check_out_dir(out_dir, log_file=log_file, pngs=list(training_plot_paths(records, out_dir).values()))
        try:
            written = plot_training_log(records, out_dir)
        except OSError as error:
            raise OSError(f"could not write the plots to --out {out_dir}: {error}") from error
    except MatplotlibMissingError:
        print(f"{parser.prog}: error: plotting needs matplotlib, which is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    print(f"{len(records)} records of {log_file}, iterations {records[0]['iteration']} to {records[-1]['iteration']}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
