"""Atomic writes: the old file survives a failed write, no temporary file is left behind, files get the umask's
mode, temporary files of killed writers are cleaned up, and a full disk is named as such. Safe reads: a PyTorch file
is read weights-only and an unreadable one is refused in one line saying why."""

import errno
import io
import os
import pickle
import stat
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from full_disk import FullAfter

from detectron_res.utils import atomic_write, atomic_write_text, remove_orphaned_temporary_files
from detectron_res.utils.io import DiskFullError, UnreadableFileError, read_torch_file
from detectron_res.utils.signals import Terminated


def test_atomic_write_text_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pth"
    atomic_write_text(path, "good")

    def crash(stream):
        stream.write(b"half of a new chec")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_written_files_get_the_umask_mode_like_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        (tmp_path / "log.txt").write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "log.txt").stat().st_mode) == 0o644


def test_temporary_files_of_killed_writers_are_removed_and_those_of_running_ones_kept(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()  # a process id that no longer runs
    orphan = tmp_path / f".model_0000010.pth.{writer.pid}.0123abcd.tmp"
    busy = tmp_path / f".model_0000020.pth.{os.getppid()}.0123abcd.tmp"  # the test runner's parent still runs
    other = tmp_path / ".hidden.tmp"  # not ours
    for path in (orphan, busy, other):
        path.write_bytes(b"half a checkpoint")
    assert remove_orphaned_temporary_files(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name])


# -- a full disk ---------------------------------------------------------------------------------------------------
def fake_free_space(monkeypatch, free_bytes: int) -> None:
    """os.statvfs reports `free_bytes` available (in 4096-byte blocks)."""
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096))


def fills_the_disk_after(limit: int, code: int = errno.ENOSPC):
    """A writer that writes `limit` bytes of a new file, then fails as a write to a full disk does."""

    def write(stream):
        stream.write(b"x" * limit)
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "the filesystem is full (no space left on device)"), (errno.EDQUOT, "the disk quota is exceeded")],
)
def test_a_write_to_a_full_disk_names_the_file_and_the_free_space_and_keeps_the_old_file(
    tmp_path, monkeypatch, code, reason
):
    path = tmp_path / "model_final.pth"
    path.write_bytes(b"the previous checkpoint")
    fake_free_space(monkeypatch, 8192)
    with pytest.raises(DiskFullError) as caught:
        atomic_write(path, fills_the_disk_after(1500, code))
    assert str(caught.value) == (
        f"Could not write {path}: {reason}: 8,192 bytes free in {tmp_path} after removing the 1,500 bytes written so "
        "far; the previous model_final.pth is kept."
    )
    assert isinstance(caught.value, OSError) and caught.value.errno == code and caught.value.free_bytes == 8192
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pth"]  # the partial file is gone


def test_torchs_unexpected_pos_error_of_a_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer turns the failed write into `RuntimeError: [enforce fail at inline_container.cc] .
    unexpected pos ...`; the OSError it failed on is that error's context."""

    fake_free_space(monkeypatch, 0)
    path = tmp_path / "model_0000004.pth"
    with pytest.raises(DiskFullError) as caught:
        atomic_write(path, lambda stream: torch.save({"w": torch.zeros(10000)}, FullAfter(stream, 5000)))
    assert isinstance(caught.value.__cause__, RuntimeError) and "unexpected pos" in str(caught.value.__cause__)
    written = int(str(caught.value).split("removing the ")[1].split(" bytes")[0])
    assert 0 < written <= 5000
    assert str(caught.value) == (
        f"Could not write {path}: the filesystem is full (no space left on device): 0 bytes free in {tmp_path} after "
        f"removing the {written} bytes written so far; model_0000004.pth was not created."
    )
    assert list(tmp_path.iterdir()) == []


def test_an_error_without_errno_on_a_filesystem_with_no_byte_left_is_a_full_disk(tmp_path, monkeypatch):
    def fails(stream):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    fake_free_space(monkeypatch, 0)
    with pytest.raises(DiskFullError, match=r"the filesystem is full .*: 0 bytes free in"):
        atomic_write(tmp_path / "a.pth", fails)
    fake_free_space(monkeypatch, 4096)  # with space left, the same error is not about space
    with pytest.raises(RuntimeError, match="unexpected pos 704 vs 598"):
        atomic_write(tmp_path / "a.pth", fails)


