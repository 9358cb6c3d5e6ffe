"""A training and the processes around it (issue 21 items 7, 15 and 19): Ctrl-C and SIGTERM print one line that
names the newest checkpoint and exit 130 / 143; no process of the training (fork server, loader worker, resource
tracker) outlives it by more than 10 s, after SIGTERM, Ctrl-C to the whole process group, or SIGKILL of the main
process; a second training on the same folder is refused while the first lives, and not after it was killed.

Each training runs in its own session, so that its processes can be found (and Ctrl-C sent to its process group,
as a terminal does) without touching anything else."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import load_tool, package_logger_restored
from detectron_res.data.datasets import generate_loc_shapes, generate_shapes
from detectron_res.data.loader import exit_when_gone

REPO = Path(__file__).resolve().parents[2]
MAX_ITER = 100000  # never reached: the signal comes first


@pytest.fixture(scope="module")
def shapes_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=2, image_size=96, seed=1)
    return f"{root}/annotations/instances_train.json:{root}/train"


@pytest.fixture(scope="module")
def loc_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc_shapes")
    generate_loc_shapes(root, num_train=8, num_val=2, seed=3)
    return root


def session_processes(session: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes of `session` (zombies, which are dead, left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


def wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def start(tool: str, args: list[str], out: Path) -> subprocess.Popen:
    """The tool in a new session, once it has written a checkpoint and its loader worker is running."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{tool} ended early ({process.returncode}): {process.stderr.read()}")
        workers = [cmd for _, cmd in session_processes(process.pid) if "forkserver" in cmd]
        return (out / "last_checkpoint").exists() and len(workers) >= 2  # the fork server and a worker
    wait_for(ready, timeout=240, what=f"{tool}'s first checkpoint and loader worker")
    assert {"resource_tracker" in cmd for _, cmd in session_processes(process.pid)} == {True, False}
    return process


def train_det(shapes_pair: str, out: Path) -> subprocess.Popen:
    return start("train_det.py", [
        "--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{shapes_pair}]", "DATASETS.TEST=[]", "DATALOADER.NUM_WORKERS=1", "INPUT.MIN_SIZE_TRAIN=[96]",
        "INPUT.MAX_SIZE_TRAIN=96", "SOLVER.IMS_PER_BATCH=2", f"SOLVER.MAX_ITER={MAX_ITER}", "SOLVER.STEPS=[]",
        "SOLVER.WARMUP_ITERS=1", "SOLVER.CHECKPOINT_PERIOD=2", "LOG_PERIOD=1",
    ], out)  # fmt: skip


def stopped(process: subprocess.Popen, sent: signal.Signals, *, group: bool = False) -> tuple[int, list[str]]:
    """Sends `sent` (to the whole process group with `group`, as a terminal's Ctrl-C); returns the exit status and
    the stderr lines, after checking that every process of the session is gone within 10 s."""
    (os.killpg if group else os.kill)(process.pid, sent)
    sent_at = time.monotonic()
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # stderr stays open while a leaked child holds it
        err = ""
    leaked = []

    def session_gone() -> bool:
        leaked[:] = session_processes(process.pid)
        return not leaked
    try:
        wait_for(session_gone, timeout=max(0.0, sent_at + 10 - time.monotonic()), what="the session to end")
    except AssertionError:
        for pid, _ in leaked:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"alive 10 s after {sent.name}: {leaked}") from None
    return process.wait(), err.splitlines()


def test_sigterm_stops_workers_and_names_the_checkpoint_to_resume_from(shapes_pair, tmp_path):
    out = tmp_path / "run"
    code, lines = stopped(train_det(shapes_pair, out), signal.SIGTERM)
    newest = (out / "last_checkpoint").read_text().strip()
    assert code == 143
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"train_det\.py: interrupted by SIGTERM after \d+ of {MAX_ITER} iterations; the newest checkpoint is "
        rf"{re.escape(str(out / newest))}: run the same command with --resume to continue from it",
        lines[0],
    ), lines[0]
    assert "Stopped: interrupted by SIGTERM" in (out / "log.txt").read_text()


def test_ctrl_c_to_the_process_group_prints_one_line_and_exits_130(shapes_pair, tmp_path):
    out = tmp_path / "run"
    code, lines = stopped(train_det(shapes_pair, out), signal.SIGINT, group=True)
    assert code == 130
    assert len(lines) == 1, lines
    assert lines[0].startswith("train_det.py: interrupted by Ctrl-C (SIGINT) after ")
    assert lines[0].endswith(f"{out / (out / 'last_checkpoint').read_text().strip()}: run the same command with "
                             "--resume to continue from it")


def test_sigterm_to_the_whole_group_as_slurm_sends_it(shapes_pair, tmp_path):
    code, lines = stopped(train_det(shapes_pair, tmp_path / "run"), signal.SIGTERM, group=True)
    assert (code, len(lines)) == (143, 1), lines
    assert lines[0].startswith("train_det.py: interrupted by SIGTERM after ")


