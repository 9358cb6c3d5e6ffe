"""A tool's outputs never land on its inputs or on each other, and one run folder serves one run at a time.

`check_tool_paths` resolves every path a tool reads and writes (symlinks followed, `..` collapsed, as
`os.path.realpath` does) and refuses, before anything is written, an output that

- is the same file or folder as an input, or lies inside an input folder (an image folder, a data set root);
- holds an input (an output folder that an input file lies in; a symlinked input that resolves into the folder the
  tool writes), unless it is a *run folder*: a training or evaluation OUTPUT_DIR, which by design holds the
  `config.yaml` and checkpoints that later runs read, and whose own files the checkpointer guards;
- is the same path as another output of the same call.

`RunFolderLock` keeps a second run out of an OUTPUT_DIR that a live run writes: an advisory lock (flock) on
`OUTPUT_DIR/.lock`, which the kernel releases when the holding process dies, however it dies, so a killed run never
leaves the folder locked. The file names the holder's process id for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

PathLike = str | os.PathLike
LOCK_FILE = ".lock"


class PathConflictError(ValueError):
    """An output path that would overwrite an input or another output."""


class RunFolderInUseError(RuntimeError):
    """A run folder that another live process is writing."""


def resolve(path: PathLike) -> Path:
    """The absolute path with every symlink followed and `..` collapsed (for the parts that exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _flatten(named: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, str, Path]]:
    """(flag, the path as given, resolved path) for each path; a flag may name several paths (e.g. the images of a
    glob) or none (an unset option)."""
    flat = []
    for flag, value in named.items():
        if value is None or value == "":
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        for item in values:
            if item is not None and item != "":
                flat.append((flag, os.fspath(item), resolve(item)))
    return flat


def _shown(flag: str, given: str, real: Path) -> str:
    return f"{flag} {given}" if Path(given).absolute() == real else f"{flag} {given} (= {real})"


def check_tool_paths(
    *,
    inputs: Mapping[str, PathLike | Iterable[PathLike] | None],
    outputs: Mapping[str, PathLike | Iterable[PathLike] | None],
    run_folders: Iterable[str] = (),
) -> None:
    """Refuses, with one line naming both paths, an output that would overwrite or mix with an input or another
    output (the rules are in the module docstring). `inputs` and `outputs` map a flag (e.g. "--gt") to a path, a
    list of paths, or None; `run_folders` names the output flags that are run folders (inputs may lie inside).

    Raises:
        PathConflictError: the first conflict found.
    """
    run_folders = set(run_folders)
    ins, outs = _flatten(inputs), _flatten(outputs)
    for out_flag, out_given, out_real in outs:
        shown_out = _shown(out_flag, out_given, out_real)
        for in_flag, in_given, in_real in ins:
            if out_real == in_real:
                raise PathConflictError(
                    f"{shown_out} is the same path as the input {_shown(in_flag, in_given, in_real)}: "
                    "refusing to overwrite it"
                )
        for in_flag, in_given, in_real in ins:
            shown_in = _shown(in_flag, in_given, in_real)
            if in_real in out_real.parents:
                raise PathConflictError(f"{shown_out} lies inside the input {shown_in}: refusing to write there")
            if out_real in in_real.parents and out_flag not in run_folders:
                raise PathConflictError(
                    f"the input {shown_in} lies inside the output {shown_out}: the tool's files could overwrite it"
                )
    for index, (flag, given, real) in enumerate(outs):
        for other_flag, other_given, other_real in outs[index + 1 :]:
            if real == other_real:
                raise PathConflictError(
                    f"{_shown(flag, given, real)} and {_shown(other_flag, other_given, other_real)} are the same path: "
                    "one output would overwrite the other"
                )


def check_writable(path: PathLike, *, flag: str, folder: bool = False) -> None:
    """Refuses, in one line naming `flag`, an output that cannot be written because the nearest folder of it that
    exists is a file (so the rest cannot be created) or is not writable by this user: checked before any work, so
    that minutes of evaluation or tracing are not lost to a typo. `folder`: `path` is a folder to create or fill,
    not a file. (A write can still fail later, e.g. on a full disk; as root, permissions are not checked.)

    Raises:
        NotADirectoryError, PermissionError: the one-line reason.
    """
    nearest = Path(path).absolute() if folder else Path(path).absolute().parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise NotADirectoryError(f"{flag} {path} cannot be written: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path} cannot be written: no permission to write in {nearest}")


class RunFolderLock:
    """Holds `folder/.lock` for this process (see the module docstring). Use as a context manager or call
    `acquire()`, which keeps the lock until `release()` or the process ends.

    Raises (acquire):
        RunFolderInUseError: another live process holds it; the message names its process id.
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderInUseError(
                f"{self.folder} is in use by another run (process {holder}); wait for it to finish, stop it, "
                "or choose another output folder (--output)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)  # the file stays (deleting it would race with a process about to lock it)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
