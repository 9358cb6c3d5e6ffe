"""Logging set-up for tools: the `detectron_res` logger to the console and to `<output dir>/log.txt`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "[%(asctime)s %(name)s] %(message)s"
DATE_FORMAT = "%m/%d %H:%M:%S"


def setup_logging(output_dir: str | Path | None = None, *, level: int = logging.INFO) -> logging.Logger:
    """Configures the package logger once per process (calling again replaces the handlers)."""
    logger = logging.getLogger("detectron_res")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, datefmt=DATE_FORMAT)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "log.txt")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger
