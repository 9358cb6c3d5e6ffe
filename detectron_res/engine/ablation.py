"""The paper's Table 9 for one checkpoint: the test-time add-ons switched on one after the other, each row evaluated
on DATASETS.TEST with its seconds per image. Each row changes one thing from the row above it:

    baseline                 refinement, voting, multi-scale and flip off; NMS at MODEL.ROI_HEADS.NMS_THRESH_TEST
    NMS at 0.3               MODEL.ROI_HEADS.NMS_THRESH_TEST = TEST.BOX_REFINEMENT.NMS_THRESH (the paper's refinement
                             NMSes "using an IoU threshold of 0.3"; left out where the two are already equal, as on VOC)
    + box refinement         TEST.BOX_REFINEMENT.ENABLED
    + box voting             TEST.BOX_VOTING.ENABLED (this row is the paper's "+box refinement" row, which votes)
    + multi-scale testing    TEST.MULTI_SCALE.ENABLED

so that the refinement's gain is not mixed with its NMS threshold's (0.5 -> 0.3 on the COCO configs). Global context
is a training option: a checkpoint trained with it has it in every row."""

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
NMS_KEY = "MODEL.ROI_HEADS.NMS_THRESH_TEST"


def ablation_steps(cfg) -> list[tuple[str, dict[str, object]]]:
    """Table 9's rows as (name, {full config key: value}); each row keeps the settings of the rows above it."""
    refine_nms = cfg.TEST.BOX_REFINEMENT.NMS_THRESH
    return [
        (
            "baseline",
            {
                "TEST.BOX_REFINEMENT.ENABLED": False,
                "TEST.BOX_VOTING.ENABLED": False,
                "TEST.MULTI_SCALE.ENABLED": False,
                "TEST.FLIP": False,
            },
        ),
        (f"NMS at {refine_nms:g}", {NMS_KEY: refine_nms}),
        ("+ box refinement", {"TEST.BOX_REFINEMENT.ENABLED": True}),
        ("+ box voting", {"TEST.BOX_VOTING.ENABLED": True}),
        ("+ multi-scale testing", {"TEST.MULTI_SCALE.ENABLED": True}),
    ]


def ablation_configs(cfg) -> list[dict]:
    """The rows in Table 9's order, each {"name", "changes": {full key: value} that differ from the row above (the
    first row: from `cfg`), "overrides": the KEY=VALUE arguments that give the row from `cfg`, "nms_thresh": the IoU
    of the detections' NMS in effect, "config": the row's config}. A step that would change nothing (its keys
    already have its values) is left out. Each row evaluates into OUTPUT_DIR/ablation/<row number>."""
    rows = []
    settings: dict[str, object] = {}
    previous = cfg
    context = " (global context)" if cfg.MODEL.ROI_HEADS.GLOBAL_CONTEXT else ""
    for name, step in ablation_steps(cfg):
        changes = {key: value for key, value in step.items() if _get(previous, key) != value}
        if rows and not changes:
            logger.info("Ablation row %r left out: %s already in effect", name, _arguments(step))
            continue
        settings.update(step)
        row = cfg.clone()
        for key, value in settings.items():
            _set(row, key, value)
        row.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / "ablation" / str(len(rows)))
        rows.append({
            "name": name + (context if not rows else ""),
            "changes": changes,
            "overrides": _arguments(settings),
            "nms_thresh": detections_nms_thresh(row),
            "config": row.freeze(),
        })
        previous = row
    return rows


def detections_nms_thresh(cfg) -> float:
    """The IoU threshold of the per-class NMS on the detections: the refinement's when it is on, else the head's."""
    refine_nms = build_test_time(cfg).refine_nms_thresh
    return cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST if refine_nms is None else refine_nms


def apply_row(model: torch.nn.Module, row_cfg) -> None:
    """What a row sets in the loaded model: its test-time add-ons and its detections' NMS threshold."""
    model.test_time = build_test_time(row_cfg)
    model.roi_heads.predictor.nms_thresh = row_cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST


def run_ablation(cfg, model: torch.nn.Module, evaluate) -> list[dict]:
    """Evaluates `model` once per row of `ablation_configs(cfg)` with `evaluate(row_cfg, model, timing=...)`,
    prints the table with each row's changes, and writes the rows to OUTPUT_DIR/ablation.json: a list of {"name",
    "changes", "nms_thresh", "overrides", "seconds_per_image", and the row's metrics as in metrics.json ("bbox":
    {"AP", "AP50", ...} in percent)}."""
    rows = []
    for row in ablation_configs(cfg):
        logger.info("Ablation row %r: %s (changed: %s)", row["name"], " ".join(row["overrides"]),
                    _arguments(row["changes"]))
        apply_row(model, row["config"])
        timing = InferenceTiming()
        metrics = evaluate(row["config"], model, timing=timing)
        rows.append({
            "name": row["name"], **metrics, "seconds_per_image": timing.seconds_per_image,
            "changes": row["changes"], "nms_thresh": row["nms_thresh"], "overrides": row["overrides"],
        })
    apply_row(model, cfg)
    if not comm.is_main_process():  # in a distributed job rank 0 writes and prints
        return rows
    path = Path(cfg.OUTPUT_DIR) / ABLATION_FILE
    atomic_write_text(path, json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")
    table = format_ablation_table(rows)
    logger.info("Table 9 ablation (%s):\n%s", path, table)
    print(table)
    return rows


def _get(cfg, key: str) -> object:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def _arguments(settings: dict[str, object]) -> list[str]:
    """{key: value} -> ["KEY=value", ...] as the command line takes them (booleans in lower case)."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in settings.items()]


def format_ablation_table(rows: list[dict]) -> str:
    """A text table like the paper's Table 9: one line per row (and per data set when there are several) with
    mAP@.5, mAP@[.5:.95] (COCO box AP, percent), seconds per image, the NMS threshold in effect and the keys the row
    changed from the row above."""
    lines = [f"{'':32s} {'mAP@.5':>8s} {'mAP@[.5:.95]':>13s} {'s/image':>9s} {'NMS':>5s}  changed from the row above"]
    for row in rows:
        for label, bbox in _bbox_metrics(row):
            name = row["name"] if not label else f"{row['name']} [{label}]"
            lines.append(
                f"{name:32s} {_number(bbox.get('AP50')):>8s} {_number(bbox.get('AP')):>13s} "
                f"{_number(row['seconds_per_image'], 3):>9s} {row['nms_thresh']:>5g}  "
                + (" ".join(_arguments(row["changes"])) or "-")
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
