"""What the tools run: argument parsing and set-up, training with hooks, and evaluation over DATASETS.TEST."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import load_config, save_config
from ..data.datasets.base import DetectionDataset
from ..data.build import build_test_data_loader, build_train_data_loader, build_train_dataset, load_dataset
from ..evaluation import InferenceTiming, inference_on_dataset, write_metrics_json
from ..evaluation.build import build_evaluator
from ..modeling import build_model
from ..utils import remove_orphaned_temporary_files
from .checkpoint import Checkpointer
from .events import ConsoleWriter, JSONWriter
from .hooks import EvalHook, IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter
from .logger import setup_logging
from .solver import build_lr_scheduler, build_optimizer
from .trainer import Trainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
EVAL_CONFIG_FILE = "inference/config.yaml"  # evaluation tools keep a training run's config.yaml as it is


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    """`--cfg`, `--output` and trailing `KEY=VALUE` overrides; parse with `parse_args`, which lets flags come
    before, between or after the overrides."""
    parser = argparse.ArgumentParser(
        description=description, epilog="KEY=VALUE arguments override config keys, e.g. SOLVER.BASE_LR=0.02"
    )
    parser.add_argument("--cfg", required=True, help="config file (YAML)")
    parser.add_argument("--output", default=None, help="output folder (default: the config's OUTPUT_DIR)")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags and `KEY=VALUE` overrides in any order (`... SOLVER.IMS_PER_BATCH=8 --resume`)."""
    return parser.parse_intermixed_args(argv)


