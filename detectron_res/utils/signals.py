"""SIGTERM as an exception, so that a terminated tool stops the way Ctrl-C stops it.

`timeout`, SLURM's preemption, `docker stop` and torchrun's agent stop a process with SIGTERM, whose default action
ends it at once: no `finally` runs, the data-loading workers are never told to stop, and the tool prints nothing.
Inside `sigterm_raises()`, the first SIGTERM raises `Terminated` (a KeyboardInterrupt, so code that cleans up after
Ctrl-C cleans up after it too) in the main thread; a second SIGTERM ends the process at once, as usual.

Inside `sigterm_deferred()` (the training loop), the first SIGTERM only records a request (`sigterm_requested()`),
so that a preempted training can finish its step, agree with the other ranks to stop after the same one and write a
checkpoint there before it raises `Terminated` itself; a second SIGTERM still ends the process at once.
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


_requested = False  # a SIGTERM arrived inside sigterm_deferred() and was not acted on yet


def _record_request(signum: int, frame: object) -> None:
    global _requested
    _requested = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once


def sigterm_requested() -> bool:
    """Whether a SIGTERM arrived inside the current `sigterm_deferred()` block."""
    return _requested


@contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Within the block, the first SIGTERM only sets `sigterm_requested()` (the code in the block polls it and stops
    at a point of its choosing, raising `Terminated`); a second one ends the process at once. A request still
    pending when the block ends raises `Terminated` there, as SIGTERM outside the block does (`sigterm_raises`).
    Outside the main thread the block runs unchanged."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = False
    previous = signal.signal(signal.SIGTERM, _record_request)
    try:
        yield
    finally:
        pending, _requested = _requested, False
        if not pending:
            signal.signal(signal.SIGTERM, previous)
    if pending:  # not acted on inside (it arrived after the block's last check): the usual SIGTERM now
        raise Terminated("SIGTERM")


def interruption_exit_status(error: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM, as a shell reports a process those signals end."""
    return EXIT_STATUS_SIGTERM if isinstance(error, Terminated) else EXIT_STATUS_SIGINT


def interruption_name(error: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C (SIGINT)"
