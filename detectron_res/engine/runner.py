"""What the tools run: argument parsing and set-up, training with hooks, and evaluation over DATASETS.TEST."""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import config_files, load_config, merge_overrides, save_config
from ..data.datasets.base import DetectionDataset
from ..data.build import build_test_data_loader, build_train_data_loader, build_train_dataset, load_dataset
from ..evaluation import InferenceTiming, inference_on_dataset, write_metrics_json
from ..evaluation.build import build_evaluator
from ..evaluation.coco import dataset_ground_truth
from ..layers.norm import SyncBatchNorm
from ..modeling import build_model
from ..modeling.build import check_weight_settings, compile_for_inference, resolve_device
from ..utils import comm, remove_orphaned_temporary_files
from ..utils.main_guard import check_not_bootstrapping
from ..utils.paths import RunFolderLock, check_tool_paths
from .checkpoint import Checkpointer, unwrap_model
from .events import ConsoleWriter, JSONWriter, TensorboardWriter
from .hooks import EvalHook, IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter
from .launch import launch
from .logger import setup_logging
from .solver import build_lr_scheduler, build_optimizer
from .tool import error_summary, run_tool  # noqa: F401 (the tools import run_tool from here)
from .trainer import Trainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files (TENSORBOARD: true): tensorboard --logdir OUTPUT_DIR
CONFIG_FILE = "config.yaml"
EVAL_CONFIG_FILE = "inference/config.yaml"  # evaluation tools keep a training run's config.yaml as it is


def default_argument_parser(
    description: str, *, output_help: str = "output folder (default: the config's OUTPUT_DIR)"
) -> argparse.ArgumentParser:
    """`--cfg`, `--output` and trailing `KEY=VALUE` overrides; parse with `parse_args`, which lets flags come
    before, between or after the overrides. `output_help` is for a tool whose --output is not OUTPUT_DIR itself."""
    parser = argparse.ArgumentParser(
        description=description, epilog="KEY=VALUE arguments override config keys, e.g. SOLVER.BASE_LR=0.02"
    )
    parser.add_argument("--cfg", required=True, help="config file (YAML)")
    parser.add_argument("--output", default=None, help=output_help)
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def add_num_gpus_argument(parser: argparse.ArgumentParser) -> None:
    """`--num-gpus N`: run the tool as N processes of one distributed job on this machine (see `launch_processes`)."""
    parser.add_argument(
        "--num-gpus", type=int, default=1, metavar="N",
        help="processes (one per GPU; CPU processes with gloo where there is no CUDA) of one distributed job on this "
        "machine, as `torchrun --standalone --nproc_per_node=N` would start; for several machines use torchrun",
    )


