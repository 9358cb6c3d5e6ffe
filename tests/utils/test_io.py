"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

import pytest

from detectron_res.utils import atomic_write, atomic_write_text


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
