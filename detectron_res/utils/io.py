"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, config or metrics file (or a
half-generated data set folder, `build_folder_atomically`).

The temporary file is ``.<name>.<pid>.<random>.tmp`` beside the target, created with mode 0666 minus the umask
(like any other file the process writes). A process killed during a write leaves it behind;
`remove_orphaned_temporary_files` deletes those of processes that are gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(file)`` on a temporary binary file beside ``path``, fsyncs it, then renames it to ``path``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically, as `atomic_write`."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def remove_orphaned_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of `atomic_write` in ``folder`` whose writing process no longer runs (it was
    killed mid-write); returns them. Files of running processes (another run writing now) are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.fullmatch(path.name)
        if match is None or not path.is_file() or _process_is_running(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("Removed %s, left by an interrupted write of %s", path, match["name"])
    return removed


def _process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def build_folder_atomically(root: str | os.PathLike, build: Callable[[Path], object], *, done: Callable[[], bool]) -> Path:
    """Make ``root`` by calling ``build(folder)`` on a temporary sibling folder, then renaming it to ``root`` (an older
    ``root`` is moved aside and deleted first), so that an interrupted build never leaves a folder that looks
    complete. ``done()`` says whether ``root`` is already what is wanted: when the final rename fails because another
    process finished the same folder first, that is not an error."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{root.name}-partial-", dir=root.parent))
    try:
        build(temporary)
        if root.exists():
            stale = root.with_name(f".{root.name}-stale-{uuid.uuid4().hex}")
            try:
                root.rename(stale)
            except FileNotFoundError:  # another process moved it first
                pass
            else:
                shutil.rmtree(stale, ignore_errors=True)
        temporary.chmod(0o755)  # mkdtemp makes it private
        try:
            temporary.rename(root)
        except OSError:
            if not done():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root