def test_sigkill_of_the_main_process_leaves_no_worker_behind(shapes_pair, tmp_path):
    code, _ = stopped(train_det(shapes_pair, tmp_path / "run"), signal.SIGKILL)
    assert code == -signal.SIGKILL


def test_train_loc_ctrl_c_names_its_stage_checkpoint(loc_shapes, tmp_path):
    out = tmp_path / "run"
    process = start("train_loc.py", [
        "--cfg", str(REPO / "configs/loc_shapes_r18.yaml"), f"OUTPUT_DIR={out}", "--stage", "rpn", "MODEL.DEVICE=cpu",
        f"DATASETS.TRAIN=[{loc_shapes}/LOC_train_solution.csv:{loc_shapes}/train]", "DATASETS.TEST=[]",
        "DATALOADER.NUM_WORKERS=1", "SOLVER.IMS_PER_BATCH=2", f"SOLVER.MAX_ITER={MAX_ITER}", "SOLVER.STEPS=[]",
        "SOLVER.CHECKPOINT_PERIOD=2", "LOG_PERIOD=1",
    ], out / "rpn")  # fmt: skip
    code, lines = stopped(process, signal.SIGINT, group=True)
    assert code == 130
    assert len(lines) == 1, lines
    newest = out / "rpn" / (out / "rpn" / "last_checkpoint").read_text().strip()
    assert re.fullmatch(rf"train_loc\.py: interrupted by Ctrl-C \(SIGINT\) after \d+ of {MAX_ITER} iterations; the "
                        rf"newest checkpoint is {re.escape(str(newest))}: run the same command with --resume to "
                        "continue from it", lines[0]), lines[0]


def test_exit_when_gone_ends_the_watching_process_once_the_watched_one_is_killed(tmp_path):
    """The watch itself, on two plain processes: the watcher ends within seconds of its main process's SIGKILL,
    and not before."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watcher = subprocess.Popen([
        sys.executable, "-c",
        f"import time; from detectron_res.data.loader import exit_when_gone; exit_when_gone({watched.pid}); "
        "print('watching', flush=True); time.sleep(60)",
    ], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert watcher.stdout.readline().strip() == "watching"
        time.sleep(1.0)
        assert watcher.poll() is None  # still running while the watched process lives
        watched.kill()
        killed_at = time.monotonic()
        assert watcher.wait(timeout=10) == 1
        assert time.monotonic() - killed_at < 5
    finally:
        for process in (watched, watcher):
            process.kill()
            process.wait()


def test_exit_when_gone_returns_a_daemon_thread():
    thread = exit_when_gone(os.getpid())
    assert thread.daemon and thread.is_alive() and thread in threading.enumerate()


def test_a_second_training_on_a_folder_in_use_is_refused_and_a_killed_one_leaves_it_free(shapes_pair, tmp_path,
                                                                                        monkeypatch, capsys):
    """Issue 21 item 7: two train_det runs on one --output mixed one's config.yaml with the other's checkpoints and
    both logs in one metrics.jsonl. The second is refused with the first's process id; once the first is killed
    (SIGKILL: no clean-up at all), the folder is free again and --resume continues it."""
    out = tmp_path / "run"
    first = train_det(shapes_pair, out)
    config, log = (out / "config.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools/train_det.py")])
    tool = load_tool("train_det")
    args = ["--cfg", str(REPO / "configs/shapes_r18.yaml"), "--output", str(out), "MODEL.DEVICE=cpu",
            f"DATASETS.TRAIN=[{shapes_pair}]", "DATASETS.TEST=[]", "DATALOADER.NUM_WORKERS=0",
            "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=96", "SOLVER.IMS_PER_BATCH=2", "SOLVER.STEPS=[]",
            "SOLVER.CHECKPOINT_PERIOD=2", "LOG_PERIOD=1"]  # fmt: skip

    def resume_to_one_past_newest() -> int:
        done = int(re.fullmatch(r"model_(\d+)\.pth", (out / "last_checkpoint").read_text().strip())[1]) + 1
        with package_logger_restored():
            return tool.run_tool(tool.main, [*args, f"SOLVER.MAX_ITER={done + 1}", "--resume"])
    assert resume_to_one_past_newest() == 1  # without the lock: exit 0, config.yaml and model_final.pth replaced
    assert capsys.readouterr().err.splitlines() == [
        f"train_det.py: error: {out} is in use by another run (process {first.pid}); wait for it to finish, stop it, "
        "or choose another output folder (--output)"
    ]
    assert (out / "config.yaml").read_bytes() == config
    assert (out / "metrics.jsonl").read_bytes()[: len(log)] == log
    assert not (out / "model_final.pth").exists()
    stopped(first, signal.SIGKILL)
    assert resume_to_one_past_newest() == 0
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
