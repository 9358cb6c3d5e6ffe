"""check_tool_paths: outputs never land on inputs or on each other, however the path is spelled; RunFolderLock."""

import os
import subprocess
import sys

import pytest

from detectron_res.utils.paths import (
    PathConflictError,
    RunFolderInUseError,
    RunFolderLock,
    check_tool_paths,
    check_writable,
)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"image")
    (tmp_path / "out").mkdir()
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\n")
    os.symlink(tmp_path / "in", tmp_path / "link_to_in")
    os.symlink(tmp_path / "out", tmp_path / "link_to_out")
    return tmp_path


def test_distinct_paths_pass(tree):
    check_tool_paths(inputs={"--input": tree / "in", "--gt": tree / "gt.csv"},
                     outputs={"--output": tree / "out", "--json-out": tree / "m.json", "--none": None})


@pytest.mark.parametrize(
    "output", ["in", "in/../in", "link_to_in", "in/a.jpg", "link_to_in/a.jpg", "gt.csv", "./gt.csv"]
)
def test_output_equal_to_an_input_is_refused(tree, output):
    with pytest.raises(PathConflictError, match="--output .* same path as the input"):
        check_tool_paths(inputs={"--input": [tree / "in", tree / "in" / "a.jpg"], "--gt": tree / "gt.csv"},
                         outputs={"--output": tree / output})


def test_output_inside_an_input_folder_is_refused(tree):
    with pytest.raises(PathConflictError, match=r"--out .*in/sub/s\.txt.* lies inside the input --images"):
        check_tool_paths(inputs={"--images": tree / "in"}, outputs={"--out": tree / "link_to_in" / "sub" / "s.txt"})


def test_input_inside_an_output_folder_is_refused_except_in_a_run_folder(tree):
    os.symlink(tree / "out" / "b.jpg", tree / "in" / "b.jpg")  # an input that is a symlink into the output
    (tree / "out" / "b.jpg").write_bytes(b"other image")
    with pytest.raises(PathConflictError, match="the input --input .*b.jpg.* lies inside the output --output"):
        check_tool_paths(inputs={"--input": tree / "in" / "b.jpg"}, outputs={"--output": tree / "out"})
    check_tool_paths(inputs={"--cfg": tree / "link_to_out" / "config.yaml"}, outputs={"--output": tree / "out"},
                     run_folders=["--output"])


def test_two_outputs_on_one_path_are_refused(tree):
    with pytest.raises(PathConflictError, match=r"--out .*same.txt and --csv-out .*same.txt\) are the same path"):
        check_tool_paths(inputs={}, outputs={"--out": tree / "same.txt", "--csv-out": tree / "x" / ".." / "same.txt"})


def test_an_unrelated_prefix_is_not_inside(tree):
    (tree / "in2").mkdir()
    check_tool_paths(inputs={"--images": tree / "in"}, outputs={"--out": tree / "in2" / "s.txt"})


def test_run_folder_lock_refuses_a_second_holder_naming_its_pid_and_frees_on_death(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from detectron_res.utils.paths import RunFolderLock;"
         f"RunFolderLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_use = f"{tmp_path} is in use by another run \\(process {holder.pid}\\)"
        with pytest.raises(RunFolderInUseError, match=in_use):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunFolderLock(tmp_path) as lock:  # SIGKILL released it
        assert lock.held
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / ".lock").read_text() == ""


def test_check_writable_names_the_file_in_the_way(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    check_writable(tmp_path / "new" / "deeper" / "m.json", flag="--json-out")  # folders to be made: fine
    check_writable(tmp_path / "plots", flag="--out", folder=True)
    with pytest.raises(NotADirectoryError) as error:
        check_writable(blocker / "sub" / "m.json", flag="--json-out")
    assert str(error.value) == (
        f"--json-out {blocker / 'sub' / 'm.json'} cannot be written: {blocker} is a file, not a folder"
    )
    with pytest.raises(NotADirectoryError, match=f"--out {blocker} cannot be written: {blocker} is a file"):
        check_writable(blocker, flag="--out", folder=True)
    check_writable(blocker, flag="--json-out")  # an existing file output: its folder is what must be writable