def test_no_inode_left_for_the_temporary_file_is_a_full_disk(tmp_path, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    fake_free_space(monkeypatch, 0)
    monkeypatch.setattr(os, "open", no_inode)
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert str(caught.value) == (
        f"Could not write {tmp_path / 'metrics.json'}: the filesystem is full (no space left on device): 0 bytes free "
        f"in {tmp_path} after removing the 0 bytes written so far; metrics.json was not created."
    )


# -- safe reads ----------------------------------------------------------------------------------------------------
class WritesAMarker:
    """Unpickled, it opens `marker` for writing, which creates the file: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def checkpoint_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


GOOD = checkpoint_bytes({"model": {"w": torch.arange(300.0)}})
LEGACY = checkpoint_bytes({"model": {"w": torch.arange(300.0)}}, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"", "the file is empty (0 bytes)", id="empty"),
        pytest.param(b"hello weights\n", "not a PyTorch file but text (14 bytes starting 'hello weights')", id="text"),
        pytest.param(b"<!DOCTYPE html>\n<html><body>Not Found</body></html>",
                     "not a PyTorch file but an HTML page (a failed download?)", id="html"),
        pytest.param(b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n",
                     "not a PyTorch file but a Git LFS pointer to it (run `git lfs pull`)", id="lfs-pointer"),
        pytest.param(bytes(range(1, 40)), "not a PyTorch file: neither a zip archive nor a pickle (its first bytes are "
                     "01 02 03 04 05 06 07 08)", id="binary"),
        pytest.param(GOOD[:1000], "a truncated or damaged zip archive (1,000 bytes, without the directory that ends a "
                     "complete archive): an interrupted write, copy or download", id="truncated-zip"),
        pytest.param(LEGACY[:300], "a truncated or damaged file in PyTorch's older (pickle) format (300 bytes)",
                     id="truncated-legacy"),
        pytest.param(LEGACY[:400], "a truncated or damaged file in PyTorch's older (pickle) format (400 bytes; "
                     "unexpected EOF, expected 1167 more bytes)",
                     id="truncated-legacy-later"),
    ],
)
def test_an_unreadable_torch_file_is_named_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError) as caught:
        read_torch_file(path, what="checkpoint")
    assert str(caught.value) == f"Could not read checkpoint {path}: {reason}"


def test_pickled_objects_are_refused_unbuilt_and_named(tmp_path):
    marker = tmp_path / "payload_ran"
    payload = tmp_path / "payload.pth"
    payload.write_bytes(checkpoint_bytes({"model": {"w": torch.zeros(2)}, "x": WritesAMarker(marker)}))
    module = tmp_path / "module.pth"
    module.write_bytes(checkpoint_bytes(torch.nn.Linear(2, 2)))  # torch.save(model): the classes, not a state_dict
    arrays = tmp_path / "arrays.pth"
    arrays.write_bytes(pickle.dumps({"w": np.zeros(2)}, protocol=2))  # Detectron's R-50.pkl, named .pth
    refused = ("that is refused, since loading it could run code from the file; only tensors and plain containers "
               "(a state_dict) are read")
    for path, name in ((payload, "io.open"), (module, "torch.nn.modules.linear.Linear")):
        with pytest.raises(UnreadableFileError) as caught:
            read_torch_file(path, what="weights file")
        assert str(caught.value) == (
            f"Could not read weights file {path}: it holds a pickled Python object ({name}) {refused}"
        )
    assert not marker.exists()
    with pytest.raises(UnreadableFileError) as caught:
        read_torch_file(arrays, what="weights file")
    reconstruct = np.zeros(2).__reduce__()[0]  # the global numpy's pickles name: where depends on numpy's version
    assert str(caught.value) == (
        f"Could not read weights file {arrays}: it holds a pickled Python object ({reconstruct.__module__}."
        f"{reconstruct.__name__}) {refused}; a Detectron/detectron2 pickle of numpy arrays is read when its name ends "
        "in .pkl"
    )


def test_a_good_file_of_either_format_is_read(tmp_path):
    for name, content in (("new.pth", GOOD), ("legacy.pth", LEGACY)):
        (tmp_path / name).write_bytes(content)
        assert torch.equal(read_torch_file(tmp_path / name, what="checkpoint")["model"]["w"], torch.arange(300.0))


class InterruptedAfter(FullAfter):
    """A file that takes `limit` bytes, then is interrupted as SIGTERM interrupts a write (the handler raises)."""

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise Terminated("SIGTERM")
        return super().write(data)


def test_sigterm_during_a_checkpoint_write_stays_an_interruption(tmp_path):
    """torch's zip writer turns the interrupted write into `RuntimeError: ... unexpected pos` (a training stopped by
    SIGTERM while saving exited 1 with that line); atomic_write raises the interruption itself, and keeps the old
    file."""
    path = tmp_path / "model_final.pth"
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(Terminated):
        atomic_write(path, lambda stream: torch.save({"w": torch.zeros(10000)}, InterruptedAfter(stream, 5000)))
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pth"]
