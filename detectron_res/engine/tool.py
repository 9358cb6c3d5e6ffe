"""How a tool's process runs its `main`: an error it stops on becomes one line and exit status 1, Ctrl-C and SIGTERM
exit 130 and 143 after unwinding (data-loading workers stopped, the distributed job left). Below both `runner` (which
re-exports `run_tool`) and `launch` (whose workers run the tool through it), so that they import it, not each other.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from ..utils import comm
from ..utils.malloc import keep_freed_memory
from ..utils.signals import interruption_exit_status, interruption_name, sigterm_raises


def run_tool(main: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Runs a tool's `main(argv)`; an error it stops on (bad config, missing file, unreadable image, diverged
    training, a dead data-loading worker, a failed rank, ...) prints one line to stderr and returns 1, and its
    traceback goes to the output folder's log.txt when logging to one had started. Other exceptions (bugs)
    propagate with their traceback. Ctrl-C and SIGTERM (`utils.signals.sigterm_raises`; in the training loop
    `sigterm_deferred`, which first checkpoints the step every rank stops after) unwind the tool, so that its
    data-loading workers are stopped, leave the distributed job without waiting for the other ranks, and print one
    line (for training: the newest checkpoint and how to resume); the exit status is 130 or 143, as a shell reports
    those signals (under torchrun the agent itself then exits 1; docs/distributed.md, "Preemption").

    In a distributed job the line names the rank, and the error also goes to the error file of torchrun's agent
    (TORCHELASTIC_ERROR_FILE, as `torch.distributed.elastic`'s `@record` writes it), so that torchrun's failure
    summary shows it; the agent then stops the other ranks.

    glibc's malloc is first set to keep freed memory for reuse (`utils.malloc.keep_freed_memory`): without it, the
    large per-RoI buffers are page-faulted afresh at every step (docs/benchmarks.md)."""
    keep_freed_memory()
    try:
        with sigterm_raises():
            main(list(argv))
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.signals): one line, where to resume from
        message = f"interrupted by {interruption_name(error)}" + "".join(
            f"{'; ' if i else ' '}{note}" for i, note in enumerate(getattr(error, "__notes__", ()))
        )
        _log_to_files(logging.WARNING, "Stopped: %s", message)
        print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
        comm.leave_distributed()  # no barrier: another rank may be dead, or stopping too
        return interruption_exit_status(error)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        message = error_summary(error)
        _log_to_files(logging.ERROR, "Stopped: %s", message, exc_info=(type(error), error, error.__traceback__))
        where = f" (rank {comm.get_rank()} of {comm.get_world_size()})" if comm.is_distributed() else ""
        print(f"{Path(sys.argv[0]).name}: error{where}: {message}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            ErrorHandler().record_exception(error)
        return 1
    except BaseException as error:
        if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(error, SystemExit):
            ErrorHandler().record_exception(error)  # a bug's traceback for torchrun's summary, then propagate
        raise
    comm.destroy_distributed()
    return 0


def _log_to_files(level: int, message: str, *args: object, exc_info=None) -> None:
    """A record for the package's log files only (log.txt and the other ranks' files), not for the console."""
    package_logger = logging.getLogger("detectron_res")
    record = package_logger.makeRecord(package_logger.name, level, __file__, 0, message, args, exc_info)
    for handler in package_logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def error_summary(error: BaseException) -> str:
    """The message of `error` and its notes; for an error re-raised from a data-loading worker (whose message holds
    the worker's traceback), the worker's own last line, e.g. `BadImageError: truncated JPEG ...: a.jpg`."""
    message = str(error).strip() or type(error).__name__
    if "Original Traceback" in message:
        message = message.splitlines()[-1].strip()
    return " ".join([message, *getattr(error, "__notes__", ())])
