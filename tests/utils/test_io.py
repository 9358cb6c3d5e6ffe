"""Atomic writes: the old file survives a failed write, no temporary file is left behind, files get the umask's
mode, and temporary files of killed writers are cleaned up."""

import os
import stat
import subprocess
import sys

import pytest

from detectron_res.utils import atomic_write, atomic_write_text, remove_orphaned_temporary_files


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