def launch_processes(main: Callable[[list[str]], Any], argv: Sequence[str], num_gpus: int) -> tuple[bool, Any]:
    """For a tool's `main(argv)` called with `--num-gpus N` (N > 1) outside any distributed job: runs it in N worker
    processes (`engine.launch.launch`) and returns (True, rank 0's result). Inside a job (a worker, or under torchrun)
    or with N = 1: (False, None), and the tool goes on in this process."""
    if num_gpus <= 1 or comm.launched_world_size() > 1:
        if num_gpus > 1 and num_gpus != comm.launched_world_size():
            logger.warning("--num-gpus %d ignored: this process is one of %d started by torchrun",
                           num_gpus, comm.launched_world_size())
        return False, None
    return True, launch(main, argv, num_processes=num_gpus)[0]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags and `KEY=VALUE` overrides in any order (`... SOLVER.IMS_PER_BATCH=8 --resume`)."""
    return parser.parse_intermixed_args(argv)


def setup(
    args: argparse.Namespace,
    *,
    config_file: str | None = CONFIG_FILE,
    inputs: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike] | None] | None = None,
    lock: bool = True,
):
    """Loads the config (file, overrides, --output), joins the distributed job when torchrun started this process
    (rescaling batch, LR and schedule when SOLVER.REFERENCE_WORLD_SIZE asks), prepares the output folder and
    logging, saves the resolved config as `OUTPUT_DIR/<config_file>` (None: not here; training writes it once its
    checks passed), seeds every random generator. Only rank 0 writes files and logs below warnings. Returns the
    frozen config.

    Before anything is written, OUTPUT_DIR is checked against the tool's inputs (`utils.paths.check_tool_paths`:
    --cfg, MODEL.WEIGHTS, MODEL.BACKBONE.WEIGHTS and the tool's own `inputs`, e.g. {"--ckpt": path}); it is a run
    folder, so a config or checkpoint inside it may be read. With `lock`, rank 0 then holds OUTPUT_DIR's run-folder
    lock until the tool's main returns (`releasing_run_folders`) or the process ends, so that a second run on the
    same folder is refused with this one's process id.
    """
    overrides = list(args.opts)
    if args.output is not None:
        overrides.append(f"OUTPUT_DIR={args.output}")
    cfg = load_config(args.cfg, overrides)
    check_tool_paths(
        inputs={
            "--cfg": config_files(args.cfg),  # and its _base_
            **{key: path for key, path in (("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS),
                                           ("MODEL.BACKBONE.WEIGHTS", cfg.MODEL.BACKBONE.WEIGHTS)) if "://" not in path},
            **(inputs or {}),
        },
        outputs={"--output" if args.output is not None else "OUTPUT_DIR": cfg.OUTPUT_DIR},
        run_folders=["--output", "OUTPUT_DIR"],
    )
    comm.init_distributed(
        backend=cfg.DISTRIBUTED.BACKEND,
        timeout_s=cfg.DISTRIBUTED.TIMEOUT,
        device_type=resolve_device(cfg.MODEL.DEVICE).type,
    )
    rescaled = world_size_overrides(cfg.SOLVER, comm.get_world_size())
    if rescaled:
        cfg = merge_overrides(cfg, rescaled)
    output_dir = Path(cfg.OUTPUT_DIR)
    if lock and comm.is_main_process():
        lock_run_folder(output_dir)
    setup_logging(output_dir, rank=comm.get_rank())
    if comm.is_main_process():
        remove_orphaned_temporary_files(output_dir)
    logger.info("Config %s with overrides %s", args.cfg, overrides)
    if rescaled:
        logger.info("SOLVER.REFERENCE_WORLD_SIZE=%d, world size %d: rescaled by the linear rule to %s",
                    cfg.SOLVER.REFERENCE_WORLD_SIZE, comm.get_world_size(), " ".join(rescaled))
    if config_file is not None and comm.is_main_process():
        save_config(cfg, output_dir / config_file)
        logger.info("Resolved config saved to %s", output_dir / config_file)
    seed_everything(cfg.SEED)
    return cfg


_RUN_FOLDER_LOCKS: dict[Path, RunFolderLock] = {}  # held until the tool's main returns, or the process ends


def lock_run_folder(folder: str | os.PathLike) -> RunFolderLock:
    """Takes `folder`'s run-folder lock until `release_run_folders()` (called when a tool's main returns, see
    `releasing_run_folders`) or the end of the process (again: the lock already held).

    Raises:
        RunFolderInUseError: another live process writes `folder`; the message names its process id.
    """
    folder = Path(os.path.realpath(folder))
    if folder not in _RUN_FOLDER_LOCKS:
        _RUN_FOLDER_LOCKS[folder] = RunFolderLock(folder).acquire()
    return _RUN_FOLDER_LOCKS[folder]


def release_run_folders() -> None:
    """Releases the run-folder locks `lock_run_folder` took in this process."""
    while _RUN_FOLDER_LOCKS:
        _RUN_FOLDER_LOCKS.popitem()[1].release()


def releasing_run_folders(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a tool's `main` so that the run folders its `setup` locked are released when it returns or
    raises: a caller in Python (a notebook, a test) may run the tool again, or launch it on N processes, on the
    same folder. A worker process importing a script that called `main` at its top level is stopped with the fix
    (`utils.main_guard.check_not_bootstrapping`) instead of starting a second run."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_not_bootstrapping(f"{Path(inspect.getfile(main)).name}'s main()")
        try:
            return main(*args, **kwargs)
        finally:
            release_run_folders()

    return wrapper


def world_size_overrides(solver, world_size: int) -> list[str]:
    """detectron2's linear scaling rule: a solver written for SOLVER.REFERENCE_WORLD_SIZE processes, run on
    `world_size`, gets IMS_PER_BATCH and BASE_LR multiplied by world_size / reference and its iteration counts
    (MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD) divided by it, as `KEY=VALUE` overrides; [] when no rescaling
    applies (REFERENCE_WORLD_SIZE 0 or equal to the world size).

    Raises:
        ValueError: the rescaled batch is not a whole number of images.
    """
    reference = solver.REFERENCE_WORLD_SIZE
    if reference == 0 or reference == world_size:
        return []
    scale = world_size / reference
    batch = solver.IMS_PER_BATCH * scale
    if batch != int(batch) or batch < 1:
        raise ValueError(
            f"SOLVER.REFERENCE_WORLD_SIZE={reference} on {world_size} processes scales SOLVER.IMS_PER_BATCH="
            f"{solver.IMS_PER_BATCH} to {batch:g} images, not a whole number"
        )

    def iterations(value: int) -> int:
        return int(round(value / scale))

    steps = ",".join(str(iterations(step)) for step in solver.STEPS)
    return [
        f"SOLVER.IMS_PER_BATCH={int(batch)}",
        f"SOLVER.BASE_LR={solver.BASE_LR * scale:g}",
        f"SOLVER.MAX_ITER={iterations(solver.MAX_ITER)}",
        f"SOLVER.STEPS=[{steps}]",
        f"SOLVER.WARMUP_ITERS={iterations(solver.WARMUP_ITERS)}",
        f"SOLVER.CHECKPOINT_PERIOD={max(1, iterations(solver.CHECKPOINT_PERIOD))}",
    ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(
    cfg, model: torch.nn.Module, *, progress: bool = True, timing: InferenceTiming | None = None
) -> dict:
    """Evaluates `model` on every data set of DATASETS.TEST; writes results and `<OUTPUT_DIR>/metrics.json`.
    `timing`, when given, gets the images and seconds of the inference loops added. In a distributed job each rank
    runs its shard of the images, rank 0 evaluates and writes, and every rank returns the metrics.

    Returns {"bbox": {...}, ...} for one test data set, {name: {...}} for several.
    """
    results = {}
    model = unwrap_model(model)
    for name in cfg.DATASETS.TEST:
        with comm.main_process_first():
            dataset = load_dataset(cfg, name)
        output_dir = Path(cfg.OUTPUT_DIR) / "inference" / results_folder_name(name)
        evaluator = (
            build_evaluator(dataset, output_dir=output_dir, coco_backend=cfg.TEST.COCO_BACKEND)
            if comm.is_main_process() else None
        )
        loader = build_test_data_loader(cfg, dataset, rank=comm.get_rank(), world_size=comm.get_world_size())
        logger.info("Evaluating on %s (%d images)", name, len(dataset))
        results[name] = inference_on_dataset(model, loader, evaluator, progress=progress, timing=timing)
        log_metrics_summary(name, results[name])
    if len(results) == 1:
        results = next(iter(results.values()))
    if results and comm.is_main_process():
        write_metrics_json(Path(cfg.OUTPUT_DIR) / METRICS_FILE, results)
    return results


def results_folder_name(dataset_name: str) -> str:
    """Folder for a data set's results: its name, or the json file's stem for "ANNOTATIONS.json:IMAGES"."""
    if ".json:" in dataset_name:
        return Path(dataset_name.split(".json:", 1)[0]).name
    return dataset_name


def check_test_sets(cfg) -> None:
    """Loads each data set of DATASETS.TEST and the COCO ground truth it will be evaluated against
    (`dataset_ground_truth`, which refuses what COCOeval would score wrongly: repeated image or annotation ids, int
    and str image ids mixed, malformed categories, ...), so that such a test set stops training before its first
    iteration rather than after hours of it. Both are dropped: the evaluation reloads them (1.7 s for a generated
    json of COCO val2017's size, 5,000 images and 36,781 boxes, on 2 CPU cores), and keeping the ground truth would
    hold its memory through training.

    Every rank reads the ground truth, so that every rank stops with the same error instead of waiting for one that
    stopped.

    Raises:
        the loader's error (FileNotFoundError, ValueError, ...), with a note naming the DATASETS.TEST entry.
    """
    for name in cfg.DATASETS.TEST:
        start = time.perf_counter()
        try:
            with comm.main_process_first():  # rank 0 generates a synthetic data set; the others then read it
                dataset = load_dataset(cfg, name)
            ground_truth = dataset_ground_truth(dataset)
        except Exception as error:
            error.add_note(f"(DATASETS.TEST entry {name!r}, checked before training: nothing was trained)")
            raise
        logger.info("Test set %s checked before training: %d images, %d annotations in its ground truth (%.2f s)",
                    name, len(ground_truth.imgs), len(ground_truth.anns), time.perf_counter() - start)


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
        extra = checkpointer.load(cfg.MODEL.WEIGHTS, allow_shape_mismatch=True)
        check_checkpoint_settings(cfg, extra, source=f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS}")
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
    batch_unit: str = "images (SOLVER.IMS_PER_BATCH)",
) -> dict:
    """Trains the config's model on DATASETS.TRAIN, checkpointing and logging as it goes, then evaluates on
    DATASETS.TEST. With `resume`, continues from the newest usable checkpoint in OUTPUT_DIR when there is one,
    exactly where it stopped (same batches, same random draws).

    Another model family (the localization stages) passes its own `model`, training `dataset`, `build_loader(cfg,
    dataset, *, start_iter)` and `evaluate_fn(model) -> metrics`; the defaults are the detector's. `batch_unit` says
    in the log what SOLVER.IMS_PER_BATCH counts and which key set it (the R-CNN stage's: RoIs, LOC.RCNN.IMS_PER_BATCH).

    Nothing is written before these checks pass: a resume point beyond SOLVER.MAX_ITER, and a fresh start in a folder
    that already holds checkpoints (they would be overwritten), are errors; so is a DATASETS.TEST set whose data or
    COCO ground truth does not load (`check_test_sets`), which would otherwise stop the run at its first evaluation.

    Workers that torchrun restarted after a failure (`--max-restarts`, `comm.elastic_restart`) resume as with
    `resume`: the job goes on from the newest checkpoint, and a log line says so.
    """
    output_dir = Path(cfg.OUTPUT_DIR)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    restart = comm.elastic_restart()
    if restart and not resume:
        logger.info("torchrun restarted the workers (restart %d): resuming from the newest checkpoint in %s, as "
                    "--resume would", restart, output_dir)
        resume = True
    if dataset is None:
        with comm.main_process_first():  # rank 0 generates a synthetic data set; the others then read it
            dataset = build_train_dataset(cfg)
    if evaluate_fn is None:  # the detector's evaluation; the localization stages' ground truth refuses nothing
        check_test_sets(cfg)
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
    if comm.is_main_process():
        save_config(cfg, output_dir / CONFIG_FILE)
        logger.info("Resolved config saved to %s", output_dir / CONFIG_FILE)
    amp_dtype, grad_scaler = amp_settings(cfg.SOLVER.AMP, device=next(model.parameters()).device)
    accumulate = cfg.SOLVER.ACCUMULATE
    logger.info(
        "Training on %d process%s: global batch %d %s, %d per process, base LR %g%s%s",
        world_size, "es" if world_size > 1 else "", cfg.SOLVER.IMS_PER_BATCH, batch_unit,
        cfg.SOLVER.IMS_PER_BATCH // world_size,
        cfg.SOLVER.BASE_LR, f", {cfg.SOLVER.AMP.DTYPE} autocast" if amp_dtype is not None else "",
        f"; the gradients of {accumulate} batches summed per step (SOLVER.ACCUMULATE): "
        f"{cfg.SOLVER.IMS_PER_BATCH * accumulate} images per step" if accumulate > 1 else "",
    )
    # the loader's position counts batches: `accumulate` per iteration
    data_loader = build_loader(cfg, dataset, start_iter=start_iter * accumulate, rank=rank, world_size=world_size)
    if world_size > 1:
        seed_everything((cfg.SEED + rank) % 2**32)  # the ranks sample anchors and RoIs independently; the model alike
    trained = wrap_distributed(model, cfg)

    final_metrics: dict = {}

    def evaluate_and_keep() -> dict:
        final_metrics.clear()
        comm.broadcast_buffers(model)  # every rank evaluates the weights rank 0 checkpoints
        if evaluate_fn is None:
            final_metrics.update(evaluate(cfg, model))
        else:  # another model family's evaluation runs on rank 0; the others wait for its metrics
            final_metrics.update(comm.broadcast(evaluate_fn(model) if comm.is_main_process() else None))
        return final_metrics

    hooks = [
        IterationTimer(),
        LRScheduler(scheduler),
        PeriodicCheckpointer(checkpointer, period=cfg.SOLVER.CHECKPOINT_PERIOD, write=comm.is_main_process()),
    ]
    if cfg.DATASETS.TEST:
        hooks.append(EvalHook(evaluate_and_keep, period=cfg.TEST.EVAL_PERIOD))
    if comm.is_main_process():
        writers = [
            ConsoleWriter(max_iter=cfg.SOLVER.MAX_ITER),
            JSONWriter(path=output_dir / TRAIN_LOG_FILE, start_iter=start_iter),
        ]
        if cfg.TENSORBOARD:
            writers.append(TensorboardWriter(log_dir=output_dir / TENSORBOARD_DIR, start_iter=start_iter))
        hooks.append(PeriodicWriter(writers, period=cfg.LOG_PERIOD))
    trainer = Trainer(
        model=trained,
        data_loader=data_loader,
        optimizer=optimizer,
        max_iter=cfg.SOLVER.MAX_ITER,
        start_iter=start_iter,
        hooks=hooks,
        clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM,
        amp_dtype=amp_dtype,
        grad_scaler=grad_scaler,
        accumulate=accumulate,
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
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: run_tool prints this in one line
        last = checkpointer.last_checkpoint() if comm.is_main_process() else None
        error.add_note(
            f"after {trainer.done} of {cfg.SOLVER.MAX_ITER} iterations; "
            + ("rank 0 names the checkpoint to resume from" if not comm.is_main_process()
               else f"the newest checkpoint is {last}: run the same command with --resume to continue from it"
               if last is not None else "no checkpoint had been written yet")
        )
        raise
    return final_metrics


def wrap_distributed(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """`model` in DistributedDataParallel in a distributed job (gradients averaged over the ranks at each step),
    else `model` itself. Buffers are not synchronised at every step: BatchNorm's running statistics are made equal
    (rank 0's) before each evaluation and are saved from rank 0. On GPUs, SyncBN layers become torch's fused
    `nn.SyncBatchNorm` (same state)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda" and any(isinstance(m, SyncBatchNorm) for m in model.modules()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # buffers are synchronised at construction, then before each evaluation
        find_unused_parameters=cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS,
    )


def amp_settings(amp_cfg, *, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """SOLVER.AMP -> (autocast dtype or None, gradient scaler or None): float16 takes a scaler (its gradients
    underflow otherwise), bfloat16 does not.

    Raises:
        ValueError: float16 on the CPU (autocast there supports bfloat16).
    """
    if not amp_cfg.ENABLED:
        return None, None
    dtype = getattr(torch, amp_cfg.DTYPE)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("SOLVER.AMP.DTYPE=float16 needs CUDA; on the CPU use SOLVER.AMP.DTYPE=bfloat16")
    return dtype, torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def check_checkpoint_settings(cfg, extra: dict, *, source: str) -> None:
    """A converted checkpoint's "settings" (the config values its weights need) against the config: a warning for a
    detectron2 model (which may have been trained from other ImageNet weights than MSRA's), else an error."""
    if isinstance(extra.get("settings"), dict):
        check_weight_settings(cfg, extra["settings"], source=source, strict=extra.get("format") != "detectron2")


def load_for_inference(cfg, checkpoint: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The config's model with the weights of `checkpoint` (default: MODEL.WEIGHTS, else the newest checkpoint in
    OUTPUT_DIR, as detectron2 does), in eval mode (compiled with TEST.COMPILE), and the checkpoint's metadata (e.g.
    {"class_names": [...]}; {} for a bare state_dict). The checkpoint must fit the model exactly."""
    model = build_model(cfg)
    checkpointer = Checkpointer(model=model, save_dir=cfg.OUTPUT_DIR)
    path = checkpoint or cfg.MODEL.WEIGHTS or checkpointer.last_checkpoint()
    if not path:
        raise FileNotFoundError(
            f"No weights to evaluate: pass --ckpt, set MODEL.WEIGHTS, or train into {cfg.OUTPUT_DIR} first"
        )
    logger.info("Evaluating the weights of %s", path)
    extra = checkpointer.load(path)
    check_checkpoint_settings(cfg, extra, source=str(path))
    if cfg.TEST.COMPILE:
        compile_for_inference(model)
    return model.eval(), dict(extra.get("metadata") or {})
