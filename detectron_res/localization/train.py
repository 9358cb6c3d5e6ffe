"""Training and evaluating the two stages with the detector's engine (trainer, hooks, checkpoints, exact resume).

Stage 1 trains the class-specific RPN into OUTPUT_DIR/rpn. Stage 2 runs that RPN over the training images (the RoI
pool, cached in OUTPUT_DIR/rcnn), then trains the R-CNN stage into OUTPUT_DIR/rcnn with LOC.RCNN's schedule. Each
stage ends with the CLS-LOC metric on DATASETS.TEST, with the ground-truth classes ("loc_oracle") and with predicted
classes ("loc": LOC.CLASSIFIER.WEIGHTS' when set, else the system's own ranking).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from ..data.build import build_train_dataset, load_dataset
from ..data.datasets.base import DetectionDataset
from ..engine.checkpoint import Checkpointer
from ..engine.runner import results_folder_name, train
from ..evaluation import write_metrics_json
from ..utils import comm
from ..utils.io import atomic_write
from .build import (
    RPN_FOLDER,
    build_class_predictor,
    build_localization_rpn,
    build_localization_test_loader,
    build_rcnn_localizer,
    build_rcnn_train_loader,
    build_rpn_train_loader,
    classifier_weights,
    rcnn_stage_config,
    rpn_stage_config,
)
from .pipeline import (
    LocalizationEvaluator,
    Localizer,
    oracle_class_table,
    rcnn_training_records,
    run_localizer,
)
from .rcnn_stage import RCNNLocalizer
from .rpn_stage import LocalizationRPN

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ROI_POOL_FILE = "rcnn_rois.pth"


def evaluate_localizer(
    cfg, rpn: LocalizationRPN, rcnn: RCNNLocalizer | None = None, *, classifier: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The CLS-LOC errors on every data set of DATASETS.TEST, with the ground-truth classes ("loc_oracle") and with
    predicted classes ("loc": the top 5 of a torchvision `classifier` state_dict when given, else the system's own
    ranking, see `Localizer`); written to OUTPUT_DIR/metrics.json. One test data set: {"loc_oracle": {...}, "loc":
    {...}}; several: keyed by name."""
    modes = [(m, m.training) for m in (rpn, rcnn) if m is not None]
    classify = build_class_predictor(cfg, classifier) if classifier is not None else None
    results = {}
    for name in cfg.DATASETS.TEST:
        dataset = load_dataset(cfg, name)
        loader = build_localization_test_loader(cfg, dataset)
        evaluator = LocalizationEvaluator(dataset)
        metrics = {}
        sources = [("loc_oracle", oracle_class_table(dataset), None), ("loc", None, classify)]
        for task, table, predictor in sources:
            localizer = Localizer(
                rpn=rpn, rcnn=rcnn, classes=table, classify=predictor, classes_per_image=cfg.LOC.CLASSES_PER_IMAGE
            )
            metrics[task] = run_localizer(localizer.eval(), loader, evaluator, progress=progress)["loc"]
            logger.info(
                "%s, %s: top-1 loc err %.2f%%, top-5 loc err %.2f%%, top-5 cls err %.2f%% (%d images)",
                name, task, 100 * metrics[task]["top1_loc_err"], 100 * metrics[task]["top5_loc_err"],
                100 * metrics[task]["top5_cls_err"], metrics[task]["num_images"],
            )
        write_metrics_json(Path(cfg.OUTPUT_DIR) / "inference" / results_folder_name(name) / METRICS_FILE, metrics)
        results[name] = metrics
    output = next(iter(results.values())) if len(results) == 1 else results
    if results:
        write_metrics_json(Path(cfg.OUTPUT_DIR) / METRICS_FILE, output)
    for module, was_training in modes:
        module.train(was_training)
    return output


