"""PNG plots drawn with matplotlib: training curves from a run's `metrics.jsonl`, and after an evaluation the
per-class precision-recall curves and a per-class AP bar chart.

matplotlib is optional (`pip install detectron_res[viz]`): it is imported inside the functions that draw, never
at import time, so the package works without it. Figures are drawn off screen on matplotlib's Agg canvas
(`matplotlib.figure.Figure`, not `pyplot`), so no window opens and no global backend is changed. A drawing
function called without matplotlib raises `MatplotlibMissingError` (an `ImportError`) naming the extra.

Reading the training log and sorting its quantities into groups (`read_training_log`, `training_curve_groups`)
are plain Python, numbers in and numbers out, so they are tested without drawing anything.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install detectron_res[viz]"
DPI = 100


class MatplotlibMissingError(ImportError):
    """Drawing was asked for but matplotlib is not installed."""


class ClassCurvesLike(Protocol):
    """What the evaluation plots take per class (`detectron_res.evaluation.pr_curves.ClassCurves`)."""

    name: str
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ap: Mapping[str, float | None]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (and so whether the plots can be drawn)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float, height: float):
    """A matplotlib Figure of `width` x `height` inches on its own Agg canvas (no pyplot, no window)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MatplotlibMissingError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from error
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


# -- training log -------------------------------------------------------------------------------------------------
def read_training_log(path: str | Path) -> list[dict[str, float]]:
    """The records of a JSON-lines training log (`metrics.jsonl`, see `engine.events.JSONWriter`): one dict per line
    with an int `iteration` and number (or null) values. Blank lines are skipped. A last line that does not parse
    and has no newline is a record being written (a run still training, or killed mid-write): it is left out with
    a warning.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not UTF-8 text (a binary file), the log holds no record, or a line is not a JSON
            object with an int "iteration" and numbers (the message names the file and the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path} (training writes it as OUTPUT_DIR/metrics.jsonl)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}), so not a "
            "training log (training writes OUTPUT_DIR/metrics.jsonl, JSON lines)"
        ) from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning("%s, line %d: half-written last record left out (%s)", path, number, error.msg)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}): {_clip(line)}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}: {_clip(line)}")
        iteration = record.get("iteration")
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise ValueError(f"{path}, line {number}: no integer 'iteration' in {_clip(line)}")
        for key, value in record.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}, line {number}: {key!r} is {value!r}, not a number")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty training log, no records to plot")
    return records


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class CurveGroup:
    """Quantities drawn in one PNG: `series` name -> (iterations, values), each on its own axes when `split`."""

    title: str
    ylabel: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    split: bool = False  # one axes per series (loss terms have different scales) instead of all on one
    markers: bool = False  # points joined by lines (evaluation results: few points)

    def add(self, name: str, iteration: int, value: float) -> None:
        iterations, values = self.series.setdefault(name, ([], []))
        iterations.append(iteration)
        values.append(value)


TRAINING_GROUPS: dict[str, tuple[str, str, bool]] = {  # file stem -> (title, y label, one axes per series)
    "losses": ("Training losses (medians over the logging window)", "loss", True),
    "lr": ("Learning rate", "learning rate", False),
    "time": ("Seconds per iteration (medians)", "seconds", False),
    "memory": ("Peak memory", "MiB", False),
    "other": ("Other scalars", "value", True),
}


def _training_group(name: str) -> tuple[str, str]:
    """(file stem, series name) of a training-log quantity."""
    if name == "total_loss" or name.startswith("loss"):
        return "losses", name
    if name == "lr":
        return "lr", name
    if name in ("time", "data_time"):
        return "time", name
    if name == "memory_mb":
        return "memory", name
    if "/" not in name:
        return "other", name
    # evaluation results, flattened by engine.hooks.scalar_metrics: "bbox/AP", "set_a/bbox/AP50", "bbox/AP-cat",
    # "voc/mAP_07", "voc/per_class/cat/AP_area"
    if "/per_class/" in name:
        task, metric = name.split("/per_class/", 1)
        return f"eval_{task} per class", metric
    task, metric = name.rsplit("/", 1)
    if metric.startswith("AP-"):
        return f"eval_{task} per class", metric[3:]
    return f"eval_{task}", metric


def training_curve_groups(records: Iterable[Mapping[str, Any]]) -> dict[str, CurveGroup]:
    """The training log's quantities sorted into the plots: file stem -> `CurveGroup`.

    "losses" (total_loss first, then each loss term in order of appearance, one axes each), "lr", "time" (time and
    data_time), "memory" (memory_mb), one "eval_<task>" per evaluation task with its summary metrics (e.g.
    `eval_bbox`: AP, AP50, ...; with several test sets `eval_<set>/bbox`), "eval_<task> per class" for the
    per-class APs, and "other" for any other scalar. Null values are left out. Groups without values are absent.
    """
    groups: dict[str, CurveGroup] = {}
    for record in records:
        iteration = int(record["iteration"])
        names = sorted((k for k in record if k != "iteration"), key=lambda k: (k != "total_loss",))  # total first
        for name in names:
            value = record[name]
            if value is None:
                continue
            stem, series = _training_group(name)
            if stem not in groups:
                if stem.startswith("eval_"):
                    task = stem[len("eval_") :]
                    groups[stem] = CurveGroup(title=f"Evaluation: {task}", ylabel=_eval_unit(task), markers=True)
                else:
                    title, ylabel, split = TRAINING_GROUPS[stem]
                    groups[stem] = CurveGroup(title=title, ylabel=ylabel, split=split)
            groups[stem].add(series, iteration, float(value))
    order = list(TRAINING_GROUPS)
    return dict(sorted(groups.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0])))


def _eval_unit(task: str) -> str:
    """The y label of an evaluation task's plot: COCO's bbox metrics are percentages, VOC's fractions."""
    base = task.removesuffix(" per class").rsplit("/", 1)[-1]
    return {"bbox": "AP (%)", "voc": "AP (fraction)"}.get(base, "value")


