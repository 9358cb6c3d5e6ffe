"""Logging set-up for tools: the `detectron_res` logger to the console and to `<output dir>/log.txt`; in a distributed
job, rank 0 does that and every other rank logs only warnings and errors, prefixed with its rank, to the console
and to `<output dir>/log.txt.rank<r>`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "[%(asctime)s %(name)s] %(message)s"
DATE_FORMAT = "%m/%d %H:%M:%S"


def setup_logging(output_dir: str | Path | None = None, *, level: int = logging.INFO, rank: int = 0) -> logging.Logger:
    """Configures the package logger once per process (calling again replaces the handlers)."""
    logger = logging.getLogger("detectron_res")
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] {FORMAT}", datefmt=DATE_FORMAT)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        file_handler = logging.FileHandler(Path(output_dir) / name, delay=rank != 0)  # other ranks: only if needed
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger
