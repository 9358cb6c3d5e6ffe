"""A script that starts worker processes must keep its top-level calls under ``if __name__ == "__main__":``.

The data-loading workers start from a fork server (spawn on Windows), and multiprocessing starts each such worker
by importing the main script again (as ``__mp_main__``) so that whatever the script defines can be unpickled
there. A script that calls a tool's ``main`` at its top level, unguarded, would so start a second training inside
every worker; Python then stops the worker with "An attempt has been made to start a new process before the current
process has finished its bootstrapping phase", and the training sees only "DataLoader worker exited unexpectedly".
torch's and detectron2's documentation ask for the guard; these checks say so before anything goes wrong
(`check_main_guard`, in the process that starts the workers) or, should that check miss a case, in the worker
(`check_not_bootstrapping`).
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
from types import FrameType

GUARD = 'if __name__ == "__main__":'


def unguarded_main_statement(frame: FrameType | None = None) -> tuple[str, int] | None:
    """(file, line) of the main script's top-level statement now running, when that statement is not an ``if``
    testing ``__name__``; None when it is, or when there is no main script file (``python -c``, a notebook, an
    interactive session: nothing is imported again) or it cannot be read and parsed."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return None
    main_file = os.path.realpath(main_file)
    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"
                and os.path.realpath(frame.f_code.co_filename) == main_file):
            break
        frame = frame.f_back
    if frame is None:
        return None
    try:
        with open(main_file, "rb") as f:
            tree = ast.parse(f.read(), filename=main_file)
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for statement in tree.body:
        if statement.lineno <= line <= (statement.end_lineno or statement.lineno):
            if isinstance(statement, ast.If) and any(
                isinstance(node, ast.Name) and node.id == "__name__" for node in ast.walk(statement.test)
            ):
                return None
            return main_file, statement.lineno
    return None


def check_main_guard(num_workers: int) -> None:
    """Refuses to start `num_workers` (> 0) worker processes from a main script's unguarded top-level statement.

    Raises:
        RuntimeError: naming the script, the line and the fix.
    """
    if num_workers <= 0:
        return
    found = unguarded_main_statement(sys._getframe(1))
    if found is None:
        return
    path, line = found
    raise RuntimeError(
        f"{path}, line {line}, starts {num_workers} data-loading worker process(es) (DATALOADER.NUM_WORKERS) from "
        f"the script's top level: each worker imports the script again and would run that line again. Put the "
        f"script's top-level calls under `{GUARD}` (docs/own_data.md), or set DATALOADER.NUM_WORKERS=0"
    )


def check_not_bootstrapping(what: str) -> None:
    """Refuses to run `what` (a tool's main) while this process is a worker importing the main script
    (multiprocessing's bootstrapping phase): the script called it at its top level, unguarded.

    Raises:
        RuntimeError: naming the script and the fix.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "the main script"
        raise RuntimeError(
            f"{what} was called while a worker process imported {script} (worker processes import the main script "
            f"again): put the script's top-level calls under `{GUARD}` (docs/own_data.md)"
        )
