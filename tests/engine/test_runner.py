"""The runner's checks before training starts."""

import logging

from detectron_res.config import get_default_config
from detectron_res.engine.runner import warn_about_random_frozen_trunk


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