def file_stem(name: str) -> str:
    """A group name as a file name stem: characters other than letters, digits, '.', '-' and '_' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "plot"


def _grid(count: int, max_columns: int) -> tuple[int, int]:
    columns = max(1, min(count, max_columns))
    return math.ceil(count / columns), columns


def plot_curve_group(group: CurveGroup, path: str | Path) -> Path:
    """One PNG of a `CurveGroup`: its series against the iteration, on one axes or one axes each."""
    names = list(group.series)
    rows, columns = _grid(len(names), 3) if group.split else (1, 1)
    figure = _new_figure(4.2 * columns if group.split else 7.0, 3.0 * rows + 0.6)
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    style = {"marker": "o", "markersize": 4} if group.markers else {}
    for index, name in enumerate(names):
        iterations, values = group.series[name]
        ax = axes[index] if group.split else axes[0]
        ax.plot(iterations, values, label=name, linewidth=1.2, **style)
        if group.split:
            ax.set_title(name, fontsize=10)
    for ax in axes[: len(names) if group.split else 1]:
        ax.set_xlabel("iteration")
        ax.set_ylabel(group.ylabel)
        ax.grid(True, alpha=0.3)
        if not group.split:
            ax.legend(fontsize=8, loc="best", ncol=1 + len(names) // 12)
    for ax in axes[len(names) if group.split else 1 :]:
        ax.set_visible(False)
    figure.suptitle(group.title)
    figure.tight_layout()
    return _save(figure, path)


def plot_training_log(log: str | Path | Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """The training curves of a run: one PNG per group of `training_curve_groups` in `out_dir` (losses.png,
    lr.png, time.png, memory.png, eval_bbox.png, ...). `log` is the path of a `metrics.jsonl` or its records.
    Returns the files written.

    Raises:
        FileNotFoundError, ValueError: see `read_training_log`.
        MatplotlibMissingError: matplotlib is not installed.
    """
    records = read_training_log(log) if isinstance(log, (str, Path)) else list(log)
    _new_figure(1, 1)  # fail early, before any file is written, without matplotlib
    paths = training_plot_paths(records, out_dir)
    return [plot_curve_group(group, paths[stem]) for stem, group in training_curve_groups(records).items()]


def training_plot_paths(records: Iterable[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Where `plot_training_log` writes each group of `training_curve_groups(records)`: file stem -> PNG path in
    `out_dir` (for checking them against the tool's inputs before anything is drawn)."""
    return {stem: Path(out_dir) / f"{file_stem(stem)}.png" for stem in training_curve_groups(records)}