def setup(args: argparse.Namespace, *, config_file: str | None = CONFIG_FILE):
    """Loads the config (file, overrides, --output), prepares the output folder and logging, saves the resolved
    config as `OUTPUT_DIR/<config_file>` (None: not here; training writes it once its checks passed), seeds every
    random generator. Returns the frozen config."""
    overrides = list(args.opts)
    if args.output is not None:
        overrides.append(f"OUTPUT_DIR={args.output}")
    cfg = load_config(args.cfg, overrides)
    output_dir = Path(cfg.OUTPUT_DIR)
    setup_logging(output_dir)
    remove_orphaned_temporary_files(output_dir)
    logger.info("Config %s with overrides %s", args.cfg, overrides)
    if config_file is not None:
        save_config(cfg, output_dir / config_file)
        logger.info("Resolved config saved to %s", output_dir / config_file)
    seed_everything(cfg.SEED)
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_tool(main: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Runs a tool's `main(argv)`; an error it stops on (bad config, missing file, unreadable image, diverged
    training, a dead data-loading worker, ...) prints one line to stderr and returns 1, and its traceback goes to
    the output folder's log.txt when logging to one had started. Other exceptions (bugs) propagate with their
    traceback."""
    try:
        main(list(argv))
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        message = error_summary(error)
        package_logger = logging.getLogger("detectron_res")
        record = package_logger.makeRecord(
            package_logger.name, logging.ERROR, __file__, 0, "Stopped: %s", (message,), (type(error), error, error.__traceback__)
        )
        for handler in package_logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        return 1
    return 0


def error_summary(error: BaseException) -> str:
    """The message of `error` and its notes; for an error re-raised from a data-loading worker (whose message holds
    the worker's traceback), the worker's own last line, e.g. `BadImageError: truncated JPEG ...: a.jpg`."""
    message = str(error).strip() or type(error).__name__
    if "Original Traceback" in message:
        message = message.splitlines()[-1].strip()
    return " ".join([message, *getattr(error, "__notes__", ())])


def evaluate(
    cfg, model: torch.nn.Module, *, progress: bool = True, timing: InferenceTiming | None = None
) -> dict:
    """Evaluates `model` on every data set of DATASETS.TEST; writes results and `<OUTPUT_DIR>/metrics.json`.
    `timing`, when given, gets the images and seconds of the inference loops added.

    Returns {"bbox": {...}, ...} for one test data set, {name: {...}} for several.
    """
    results = {}
    for name in cfg.DATASETS.TEST:
        dataset = load_dataset(cfg, name)
        output_dir = Path(cfg.OUTPUT_DIR) / "inference" / results_folder_name(name)
        evaluator = build_evaluator(dataset, output_dir=output_dir)
        loader = build_test_data_loader(cfg, dataset)
        logger.info("Evaluating on %s (%d images)", name, len(dataset))
        results[name] = inference_on_dataset(model, loader, evaluator, progress=progress, timing=timing)
        log_metrics_summary(name, results[name])
    if len(results) == 1:
        results = next(iter(results.values()))
    if results:
        write_metrics_json(Path(cfg.OUTPUT_DIR) / METRICS_FILE, results)
    return results


def results_folder_name(dataset_name: str) -> str:
    """Folder for a data set's results: its name, or the json file's stem for "ANNOTATIONS.json:IMAGES"."""
    if ".json:" in dataset_name:
        return Path(dataset_name.split(".json:", 1)[0]).name
    return dataset_name


def log_metrics_summary(name: str, metrics: dict) -> None:
    """One line per task with its main numbers, e.g. `bbox: AP 51.2 AP50 73.0 ...`."""
    for task, values in metrics.items():
        main = {k: v for k, v in values.items() if isinstance(v, (int, float)) and "-" not in k}
        logger.info("%s %s: %s", name, task, "  ".join(f"{k} {v:.2f}" if task == "bbox" else f"{k} {v:.4f}" for k, v in main.items()))


def warn_about_random_frozen_trunk(backbone_cfg) -> None:
    """Training starts from no weights at all: say so when the trunk cannot learn from scratch (FrozenBN's
    identity statistics leave a deep random ResNet's activations unnormalised; a frozen stem stays random)."""
    problems = []
    if backbone_cfg.NORM == "FrozenBN":
        problems.append("MODEL.BACKBONE.NORM=FrozenBN keeps identity statistics, so activations grow with depth")
    if backbone_cfg.FREEZE_AT > 0:
        problems.append(f"MODEL.BACKBONE.FREEZE_AT={backbone_cfg.FREEZE_AT} keeps random layers frozen")
    if problems:
        logger.warning(
            "Training from random weights (MODEL.BACKBONE.WEIGHTS and MODEL.WEIGHTS are empty) while %s: "
            "good for checking the plumbing, not for accuracy. Set MODEL.BACKBONE.WEIGHTS to ImageNet weights "
            "(docs/models.md), or train from scratch with MODEL.BACKBONE.NORM=BN (or GN) MODEL.BACKBONE.FREEZE_AT=0.",
            "; ".join(problems),
        )


def starting_point(cfg, checkpointer: Checkpointer, *, resume: bool) -> tuple[int, dict | None]:
    """Where training starts, with the model (and for a resume the optimizer and scheduler) loaded: the iteration
    and the trainer state to restore (None for a fresh start). Resuming takes the newest usable checkpoint; a fresh
    start takes MODEL.WEIGHTS (tensors of another shape skipped) and refuses a folder that holds checkpoints.

    Raises:
        ValueError: the resume point is beyond SOLVER.MAX_ITER, or a fresh start would overwrite checkpoints.
    """
    max_iter = cfg.SOLVER.MAX_ITER
    resume_point = checkpointer.resume_point() if resume else None
    if resume_point is not None:
        path, state = resume_point
        start_iter = int(state["iteration"])
        if start_iter > max_iter:
            raise ValueError(
                f"--resume: the newest checkpoint, {path}, is at iteration {start_iter}, beyond SOLVER.MAX_ITER="
                f"{max_iter}. Set SOLVER.MAX_ITER={start_iter} or more to train on, or evaluate it with --eval-only."
            )
        checkpointer.load(path, resume=True, state=state)
        logger.info("Resuming from %s at iteration %d", path, start_iter)
        if "trainer" not in state:
            logger.warning("%s holds no trainer state (random generators, data position): the resumed run will "
                           "not repeat exactly what an uninterrupted one would have done", path)
        return start_iter, state.get("trainer")
    existing = checkpointer.checkpoint_files()
    if existing:
        names = ", ".join(p.name for _, p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise ValueError(
            f"{checkpointer.save_dir} already holds checkpoints of another run ({names}); training from iteration 0 "
            "would overwrite them. Pass --resume to continue that run, or choose another output folder (--output)."
        )
    if resume:
        logger.info("--resume: no checkpoint in %s yet; starting from the beginning", checkpointer.save_dir)
    if cfg.MODEL.WEIGHTS:
        checkpointer.load(cfg.MODEL.WEIGHTS, allow_shape_mismatch=True)
    elif not cfg.MODEL.BACKBONE.WEIGHTS:
        warn_about_random_frozen_trunk(cfg.MODEL.BACKBONE)
    return 0, None


def train(
    cfg,
    *,
    resume: bool = False,
    model: torch.nn.Module | None = None,
    dataset: DetectionDataset | None = None,
    build_loader: Callable[..., Iterable[list[dict]]] | None = None,
    evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
) -> dict:
    """Trains the config's model on DATASETS.TRAIN, checkpointing and logging as it goes, then evaluates on
    DATASETS.TEST. With `resume`, continues from the newest usable checkpoint in OUTPUT_DIR when there is one,
    exactly where it stopped (same batches, same random draws).

    Another model family (the localization stages) passes its own `model`, training `dataset`, `build_loader(cfg,
    dataset, *, start_iter)` and `evaluate_fn(model) -> metrics`; the defaults are the detector's.

    Nothing is written before these checks pass: a resume point beyond SOLVER.MAX_ITER, and a fresh start in a folder
    that already holds checkpoints (they would be overwritten), are errors.
    """
    output_dir = Path(cfg.OUTPUT_DIR)
    dataset = build_train_dataset(cfg) if dataset is None else dataset
    model = build_model(cfg) if model is None else model
    build_loader = build_train_data_loader if build_loader is None else build_loader
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(
        model=model,
        save_dir=output_dir,
        optimizer=optimizer,
        scheduler=scheduler,
        metadata={"class_names": list(dataset.class_names), **{k: v for k, v in dataset.extra.items() if k == "wnids"}},
    )

    start_iter, trainer_state = starting_point(cfg, checkpointer, resume=resume)
    save_config(cfg, output_dir / CONFIG_FILE)
    logger.info("Resolved config saved to %s", output_dir / CONFIG_FILE)

    final_metrics: dict = {}

    def evaluate_and_keep() -> dict:
        final_metrics.clear()
        final_metrics.update(evaluate(cfg, model) if evaluate_fn is None else evaluate_fn(model))
        return final_metrics

    hooks = [
        IterationTimer(),
        LRScheduler(scheduler),
        PeriodicCheckpointer(checkpointer, period=cfg.SOLVER.CHECKPOINT_PERIOD),
    ]
    if cfg.DATASETS.TEST:
        hooks.append(EvalHook(evaluate_and_keep, period=cfg.TEST.EVAL_PERIOD))
    hooks.append(
        PeriodicWriter(
            [ConsoleWriter(max_iter=cfg.SOLVER.MAX_ITER), JSONWriter(path=output_dir / TRAIN_LOG_FILE, start_iter=start_iter)],
            period=cfg.LOG_PERIOD,
        )
    )
    trainer = Trainer(
        model=model,
        data_loader=build_loader(cfg, dataset, start_iter=start_iter),
        optimizer=optimizer,
        max_iter=cfg.SOLVER.MAX_ITER,
        start_iter=start_iter,
        hooks=hooks,
        clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM,
    )
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
    try:
        trainer.train()
    except FloatingPointError as error:  # a non-finite loss, proposal or weight: say where a restart can begin
        last = checkpointer.last_checkpoint()
        error.add_note(
            f"The newest checkpoint, {last}, was written before the failure and holds finite values; "
            "continue from it with --resume once the cause is fixed."
            if last is not None
            else "No checkpoint had been written yet."
        )
        raise
    return final_metrics


def load_for_inference(cfg, checkpoint: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The config's model with the weights of `checkpoint` (default: MODEL.WEIGHTS, else the newest checkpoint in
    OUTPUT_DIR, as detectron2 does), in eval mode, and the checkpoint's metadata (e.g. {"class_names": [...]}; {}
    for a bare state_dict). The checkpoint must fit the model exactly."""
    model = build_model(cfg)
    checkpointer = Checkpointer(model=model, save_dir=cfg.OUTPUT_DIR)
    path = checkpoint or cfg.MODEL.WEIGHTS or checkpointer.last_checkpoint()
    if not path:
        raise FileNotFoundError(
            f"No weights to evaluate: pass --ckpt, set MODEL.WEIGHTS, or train into {cfg.OUTPUT_DIR} first"
        )
    logger.info("Evaluating the weights of %s", path)
    extra = checkpointer.load(path)
    return model.eval(), dict(extra.get("metadata") or {})
