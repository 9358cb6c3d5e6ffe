"""The paper's Table 9 for one checkpoint: the test-time add-ons switched on one after the other (baseline, + box
refinement with voting, + multi-scale testing), each row evaluated on DATASETS.TEST with its seconds per image.
Global context is a training option: a checkpoint trained with it has it in every row."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..evaluation import InferenceTiming, json_safe
from ..utils import atomic_write_text, comm
from ..modeling.build import build_test_time

logger = logging.getLogger(__name__)

ABLATION_FILE = "ablation.json"

# (row name, the TEST keys it sets); each row keeps the settings of the rows above it
ABLATION_STEPS: tuple[tuple[str, dict[str, bool]], ...] = (
    (
        "baseline",
        {
            "BOX_REFINEMENT.ENABLED": False,
            "BOX_VOTING.ENABLED": False,
            "MULTI_SCALE.ENABLED": False,
            "FLIP": False,
        },
    ),
    ("+ box refinement, voting", {"BOX_REFINEMENT.ENABLED": True, "BOX_VOTING.ENABLED": True}),
    ("+ multi-scale testing", {"MULTI_SCALE.ENABLED": True}),
)


def ablation_configs(cfg) -> list[tuple[str, list[str], object]]:
    """The rows' (name, the overrides that give the row from `cfg`, the row's config), in Table 9's order. Each
    row evaluates into OUTPUT_DIR/ablation/<row number>."""
    rows = []
    settings: dict[str, bool] = {}
    context = " (global context)" if cfg.MODEL.ROI_HEADS.GLOBAL_CONTEXT else ""
    for number, (name, changes) in enumerate(ABLATION_STEPS):
        settings.update(changes)
        row = cfg.clone()
        for dotted, value in settings.items():
            node = row.TEST
            *parents, leaf = dotted.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        row.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / "ablation" / str(number))
        overrides = [f"TEST.{key}={str(value).lower()}" for key, value in settings.items()]
        rows.append((name + (context if number == 0 else ""), overrides, row.freeze()))
    return rows


def run_ablation(cfg, model: torch.nn.Module, evaluate) -> list[dict]:
    """Evaluates `model` once per row of `ablation_configs(cfg)` with `evaluate(row_cfg, model, timing=...)`,
    prints the table, and writes the rows to OUTPUT_DIR/ablation.json: a list of {"name", "overrides",
    "seconds_per_image", and the row's metrics as in metrics.json ("bbox": {"AP", "AP50", ...} in percent)}."""
    rows = []
    for name, overrides, row_cfg in ablation_configs(cfg):
        logger.info("Ablation row %r: %s", name, " ".join(overrides))
        model.test_time = build_test_time(row_cfg)
        timing = InferenceTiming()
        metrics = evaluate(row_cfg, model, timing=timing)
        rows.append({"name": name, **metrics, "seconds_per_image": timing.seconds_per_image, "overrides": overrides})
    model.test_time = build_test_time(cfg)
    if not comm.is_main_process():  # in a distributed job rank 0 writes and prints
        return rows
    path = Path(cfg.OUTPUT_DIR) / ABLATION_FILE
    atomic_write_text(path, json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")
    table = format_ablation_table(rows)
    logger.info("Table 9 ablation (%s):\n%s", path, table)
    print(table)
    return rows


def format_ablation_table(rows: list[dict]) -> str:
    """A text table like the paper's Table 9: one line per row (and per data set when there are several) with
    mAP@.5, mAP@[.5:.95] (COCO box AP, percent) and seconds per image."""
    lines = [f"{'':32s} {'mAP@.5':>8s} {'mAP@[.5:.95]':>13s} {'s/image':>9s}"]
    for row in rows:
        for label, bbox in _bbox_metrics(row):
            name = row["name"] if not label else f"{row['name']} [{label}]"
            lines.append(
                f"{name:32s} {_number(bbox.get('AP50')):>8s} {_number(bbox.get('AP')):>13s} "
                f"{_number(row['seconds_per_image'], 3):>9s}"
            )
    return "\n".join(lines)


def _bbox_metrics(row: dict) -> list[tuple[str, dict]]:
    if "bbox" in row:
        return [("", row["bbox"])]
    return [(name, value["bbox"]) for name, value in row.items() if isinstance(value, dict) and "bbox" in value]


def _number(value: object, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"
