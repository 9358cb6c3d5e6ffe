"""Checkpoint and weight files that cannot be read, and checkpoints that cannot be written: every read (MODEL.WEIGHTS,
MODEL.BACKBONE.WEIGHTS, --ckpt, a resume) says in one line which file and why (empty, text, truncated, a pickled
object refused); a full disk while a checkpoint is written names the file and the free space, keeps the previous
checkpoint and `last_checkpoint`, and leaves no temporary file."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from full_disk import FullAfter

from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.checkpoint import Checkpointer
from detectron_res.engine.runner import error_summary
from detectron_res.utils.io import DiskFullError

REPO = Path(__file__).resolve().parents[2]
TRUNCATED = ("a truncated or damaged zip archive ({size:,} bytes, without the directory that ends a complete archive): "
             "an interrupted write, copy or download")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(600.0))


def test_a_text_or_empty_checkpoint_names_the_file_and_why(tmp_path):
    text = tmp_path / "w.txt"
    text.write_text("if you read this, it is not a checkpoint\n")
    empty = tmp_path / "model.pth"
    empty.write_bytes(b"")
    reader = Checkpointer(model=Toy(), save_dir=tmp_path)
    with pytest.raises(ValueError) as caught:
        reader.read(text)
    assert str(caught.value) == (
        f"Could not read checkpoint {text}: not a PyTorch file but text (41 bytes starting 'if you read this, it is "
        "not a checkpoint')"
    )
    with pytest.raises(ValueError) as caught:
        reader.load(empty)
    assert str(caught.value) == f"Could not read checkpoint {empty}: the file is empty (0 bytes)"


def test_resume_skips_a_truncated_newest_checkpoint_naming_why_and_refuses_when_none_is_left(tmp_path, caplog):
    model = Toy()
    checkpointer = Checkpointer(model=model, save_dir=tmp_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer.save("model_0000002", iteration=2)
    newest = checkpointer.save("model_0000004", iteration=4)
    whole = newest.read_bytes()
    newest.write_bytes(whole[: len(whole) // 2])  # the disk filled up while it was copied
    why = TRUNCATED.format(size=len(whole) // 2)
    with caplog.at_level(logging.WARNING, logger="detectron_res"):
        path, state = checkpointer.resume_point()
    assert path.name == "model_0000002.pth" and state["iteration"] == 2
    assert f"Cannot resume from {newest}: Could not read checkpoint {newest}: {why}" in caplog.messages
    (tmp_path / "model_0000002.pth").unlink()
    with pytest.raises(ValueError) as caught:
        checkpointer.resume_point()
    assert str(caught.value) == (
        f"--resume: none of the checkpoints in {tmp_path} can be resumed from (model_0000004.pth: Could not read "
        f"checkpoint {newest}: {why}). Move them away to start afresh, or choose another output folder."
    )


def test_a_checkpoint_pickling_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload_ran"

    class WritesAMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "model_final.pth"
    torch.save({"model": Toy().state_dict(), "metadata": WritesAMarker()}, crafted)
    with pytest.raises(ValueError) as caught:
        Checkpointer(model=Toy(), save_dir=tmp_path).load(crafted)
    assert str(caught.value) == (
        f"Could not read checkpoint {crafted}: it holds a pickled Python object (io.open) that is refused, since "
        "loading it could run code from the file; only tensors and plain containers (a state_dict) are read"
    )
    assert not marker.exists()


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one_and_the_pointer(tmp_path, monkeypatch):
    checkpointer = Checkpointer(model=Toy(), save_dir=tmp_path)
    previous = checkpointer.save("model_0000002", iteration=2)
    before = previous.read_bytes()
    real_fdopen = __import__("os").fdopen
    monkeypatch.setattr("os.fdopen", lambda fd, *args, **kwargs: FullAfter(real_fdopen(fd, *args, **kwargs), 1000))
    monkeypatch.setattr("os.statvfs", lambda path: SimpleNamespace(f_bavail=3, f_frsize=4096))
    with pytest.raises(DiskFullError) as caught:
        checkpointer.save("model_0000004", iteration=4)
    assert "unexpected pos" in str(caught.value.__cause__)  # what torch said
    written = int(str(caught.value).split("removing the ")[1].split(" bytes")[0])
    assert 0 < written <= 1000
    assert error_summary(caught.value) == (  # the line a tool prints
        f"Could not write {tmp_path / 'model_0000004.pth'}: the filesystem is full (no space left on device): 12,288 "
        f"bytes free in {tmp_path} after removing the {written} bytes written so far; model_0000004.pth was not "
        "created. The newest checkpoint is still model_0000002.pth: free some space, then continue with --resume."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth"]
    assert previous.read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


# -- through the tools ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=4, num_val=1, image_size=64, seed=1)
    return f"{root}/annotations/instances_train.json:{root}/train"


def tool_arguments(shapes_pair: str, out: Path, *extra: str) -> list[str]:
    return [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{shapes_pair}]", "DATASETS.TEST=[]", "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[64]",
        "INPUT.MAX_SIZE_TRAIN=64", "SOLVER.IMS_PER_BATCH=2", "SOLVER.STEPS=[]", *extra,
    ]  # fmt: skip


def run_tool(script: str, arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, timeout=300)


def test_the_tools_say_which_weights_file_is_unreadable_and_why_in_one_line(shapes_pair, tmp_path):
    text = tmp_path / "w.txt"
    text.write_text("hello weights\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    buffer = io.BytesIO()
    torch.save({"state_dict": Toy().state_dict()}, buffer)
    truncated = tmp_path / "R-18.pth"
    truncated.write_bytes(buffer.getvalue()[:2000])
    empty_pkl = tmp_path / "R-50.pkl"
    empty_pkl.write_bytes(b"")
    cases = [
        ("test_det.py", ["--ckpt", str(text)],
         f"Could not read checkpoint {text}: not a PyTorch file but text (14 bytes starting 'hello weights')"),
        ("train_det.py", [f"MODEL.WEIGHTS={empty}"], f"Could not read checkpoint {empty}: the file is empty (0 bytes)"),
        ("train_det.py", [f"MODEL.BACKBONE.WEIGHTS={truncated}"],
         f"Could not read weights file {truncated}: {TRUNCATED.format(size=2000)}"),
        ("train_det.py", [f"MODEL.BACKBONE.WEIGHTS={empty_pkl}"],
         f"Could not read {empty_pkl} as a pickle of numpy arrays: the file is empty (0 bytes)"),
    ]  # fmt: skip
    for number, (tool, extra, message) in enumerate(cases):
        done = run_tool(str(REPO / "tools" / tool), tool_arguments(shapes_pair, tmp_path / f"out{number}", *extra))
        assert (done.returncode, done.stderr) == (1, f"{tool}: error: {message}\n")


def test_train_det_on_a_full_disk_prints_one_line_and_keeps_the_previous_checkpoint(shapes_pair, tmp_path):
    """The disk fills up while model_0000004.pth is written (each write to its temporary file fails after 5000
    bytes, as torch's zip writer sees it: `unexpected pos`)."""
    driver = tmp_path / "full_disk_driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        from types import SimpleNamespace

        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from full_disk import FullAfter

        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            stream = real_fdopen(fd, *args, **kwargs)
            full = "/.model_0000004.pth." in os.readlink(f"/proc/self/fd/{{fd}}")
            return FullAfter(stream, 5000) if full else stream

        os.fdopen = fdopen
        os.statvfs = lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096)
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    out = tmp_path / "out"
    arguments = tool_arguments(shapes_pair, out, "SOLVER.MAX_ITER=5", "SOLVER.CHECKPOINT_PERIOD=2")
    done = run_tool(str(driver), [str(REPO / "tools/train_det.py"), *arguments])
    assert done.returncode == 1
    written = int(done.stderr.split("removing the ")[1].split(" bytes")[0])
    assert done.stderr == (
        f"train_det.py: error: Could not write {out / 'model_0000004.pth'}: the filesystem is full (no space left on "
        f"device): 0 bytes free in {out} after removing the {written:,} bytes written so far; model_0000004.pth was "
        "not created. The newest checkpoint is still model_0000002.pth: free some space, then continue with --resume.\n"
    )
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in out.iterdir() if "model_" in p.name or p.suffix == ".tmp") == ["model_0000002.pth"]
    assert torch.load(out / "model_0000002.pth", weights_only=True)["iteration"] == 2
