"""What the tools run: argument parsing and set-up, training with hooks, and evaluation over DATASETS.TEST."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..config import load_config, save_config
from ..data.build import build_test_data_loader, build_train_data_loader, build_train_dataset, load_dataset
from ..evaluation import inference_on_dataset, write_metrics_json
from ..evaluation.build import build_evaluator
from ..modeling import build_model
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


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="Trailing KEY=VALUE arguments override config keys, e.g. SOLVER.BASE_LR=0.02"
    )
    parser.add_argument("--cfg", required=True, help="config file (YAML)")
    parser.add_argument("--output", default=None, help="output folder (default: the config's OUTPUT_DIR)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY=VALUE config overrides")
    return parser


def setup(args: argparse.Namespace):
    """Loads the config (file, overrides, --output), prepares the output folder and logging, saves the resolved
    config there, seeds every random generator. Returns the frozen config."""
    overrides = list(args.opts)
    if args.output is not None:
        overrides.append(f"OUTPUT_DIR={args.output}")
    cfg = load_config(args.cfg, overrides)
    output_dir = Path(cfg.OUTPUT_DIR)
    setup_logging(output_dir)
    save_config(cfg, output_dir / CONFIG_FILE)
    logger.info("Config %s with overrides %s; resolved config saved to %s", args.cfg, overrides, output_dir / CONFIG_FILE)
    seed_everything(cfg.SEED)
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(cfg, model: torch.nn.Module, *, progress: bool = True) -> dict:
    """Evaluates `model` on every data set of DATASETS.TEST; writes results and `<OUTPUT_DIR>/metrics.json`.

    Returns {"bbox": {...}, ...} for one test data set, {name: {...}} for several.
    """
    results = {}
    for name in cfg.DATASETS.TEST:
        dataset = load_dataset(cfg, name)
        output_dir = Path(cfg.OUTPUT_DIR) / "inference" / results_folder_name(name)
        evaluator = build_evaluator(dataset, output_dir=output_dir)
        loader = build_test_data_loader(cfg, dataset)
        logger.info("Evaluating on %s (%d images)", name, len(dataset))
        results[name] = inference_on_dataset(model, loader, evaluator, progress=progress)
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


def train(cfg, *, resume: bool = False) -> dict:
    """Trains the config's model on DATASETS.TRAIN, checkpointing and logging as it goes, then evaluates on
    DATASETS.TEST. With `resume`, continues from the last checkpoint in OUTPUT_DIR when there is one."""
    output_dir = Path(cfg.OUTPUT_DIR)
    dataset = build_train_dataset(cfg)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(
        model=model,
        save_dir=output_dir,
        optimizer=optimizer,
        scheduler=scheduler,
        metadata={"class_names": list(dataset.class_names)},
    )

    start_iter = 0
    last = checkpointer.last_checkpoint() if resume else None
    if last is not None:
        start_iter = int(checkpointer.load(last, resume=True).get("iteration", 0))
        logger.info("Resuming from %s at iteration %d", last, start_iter)
    elif resume:
        logger.info("--resume: no checkpoint in %s yet; starting from the beginning", output_dir)
    if last is None and cfg.MODEL.WEIGHTS:
        checkpointer.load(cfg.MODEL.WEIGHTS)
    if last is None and not cfg.MODEL.WEIGHTS and not cfg.MODEL.BACKBONE.WEIGHTS:
        warn_about_random_frozen_trunk(cfg.MODEL.BACKBONE)

    final_metrics: dict = {}

    def evaluate_and_keep() -> dict:
        final_metrics.clear()
        final_metrics.update(evaluate(cfg, model))
        return final_metrics

    max_iter = cfg.SOLVER.MAX_ITER
    hooks = [
        IterationTimer(),
        LRScheduler(scheduler),
        PeriodicCheckpointer(checkpointer, period=cfg.SOLVER.CHECKPOINT_PERIOD),
    ]
    if cfg.DATASETS.TEST:
        hooks.append(EvalHook(evaluate_and_keep, period=cfg.TEST.EVAL_PERIOD))
    hooks.append(
        PeriodicWriter(
            [ConsoleWriter(max_iter=max_iter), JSONWriter(path=output_dir / TRAIN_LOG_FILE)], period=cfg.LOG_PERIOD
        )
    )
    trainer = Trainer(
        model=model,
        data_loader=build_train_data_loader(cfg, dataset),
        optimizer=optimizer,
        max_iter=max_iter,
        start_iter=start_iter,
        hooks=hooks,
        clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM,
    )
    trainer.train()
    return final_metrics


def load_for_inference(cfg, checkpoint: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The config's model with the weights of `checkpoint` (default: MODEL.WEIGHTS, else the last checkpoint in
    OUTPUT_DIR), in eval mode, and the checkpoint's metadata (e.g. {"class_names": [...]}; {} for a bare
    state_dict)."""
    model = build_model(cfg)
    checkpointer = Checkpointer(model=model, save_dir=cfg.OUTPUT_DIR)
    path = checkpoint or cfg.MODEL.WEIGHTS or checkpointer.last_checkpoint()
    if not path:
        raise FileNotFoundError(
            f"No weights to evaluate: pass --ckpt, set MODEL.WEIGHTS, or train into {cfg.OUTPUT_DIR} first"
        )
    extra = checkpointer.load(path)
    return model.eval(), dict(extra.get("metadata") or {})
