"""The runner: its checks before training starts, argument parsing and the one-line error of the tools."""

import logging
import warnings

import pytest
import torch

from detectron_res.config import get_default_config
from detectron_res.engine.logger import setup_logging
from detectron_res.engine.runner import (
    amp_settings,
    default_argument_parser,
    error_summary,
    parse_args,
    warn_about_random_frozen_trunk,
    world_size_overrides,
)
from detectron_res.utils import comm


def test_random_frozen_trunk_is_warned_about_and_a_scratch_setup_is_not(caplog):
    cfg = get_default_config()  # FrozenBN, FREEZE_AT 2: the fine-tuning setup
    with caplog.at_level(logging.WARNING, logger="detectron_res.engine.runner"):
        warn_about_random_frozen_trunk(cfg.MODEL.BACKBONE)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "NORM=FrozenBN" in message and "FREEZE_AT=2" in message and "MODEL.BACKBONE.WEIGHTS" in message

    caplog.clear()
    cfg.MODEL.BACKBONE.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    with caplog.at_level(logging.WARNING, logger="detectron_res.engine.runner"):
        warn_about_random_frozen_trunk(cfg.MODEL.BACKBONE)
    assert caplog.records == []


def test_flags_may_come_before_between_or_after_the_overrides():
    parser = default_argument_parser("test")
    parser.add_argument("--resume", action="store_true")
    args = parse_args(parser, ["--cfg", "c.yaml", "SOLVER.IMS_PER_BATCH=8", "--output", "o", "A.B=[1,2]", "--resume"])
    assert (args.cfg, args.output, args.resume, args.opts) == ("c.yaml", "o", True, ["SOLVER.IMS_PER_BATCH=8", "A.B=[1,2]"])


def test_error_summary_keeps_a_worker_errors_last_line_and_the_notes():
    worker = ValueError(
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nBadImageError: truncated JPEG (...): a.jpg\n'
    )
    assert error_summary(worker) == "BadImageError: truncated JPEG (...): a.jpg"
    stopped = FloatingPointError("Loss became non-finite.")
    stopped.add_note("The newest checkpoint, x.pth, holds finite values.")
    assert error_summary(stopped) == "Loss became non-finite. The newest checkpoint, x.pth, holds finite values."


def test_reference_world_size_rescales_batch_lr_and_schedule_by_the_linear_rule():
    cfg = get_default_config()
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.MAX_ITER = 90000
    cfg.SOLVER.STEPS = [60000, 80000]
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    assert world_size_overrides(cfg.SOLVER, 2) == []  # REFERENCE_WORLD_SIZE 0: never
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    assert world_size_overrides(cfg.SOLVER, 8) == []
    assert world_size_overrides(cfg.SOLVER, 2) == [
        "SOLVER.IMS_PER_BATCH=4", "SOLVER.BASE_LR=0.005", "SOLVER.MAX_ITER=360000", "SOLVER.STEPS=[240000,320000]",
        "SOLVER.WARMUP_ITERS=4000", "SOLVER.CHECKPOINT_PERIOD=20000",
    ]  # fmt: skip
    assert world_size_overrides(cfg.SOLVER, 16)[:3] == [
        "SOLVER.IMS_PER_BATCH=32", "SOLVER.BASE_LR=0.04", "SOLVER.MAX_ITER=45000"
    ]
    cfg.SOLVER.IMS_PER_BATCH = 12
    with pytest.raises(ValueError, match=r"on 3 processes scales SOLVER.IMS_PER_BATCH=12 to 4.5 images, not a whole"):
        world_size_overrides(cfg.SOLVER, 3)


def test_amp_settings_choose_dtype_and_scaler_and_refuse_float16_on_the_cpu():
    amp = get_default_config().SOLVER.AMP
    assert amp_settings(amp, device=torch.device("cpu")) == (None, None)
    amp.ENABLED = True
    assert amp_settings(amp, device=torch.device("cpu")) == (torch.bfloat16, None)
    amp.DTYPE = "float16"
    with pytest.raises(ValueError, match="DTYPE=float16 needs CUDA; on the CPU use SOLVER.AMP.DTYPE=bfloat16"):
        amp_settings(amp, device=torch.device("cpu"))
    with warnings.catch_warnings():  # torch warns that a CUDA scaler is disabled on a machine without CUDA
        warnings.simplefilter("ignore")
        dtype, scaler = amp_settings(amp, device=torch.device("cuda"))
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)


def test_a_single_process_is_rank_0_of_1_and_its_collectives_are_identities():
    assert (comm.get_rank(), comm.get_world_size()) == (0, 1)
    assert comm.is_main_process() and not comm.is_distributed()
    assert comm.all_gather({"a": 1}) == [{"a": 1}] and comm.gather(2) == [2] and comm.broadcast(3) == 3
    tensor = torch.ones(2)
    assert comm.all_reduce_mean(tensor) is tensor
    with comm.main_process_first():
        pass
    assert comm.init_distributed() is False  # no WORLD_SIZE from a launcher
    with pytest.raises(ValueError, match="DISTRIBUTED.BACKEND='mpi'"):
        comm.init_distributed(backend="mpi")


def test_other_ranks_log_only_warnings_with_their_rank_to_their_own_file(tmp_path):
    from conftest import package_logger_restored

    with package_logger_restored():
        logger = setup_logging(tmp_path, rank=1)
        logger.info("hidden")
        logger.warning("shown")
        for handler in logger.handlers:
            handler.flush()
        assert not (tmp_path / "log.txt").exists()
        assert (tmp_path / "log.txt.rank1").read_text().strip().endswith("] shown")
        assert (tmp_path / "log.txt.rank1").read_text().startswith("[rank 1] [")