def load_stage(model: torch.nn.Module, path: str | Path) -> dict:
    """Loads a stage's checkpoint (exact fit) into `model` and puts it in eval mode; returns the checkpoint's
    metadata."""
    extra = Checkpointer(model=model, save_dir=Path(path).parent).load(path)
    model.eval()
    return dict(extra.get("metadata") or {})


def last_stage_checkpoint(stage_dir: Path, what: str) -> Path:
    path = Checkpointer(model=torch.nn.Module(), save_dir=stage_dir).last_checkpoint()
    if path is None:
        raise FileNotFoundError(f"no {what} checkpoint in {stage_dir}: train that stage first (tools/train_loc.py)")
    return path


def train_rpn_stage(cfg, *, resume: bool = False) -> dict:
    """Stage 1: the class-specific RPN on random crops of DATASETS.TRAIN, into OUTPUT_DIR/rpn."""
    stage = rpn_stage_config(cfg)
    model = build_localization_rpn(stage)
    with comm.main_process_first():  # rank 0 generates a synthetic data set; the others then read it
        dataset = build_train_dataset(stage)
    return train(
        stage,
        resume=resume,
        model=model,
        dataset=dataset,
        build_loader=build_rpn_train_loader,
        evaluate_fn=lambda m: evaluate_localizer(stage, m, classifier=classifier_weights(cfg)),
    )


def train_rcnn_stage(cfg, *, rpn_checkpoint: str | Path | None = None, resume: bool = False) -> dict:
    """Stage 2: the R-CNN stage on the trained RPN's boxes of the training images, into OUTPUT_DIR/rcnn.

    `rpn_checkpoint` defaults to the newest checkpoint in OUTPUT_DIR/rpn."""
    rpn_checkpoint = Path(rpn_checkpoint or last_stage_checkpoint(Path(cfg.OUTPUT_DIR) / RPN_FOLDER, "RPN-stage"))
    stage = rcnn_stage_config(cfg)
    rpn = build_localization_rpn(cfg)
    load_stage(rpn, rpn_checkpoint)
    with comm.main_process_first():  # in a distributed job rank 0 makes the pool and the others read its cache
        dataset = build_train_dataset(stage)
        pool = roi_pool(stage, rpn, dataset, rpn_checkpoint=rpn_checkpoint)
    return train(
        stage,
        resume=resume,
        model=build_rcnn_localizer(stage),
        dataset=pool,
        build_loader=build_rcnn_train_loader,
        evaluate_fn=lambda m: evaluate_localizer(stage, rpn, m, classifier=classifier_weights(cfg)),
    )


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def roi_pool(cfg, rpn: LocalizationRPN, dataset: DetectionDataset, *, rpn_checkpoint: Path) -> DetectionDataset:
    """`rcnn_training_records`, cached in OUTPUT_DIR/rcnn_rois.pth for this RPN checkpoint (its bytes' hash), data
    set and RPN settings, so that a resumed stage 2 does not run the RPN over the training set again."""
    key = json.dumps(
        {
            "rpn": hashlib.sha256(Path(rpn_checkpoint).read_bytes()).hexdigest(),
            "datasets": list(cfg.DATASETS.TRAIN),
            "images": len(dataset.records),
            "rpn_cfg": {k: v for k, v in cfg.MODEL.RPN.items() if not isinstance(v, dict)},
            "input": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
            "fg_iou": cfg.LOC.RCNN.FG_IOU_THRESH,
        },
        sort_keys=True,
    )
    path = Path(cfg.OUTPUT_DIR) / ROI_POOL_FILE
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached.get("key") == key:
            logger.info("R-CNN training RoIs read from %s", path)
            return cached["pool"]
        logger.info("%s was made with another RPN, data or settings: making the RoIs again", path)
    pool = rcnn_training_records(
        rpn, dataset, build_localization_test_loader(cfg, dataset), fg_iou_thresh=cfg.LOC.RCNN.FG_IOU_THRESH
    )

    atomic_write(path, lambda stream: stream.write(_torch_bytes({"key": key, "pool": pool})))
    return pool
