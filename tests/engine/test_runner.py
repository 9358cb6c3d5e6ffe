"""The runner: its checks before training starts, argument parsing and the one-line error of the tools."""

import logging

from detectron_res.config import get_default_config
from detectron_res.engine.runner import default_argument_parser, error_summary, parse_args, warn_about_random_frozen_trunk


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