# -- evaluation ---------------------------------------------------------------------------------------------------
def plot_pr_curves(classes: Sequence[ClassCurvesLike], path: str | Path, *, title: str) -> Path:
    """One PNG with an axes per class: its precision-recall curves (each `curves` entry) and its APs in the axes'
    title; a class whose curves are undefined (no ground truth) says so. A curve is drawn as steps, each point's
    precision held over the recall interval up to it, from recall 0 (the first point's precision), so that the
    area under a monotone curve is its area AP."""
    rows, columns = _grid(len(classes), 4)
    figure = _new_figure(3.2 * columns, 2.9 * rows + 0.6)
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax, item in zip(axes, classes):
        aps = "  ".join(f"{label} {_format_ap(value)}" for label, value in item.ap.items())
        ax.set_title(f"{item.name}\n{aps}", fontsize=9)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        if not item.curves:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            continue
        for number, (label, (recall, precision)) in enumerate(item.curves.items()):
            recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
            if recall.size and recall[0] > 0:
                recall, precision = np.concatenate(([0.0], recall)), np.concatenate((precision[:1], precision))
            ax.plot(recall, precision, label=label, linewidth=1.2, drawstyle="steps-pre",
                    linestyle=("-", "--", ":", "-.")[number % 4])
        ax.legend(fontsize=7, loc="best")
    for index, ax in enumerate(axes):
        if index >= len(classes):
            ax.set_visible(False)
        elif index % columns == 0:
            ax.set_ylabel("precision", fontsize=8)
        if index < len(classes) and index + columns >= len(classes):
            ax.set_xlabel("recall", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_ap_bars(classes: Sequence[ClassCurvesLike], path: str | Path, *, title: str) -> Path:
    """One PNG of horizontal bars: per class (top to bottom in class order) a bar for each of its APs (percent);
    an undefined AP is marked "n/a"."""
    labels = list(dict.fromkeys(label for item in classes for label in item.ap))
    count = max(len(labels), 1)
    bar = 0.8 / count
    figure = _new_figure(8.0, 0.9 + 0.28 * len(classes) * max(count, 1.5))
    ax = figure.subplots()
    positions = np.arange(len(classes))[::-1].astype(np.float64)
    for index, label in enumerate(labels):
        values = [item.ap.get(label) for item in classes]
        offsets = positions + 0.4 - bar * (index + 0.5)
        ax.barh(offsets, [0.0 if v is None else v for v in values], height=bar * 0.9, label=label)
        for offset, value in zip(offsets, values):
            text = "n/a" if value is None else f"{value:.1f}"
            ax.text((value or 0.0) + 1.0, offset, text, va="center", fontsize=7)
    ax.set_yticks(positions)
    ax.set_yticklabels([item.name for item in classes], fontsize=8)
    ax.set_xlim(0.0, 110.0)
    ax.set_ylim(-0.6, len(classes) - 0.4)
    ax.set_xlabel("AP (%)")
    ax.grid(True, axis="x", alpha=0.3)
    if labels:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def _format_ap(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
