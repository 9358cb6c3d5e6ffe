"""SIGTERM as an exception, so that a terminated tool stops the way Ctrl-C stops it.

`timeout`, SLURM's preemption, `docker stop` and torchrun's agent stop a process with SIGTERM, whose default action
ends it at once: no `finally` runs, the data-loading workers are never told to stop, and the tool prints nothing.
Inside `sigterm_raises()`, the first SIGTERM raises `Terminated` (a KeyboardInterrupt, so code that cleans up after
Ctrl-C cleans up after it too) in the main thread; a second SIGTERM ends the process at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STATUS_SIGINT = 128 + signal.SIGINT  # 130, what a shell reports for a process stopped by Ctrl-C
EXIT_STATUS_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends the process
    raise Terminated("SIGTERM")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere the block runs unchanged, as
    only the main thread may set signal handlers); the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption_exit_status(error: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM, as a shell reports a process those signals end."""
    return EXIT_STATUS_SIGTERM if isinstance(error, Terminated) else EXIT_STATUS_SIGINT


def interruption_name(error: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C (SIGINT)"
