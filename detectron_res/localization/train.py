"""Training and evaluating the two stages with the detector's engine (trainer, hooks, checkpoints, exact resume).

Stage 1 trains the class-specific RPN into OUTPUT_DIR/rpn. Stage 2 runs that RPN over the training images (the RoI
pool, cached in OUTPUT_DIR/rcnn), then trains the R-CNN stage into OUTPUT_DIR/rcnn with LOC.RCNN's schedule. Each
stage ends with the CLS-LOC metric on DATASETS.TEST, with the ground-truth classes ("loc_oracle") and with predicted
classes ("loc": LOC.CLASSIFIER.WEIGHTS' when set, else the system's own ranking).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.build import build_train_dataset, load_dataset
from ..data.datasets.base import DetectionDataset
from ..engine.checkpoint import Checkpointer
from ..engine.runner import results_folder_name, train
from ..evaluation import write_metrics_json
from ..utils import comm
from ..utils.io import atomic_write, read_torch_file
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
        batch_unit="RoIs (LOC.RCNN.IMS_PER_BATCH)",
    )


def roi_pool(cfg, rpn: LocalizationRPN, dataset: DetectionDataset, *, rpn_checkpoint: Path) -> DetectionDataset:
    """`rcnn_training_records` (the RPN run in LOC.TEST_MODE, so that the R-CNN stage trains on the kind of boxes it
    will re-score), cached in OUTPUT_DIR/rcnn_rois.pth for this RPN checkpoint (its bytes' hash), data set, RPN
    settings and test mode, so that a resumed stage 2 does not run the RPN over the training set again.

    The cache is read with a weights-only load (`read_roi_cache`): a file that cannot be read (truncated by a full
    disk or a killed copy, of an older version, or crafted to run code when unpickled) is made again, with a warning
    naming it and why; nothing in it is run."""
    key = json.dumps(
        {
            "rpn": hashlib.sha256(Path(rpn_checkpoint).read_bytes()).hexdigest(),
            "datasets": list(cfg.DATASETS.TRAIN),
            "images": len(dataset.records),
            "rpn_cfg": {k: v for k, v in cfg.MODEL.RPN.items() if not isinstance(v, dict)},
            "input": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
            "test_mode": [cfg.LOC.TEST_MODE, list(cfg.LOC.TEST_SCALES), cfg.LOC.CROP_SIZE],  # how the RPN saw them
            "fg_iou": cfg.LOC.RCNN.FG_IOU_THRESH,
        },
        sort_keys=True,
    )
    path = Path(cfg.OUTPUT_DIR) / ROI_POOL_FILE
    if path.is_file():
        try:
            cached_key, cached_pool = read_roi_cache(path)
        except ValueError as error:
            logger.warning("%s; making the RoIs again", error)
        else:
            if cached_key == key:
                logger.info("R-CNN training RoIs read from %s", path)
                return cached_pool
            logger.info("%s was made with another RPN, data or settings: making the RoIs again", path)
    pool = rcnn_training_records(
        rpn, dataset, build_localization_test_loader(cfg, dataset), fg_iou_thresh=cfg.LOC.RCNN.FG_IOU_THRESH
    )
    write_roi_cache(path, key=key, pool=pool)
    return pool


# -- the RoI cache: tensors and plain containers only, so that it is read with weights_only=True ------------------
ROI_CACHE_VERSION = 2  # 1: a pickled DetectionDataset with numpy arrays (read only with weights_only=False)
_ARRAY_TAG = "__numpy__"  # {_ARRAY_TAG: [dtype, shape, offset, is_scalar]}: an array's bytes in the cache's buffer
_ARRAY_KINDS = "biufcmMSU"  # numpy dtype kinds that are plain bytes (no Python objects)
_ALIGN = 16


def write_roi_cache(path: str | Path, *, key: str, pool: DetectionDataset) -> None:
    """Writes the RoI pool and its key atomically as plain containers and one byte tensor: each numpy array or
    scalar of the records becomes `{"__numpy__": [dtype, shape, offset, is_scalar]}` pointing into the tensor (one
    tensor for the whole pool, not one per record), so that `read_roi_cache` needs no class from the file."""
    arrays: list[tuple[int, np.ndarray]] = []  # (offset, array) to copy into the buffer
    size = 0

    def encode(value):
        nonlocal size
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if array.dtype.kind not in _ARRAY_KINDS:
                raise TypeError(f"the RoI cache cannot hold a numpy array of dtype {array.dtype}")
            arrays.append((size, array))
            offset, size = size, size + array.nbytes + (-array.nbytes % _ALIGN)
            return {_ARRAY_TAG: [array.dtype.str, list(array.shape), offset, isinstance(value, np.generic)]}
        if isinstance(value, dict):
            if _ARRAY_TAG in value:
                raise ValueError(f"a record holds the key {_ARRAY_TAG!r}, which the RoI cache reserves")
            return {k: encode(v) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(encode(v) for v in value)
        if value is None or type(value) in (str, int, float, bool, bytes) or isinstance(value, torch.Tensor):
            return value
        raise TypeError(f"the RoI cache cannot hold a {type(value).__name__}")

    fields = {field.name: encode(getattr(pool, field.name)) for field in dataclasses.fields(pool)}
    buffer = np.zeros(size, dtype=np.uint8)
    for offset, array in arrays:
        buffer[offset : offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    state = {"version": ROI_CACHE_VERSION, "key": key, "pool": fields, "arrays": torch.from_numpy(buffer)}
    atomic_write(path, lambda stream: torch.save(state, stream))


def read_roi_cache(path: str | Path) -> tuple[str, DetectionDataset]:
    """The key and RoI pool of a `write_roi_cache` file, read with `weights_only=True` (nothing in it can run).

    Raises:
        ValueError: one line naming the file and why it cannot be used: unreadable (`utils.io.read_torch_file`:
            empty, truncated, a pickled object refused, ...), of another version, or not laid out as expected.
    """
    state = read_torch_file(path, what="the R-CNN RoI cache")
    if not isinstance(state, dict) or state.get("version") != ROI_CACHE_VERSION:
        version = state.get("version", 1) if isinstance(state, dict) else "unknown"
        raise ValueError(f"The R-CNN RoI cache {path} is of version {version}, not {ROI_CACHE_VERSION}")
    try:
        arrays = state["arrays"].numpy()

        def decode(value):
            if isinstance(value, dict):
                if set(value) == {_ARRAY_TAG}:
                    dtype, shape, offset, is_scalar = value[_ARRAY_TAG]
                    dtype = np.dtype(dtype)
                    if dtype.kind not in _ARRAY_KINDS:
                        raise TypeError(f"dtype {dtype}")
                    count = int(np.prod(shape, dtype=np.int64))
                    array = arrays[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)
                    return array[()] if is_scalar else array
                return {k: decode(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(decode(v) for v in value)
            return value

        pool = DetectionDataset(**{name: decode(value) for name, value in state["pool"].items()})
        key = state["key"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"The R-CNN RoI cache {path} is damaged ({type(error).__name__}: {error})") from error
    return key, pool
