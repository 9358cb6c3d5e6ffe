"""Evaluation reports of a run folder: what `tools/test_det.py --report` and `tools/report.py` write.

A test run leaves, per data set of `DATASETS.TEST`, its detections in
`OUTPUT_DIR/inference/<data set>/coco_instances_results.json` and its config in `OUTPUT_DIR/inference/config.yaml`.
`write_run_reports` evaluates those detections again against the data set's ground truth, as the test run did (the
same images, the same COCOeval backend), and writes `evaluation.report.write_report`'s `index.html` and
`errors.json`: into the report folder itself for one data set, into `<report folder>/<data set>/` for several, with
an `index.html` and `errors.json` over them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.build import load_dataset
from ..evaluation.coco import RESULTS_FILE_NAME, dataset_ground_truth, run_coco_evaluation
from ..evaluation.report import (
    DEFAULT_GALLERY_SIZE,
    DEFAULT_SHOW_SCORE,
    ERRORS_FILE,
    REPORT_FILE,
    write_report,
    write_report_index,
)
from ..utils.paths import check_tool_paths, check_writable
from .runner import results_folder_name


def add_report_arguments(parser: argparse.ArgumentParser, *, report_help: str) -> None:
    """`--report DIR` (help `report_help`), `--gallery N` and `--show-score S`."""
    parser.add_argument("--report", default=None, metavar="DIR", help=report_help)
    parser.add_argument(
        "--gallery", type=_non_negative_int, default=DEFAULT_GALLERY_SIZE, metavar="N",
        help=f"the report's gallery shows the N images with the most errors (default {DEFAULT_GALLERY_SIZE})",
    )
    parser.add_argument(
        "--show-score", type=_unit_float, default=DEFAULT_SHOW_SCORE, metavar="S",
        help=f"the gallery draws the detections scoring at least S (default {DEFAULT_SHOW_SCORE})",
    )


def report_files(report_dir: str | os.PathLike, folders: Sequence[str]) -> list[Path]:
    """The files a report of the data sets whose results folders are `folders` writes under `report_dir`."""
    report_dir = Path(report_dir)
    files = [report_dir / REPORT_FILE, report_dir / ERRORS_FILE]
    if len(folders) > 1:
        files += [report_dir / folder / name for folder in folders for name in (REPORT_FILE, ERRORS_FILE)]
    return files


def check_report_dir(
    report_dir: str | os.PathLike,
    *,
    inputs: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike] | None],
    folders: Sequence[str] = ("",),
    flag: str = "--report",
) -> None:
    """Refuses, before any work and in one line, a report whose files would overwrite an input or another of its
    files, or whose folder cannot be created or written (`utils.paths.check_tool_paths`, `check_writable`)."""
    check_tool_paths(inputs=inputs, outputs={flag: report_files(report_dir, folders)})
    if Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise NotADirectoryError(f"{flag} {report_dir} is a file: give the folder to write the report into")
    check_writable(report_dir, flag=flag, folder=True)


def write_run_reports(
    cfg,
    report_dir: str | os.PathLike,
    *,
    gallery_size: int = DEFAULT_GALLERY_SIZE,
    show_score: float = DEFAULT_SHOW_SCORE,
    flag: str = "--report",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> dict:
    """The reports of the test run in `cfg.OUTPUT_DIR` (module docstring); returns errors.json's content, one data
    set's `{"bbox": ...}` or `{name: {"bbox": ...}}` for several. `flag` names the report folder in errors; `inputs`
    are more files it must not overwrite (e.g. {"--cfg": path}), besides the detections and the ground truth.

    Raises:
        ValueError: DATASETS.TEST is empty.
        FileNotFoundError: a data set's detections are not in the run folder (the message names the file).
        PathConflictError, OSError: a report file would overwrite the ground truth or the detections, or cannot
            be written.
    """
    names = list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("DATASETS.TEST is empty: there is no evaluation to report (set it to the data sets tested)")
    folders = [results_folder_name(name) for name in names]
    report_dir = Path(report_dir)
    reports = {}
    for name, folder in zip(names, folders):
        results = Path(cfg.OUTPUT_DIR) / "inference" / folder / RESULTS_FILE_NAME
        if not results.is_file():
            raise FileNotFoundError(
                f"{results}: no detections of data set {name!r} in the run folder {cfg.OUTPUT_DIR}; run "
                "tools/test_det.py with this config first"
            )
        dataset = load_dataset(cfg, name)
        read = {"the detections": results, "the ground truth": dataset.json_file, **(inputs or {})}
        check_report_dir(report_dir, inputs=read, folders=folders, flag=flag)
        evaluation = run_coco_evaluation(
            dataset_ground_truth(dataset), results, img_ids=[record["image_id"] for record in dataset.records],
            backend=cfg.TEST.COCO_BACKEND,
        )
        reports[name] = write_report(
            report_dir if len(names) == 1 else report_dir / folder,
            evaluation,
            image_files={record["image_id"]: record["file_name"] for record in dataset.records},
            title=f"{name}: evaluation report",
            sources={"data set": name, "ground truth": dataset.json_file or "built from the data set's records",
                     "detections": str(results), "run folder": str(cfg.OUTPUT_DIR)},
            gallery_size=gallery_size,
            show_score=show_score,
        )
    if len(names) > 1:
        write_report_index(report_dir, {folder: reports[name] for name, folder in zip(names, folders)},
                           title=f"Evaluation reports of {cfg.OUTPUT_DIR}")
    return reports[names[0]] if len(names) == 1 else reports


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value
