"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, config or metrics file (or a
half-generated data set folder, `build_folder_atomically`); and safe reads of PyTorch files (`read_torch_file`).

The temporary file is ``.<name>.<pid>.<random>.tmp`` beside the target, created with mode 0666 minus the umask
(like any other file the process writes). A process killed during a write leaves it behind;
`remove_orphaned_temporary_files` deletes those of processes that are gone. A write that fails because the
filesystem is full (or the disk quota is exceeded) raises `DiskFullError`, one line naming the file and the free
space, instead of the bare error of the writer (torch's zip writer says `unexpected pos ...`).

`read_torch_file` loads with `weights_only=True` only (tensors and plain containers: a file cannot run code when it
is read) and says in one line why a file cannot be read: empty, text, truncated, pickled objects refused, ...
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
_FULL_ERRNOS = {errno.ENOSPC: "the filesystem is full (no space left on device)"}
if hasattr(errno, "EDQUOT"):
    _FULL_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"


class DiskFullError(OSError):
    """A write failed because the filesystem holding the file is full or the user's disk quota is used up; the
    target file was left as it was and the partial temporary file removed. `str()` is one line."""

    def __init__(self, message: str, *, code: int, path: Path, free_bytes: int | None):
        super().__init__(message)
        self.errno = code
        self.path = path
        self.free_bytes = free_bytes

    def __str__(self) -> str:
        return str(self.args[0])


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(file)`` on a temporary binary file beside ``path``, fsyncs it, then renames it to ``path``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is left as it was.

    Raises:
        DiskFullError: the write, flush, fsync or rename failed for lack of space (ENOSPC, EDQUOT, also when the
            writer wrapped that error, as torch's zip writer does, or when the filesystem has no byte left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as error:  # no inode left
        if error.errno in _FULL_ERRNOS:
            raise _disk_full_error(path, code=error.errno, written=0) from error
        raise
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        code = _disk_full_errno(error, folder=path.parent) if isinstance(error, Exception) else None
        written = _file_size(temporary)
        temporary.unlink(missing_ok=True)
        interrupt = _interrupt_in_chain(error)
        if interrupt is not None and interrupt is not error:  # Ctrl-C or SIGTERM that the writer wrapped (torch's
            raise interrupt from None  # zip writer: `unexpected pos`) stays an interruption, not an error
        if code is None:
            raise
        raise _disk_full_error(path, code=code, written=written) from error


def _interrupt_in_chain(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM as `utils.signals.Terminated`) among `error` and the errors it was
    raised from or during, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _disk_full_error(path: Path, *, code: int, written: int) -> DiskFullError:
    """The one-line error of a write to `path` that failed for lack of space, after its temporary file (`written`
    bytes) was removed: the file, the reason, the bytes now free there, and that `path` is unchanged."""
    free = _free_bytes(path.parent)
    kept = f"the previous {path.name} is kept" if path.exists() else f"{path.name} was not created"
    return DiskFullError(
        f"Could not write {path}: {_FULL_ERRNOS[code]}: {'?' if free is None else f'{free:,}'} bytes free in "
        f"{path.parent} after removing the {written:,} bytes written so far; {kept}.",
        code=code, path=path, free_bytes=free,
    )


def _disk_full_errno(error: BaseException, *, folder: Path) -> int | None:
    """ENOSPC or EDQUOT when `error`, or an error it was raised from or during (torch's zip writer raises
    `RuntimeError: ... unexpected pos` while the OSError of the failed write is its context), is one; ENOSPC for an
    OSError or RuntimeError without an errno when the filesystem of `folder` has no byte left; else None."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return current.errno
        stack += [current.__cause__, current.__context__]
    if isinstance(error, (OSError, RuntimeError)) and _free_bytes(folder) == 0:
        return errno.ENOSPC
    return None


def _free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged user may still write on the filesystem of `folder`; None when unknown."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    return stats.f_bavail * stats.f_frsize


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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



# -- safe reads ----------------------------------------------------------------------------------------------------
class UnreadableFileError(ValueError):
    """A file that cannot be read as what it should be; the one-line message names the file and says why."""


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save's format before 1.6: a magic number
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_HEAD_BYTES = 256


def read_torch_file(path: str | os.PathLike, *, what: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and plain containers only, so
    that reading a file never runs code from it (a pickled object of any other class is refused).

    Raises:
        UnreadableFileError: the file cannot be read; one line, ``Could not read <what> <path>: <why>``
            (`torch_file_problem`).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, KeyError, EOFError, ...
        raise UnreadableFileError(f"Could not read {what} {path}: {torch_file_problem(path, error)}") from error


def torch_file_problem(path: str | os.PathLike, error: BaseException) -> str:
    """Why `torch.load(path, weights_only=True)` failed with `error`, in a few words: the file is empty, is text
    (an HTML page, a Git LFS pointer), is neither a zip archive nor a pickle, is a truncated or damaged zip archive
    or pickle, or holds a pickled object that a weights-only load refuses (it names its class)."""
    found = file_kind_problem(path)
    if found is not None:
        return found
    size, head = _size_and_head(Path(path))
    if isinstance(error, OSError) and error.strerror:  # e.g. permission denied
        return error.strerror.lower()
    refused = _refused_global(error)
    if head.startswith(_ZIP_MAGIC):
        import zipfile

        if not zipfile.is_zipfile(path):
            return (f"a truncated or damaged zip archive ({size:,} bytes, without the directory that ends a complete "
                    "archive): an interrupted write, copy or download")
        if refused:
            return _refusal(refused)
        return f"a damaged PyTorch archive ({_first_line(error)})"
    if refused and not _cannot_exist(refused):
        return _refusal(refused)
    if not head.startswith(_LEGACY_TORCH_MAGIC):
        return ("a Python pickle that is not a PyTorch file (a Detectron/detectron2 pickle of numpy arrays is read "
                f"when its name ends in .pkl; {_first_line(error)})")
    detail = "" if refused else f"; {_first_line(error)}"
    return f"a truncated or damaged file in PyTorch's older (pickle) format ({size:,} bytes{detail})"


def file_kind_problem(path: str | os.PathLike, *, expected: str = "PyTorch") -> str | None:
    """What is wrong with `path` whatever the reader: unreadable, empty (0 bytes), text (an HTML page, a Git LFS
    pointer, anything else), or bytes that are neither a zip archive (PyTorch's format) nor a pickle; None when it
    starts like a zip archive or a pickle."""
    path = Path(path)
    try:
        size, head = _size_and_head(path)
    except OSError as error:
        return f"it cannot be opened ({(error.strerror or str(error)).lower()})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL):
        return None
    text = _as_text(head)
    if text is not None:
        start = text.strip().splitlines()[0][:40] if text.strip() else ""
        if start.lower().startswith(("<!doctype html", "<html")):
            return f"not a {expected} file but an HTML page (a failed download?)"
        if start.startswith("version https://git-lfs"):
            return f"not a {expected} file but a Git LFS pointer to it (run `git lfs pull`)"
        return f"not a {expected} file but text ({size:,} bytes starting {start!r})"
    return f"not a {expected} file: neither a zip archive nor a pickle (its first bytes are {head[:8].hex(' ')})"


def _size_and_head(path: Path) -> tuple[int, bytes]:
    with open(path, "rb") as stream:
        return os.fstat(stream.fileno()).st_size, stream.read(_HEAD_BYTES)


def _as_text(head: bytes) -> str | None:
    """`head` decoded when it looks like the start of a text file (UTF-8, printable, no NUL), else None."""
    if b"\x00" in head:
        return None
    text = head.decode("utf-8", errors="replace")
    if text[-1:] == "\ufffd":  # a character cut by the end of `head`
        text = text[:-1]
    if "\ufffd" in text or not all(c.isprintable() or c in "\t\n\r\f" for c in text):
        return None
    return text


def _refused_global(error: BaseException) -> str | None:
    """The class or function a weights-only load refused (`posix.system`, `argparse.Namespace`), or None."""
    for message in (str(error), str(error.__cause__ or ""), str(error.__context__ or "")):
        match = _GLOBAL.search(message)
        if match:
            return match.group(1)
    return None


def _refusal(name: str) -> str:
    hint = "; a Detectron/detectron2 pickle of numpy arrays is read when its name ends in .pkl" if name.startswith(
        "numpy") else ""
    return (f"it holds a pickled Python object ({name}) that is refused, since loading it could run code from the "
            f"file; only tensors and plain containers (a state_dict) are read{hint}")


def _cannot_exist(name: str) -> bool:
    """Whether a global a pickle names cannot exist: its module is loaded but lacks it (a name cut short by a
    truncated file). Nothing is imported for this."""
    module, _, attribute = name.rpartition(".")
    if not module or not attribute:  # "collections." cut after the dot
        return True
    return module in sys.modules and not hasattr(sys.modules[module], attribute)


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message, without torch's advice about `weights_only`."""
    inner = error.__cause__ or error.__context__
    message = str(error).strip()
    if inner is not None and "Weights only load failed" in message:
        message = str(inner).strip()
    line = message.splitlines()[0] if message else type(error).__name__
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= 160 else line[:157] + "..."
