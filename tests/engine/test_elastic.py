"""Past one machine, with torchrun's elastic agent on 2 CPU processes (gloo) of this machine (issue 24): two agents
meeting through the c10d rendezvous as two machines would (`--nnodes=2`) train exactly as one agent of 2 processes;
a rank killed by SIGKILL after the first checkpoint is restarted by torchrun (`--max-restarts=1`), the job resumes
from the checkpoint by itself and ends with the weights and log of an uninterrupted run; SIGTERM (a preemption)
checkpoints the iteration every rank stopped after, leaves no process behind, and `--resume` ends where an
uninterrupted run does. Sizes and helpers are test_distributed.py's."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detectron_res.data.datasets import generate_shapes
from detectron_res.engine.runner import run_tool
from detectron_res.utils import comm
from detectron_res.utils.signals import Terminated
from test_distributed import logged_losses, train_args, weights

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "tools"))

from test_training_processes import wait_for  # noqa: E402

TRAIN_DET = str(REPO / "tools/train_det.py")
MAX_ITER = 10


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=12, num_val=2, image_size=96, seed=1)
    return {"train": f"{root}/annotations/instances_train.json:{root}/train", "root": root,
            "val": f"{root}/annotations/instances_val.json:{root}/val"}  # fmt: skip


def environment(**extra: str) -> dict[str, str]:
    """One thread per process (as the 2-process references of test_distributed.py), this checkout's package."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def torchrun(flags: list[str], args: list[str], *, script: str = TRAIN_DET, env: dict | None = None,
             **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags, script, *args], cwd=REPO,
                            env=env or environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)  # fmt: skip


def finished(process: subprocess.Popen, timeout: float = 240) -> str:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    """One agent, 2 processes, MAX_ITER iterations uninterrupted, then one evaluation on the 2 val images."""
    out = tmp_path_factory.mktemp("straight")
    finished(torchrun(["--standalone", "--nproc_per_node=2"],
                      train_args(shapes, out, f"SOLVER.MAX_ITER={MAX_ITER}", f"DATASETS.TEST=[{shapes['val']}]")))
    return out


def test_two_agents_meeting_as_two_machines_train_as_one_agent_of_two_processes(shapes, straight, tmp_path):
    out, port = tmp_path / "two_nodes", free_port()
    flags = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             f"--rdzv-id=test-{port}"]  # fmt: skip
    args = train_args(shapes, out, f"SOLVER.MAX_ITER={MAX_ITER}", f"DATASETS.TEST=[{shapes['val']}]")
    agents = [torchrun(flags, args) for _ in range(2)]
    for agent in agents:
        finished(agent)
    log = (out / "log.txt").read_text()
    assert "Training on 2 processes: global batch 4 images (SOLVER.IMS_PER_BATCH), 2 per process" in log
    assert log.count("Evaluating on ") == 1
    assert same_weights(out / "model_final.pth", straight / "model_final.pth")
    assert list(logged_losses(out)) == list(range(1, MAX_ITER + 1))
    assert logged_losses(out) == logged_losses(straight)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())


def test_a_rank_killed_after_a_checkpoint_is_restarted_and_the_job_loses_nothing(shapes, straight, tmp_path):
    out = tmp_path / "restarted"
    agent = torchrun(["--standalone", "--max-restarts=1", "--nproc_per_node=2"],
                     train_args(shapes, out, f"SOLVER.MAX_ITER={MAX_ITER}", f"DATASETS.TEST=[{shapes['val']}]"),
                     script=str(REPO / "tests/engine/kill_rank.py"),
                     env=environment(KILL_AT="6", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))  # fmt: skip
    err = finished(agent)
    assert "failed (exitcode: -9) local_rank: 1" in err  # rank 1 was SIGKILLed, and torchrun restarted the job
    log = (out / "log.txt").read_text()
    assert f"torchrun restarted the workers (restart 1): resuming from the newest checkpoint in {out}" in log
    assert "Resuming from" in log and "Starting training from iteration 4 to 10" in log
    assert same_weights(out / "model_final.pth", straight / "model_final.pth")
    records = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == [*range(1, MAX_ITER + 1), MAX_ITER]  # each iteration once; the evaluation's record last
    assert logged_losses(out) == logged_losses(straight)


def test_restartable_workers_on_the_agents_shared_store_are_refused_with_the_variable_to_set(monkeypatch):
    # what torchrun --max-restarts=1 gives its workers by default (torch >= 2.4): refused before init_process_group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ValueError) as refused:
        comm.init_distributed(backend="gloo", device_type="cpu")
    assert str(refused.value) == (
        "torchrun --max-restarts=1 with the agent's shared store: restarted workers would read the addresses of the "
        "dead ones from it and fail to connect (pytorch/pytorch#135712); start torchrun with "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/distributed.md)"
    )
    assert not comm.is_distributed()
    for max_restarts, shared in (("0", "True"), ("1", "False")):  # no restart, or a fresh store for each attempt
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", max_restarts)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        comm.check_restartable_store()


def test_an_interrupted_tool_leaves_the_process_group_without_waiting_for_the_others(tmp_path, monkeypatch, capsys):
    # a group of 1 here; in a job another rank may be dead or stopping, so leaving must not wait for it (no barrier)
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    monkeypatch.setattr(comm, "synchronize", lambda: pytest.fail("a barrier on the interruption path"))

    def main(argv):
        assert comm.is_distributed()
        raise Terminated("SIGTERM")

    try:
        assert run_tool(main, []) == 143
        assert not comm.is_distributed()  # left: a requeued run's init_process_group starts afresh
    finally:
        if comm.is_distributed():
            torch.distributed.destroy_process_group()
    assert capsys.readouterr().err.strip().endswith(": interrupted by SIGTERM")


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes below `pid` (torchrun starts its workers in sessions of their own)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):  # not a process, or it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ...
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def worker_of_rank(below: dict[int, str], rank: int) -> int:
    """The process id of torchrun's worker of the given rank among the processes `below` it."""
    return next(pid for pid, cmd in below.items() if "train_det.py" in cmd
                and f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"))


def sigterm_at(process: subprocess.Popen, out: Path, k: int, *, rank: int | None = None) -> tuple[int, list, dict]:
    """SIGTERM to `process` (or, under torchrun, to its worker of `rank` alone) once metrics.jsonl holds iteration k;
    (exit status, stderr lines, the processes that were below it), after checking that none of them is alive 10 s
    after the signal."""
    def logged() -> bool:
        assert process.poll() is None, process.stderr.read()
        return (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= k

    wait_for(logged, timeout=240, what=f"iteration {k} in metrics.jsonl")
    below = descendants(process.pid)
    os.kill(process.pid if rank is None else worker_of_rank(below, rank), signal.SIGTERM)
    sent_at = time.monotonic()
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *below]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError("the job did not end within 60 s of SIGTERM") from None
    alive: dict = {}

    def all_gone() -> bool:
        alive.clear()
        alive.update({pid: cmd for pid, cmd in descendants(os.getpid()).items() if pid in below})
        return not alive
    try:
        wait_for(all_gone, timeout=max(0.0, sent_at + 10 - time.monotonic()), what="the job's processes to end")
    except AssertionError:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"alive 10 s after SIGTERM: {alive}") from None
    return process.returncode, err.splitlines(), below


@pytest.fixture(scope="module")
def straight_single(shapes, tmp_path_factory):
    """One process, MAX_ITER iterations uninterrupted."""
    out = tmp_path_factory.mktemp("straight_single")
    done = subprocess.run([sys.executable, TRAIN_DET, *train_args(shapes, out, f"SOLVER.MAX_ITER={MAX_ITER}")],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_checkpoints_the_iteration_it_stops_after_and_resume_ends_as_an_uninterrupted_run(
    shapes, request, tmp_path, processes
):
    out, k = tmp_path / "preempted", 5  # checkpoints every 4 iterations: the stop comes at 5, 6 or 7, none a period's
    args = train_args(shapes, out, f"SOLVER.MAX_ITER={MAX_ITER}", "DATALOADER.NUM_WORKERS=1")
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [sys.executable, *launcher, TRAIN_DET, *args]
    process = subprocess.Popen(command, cwd=REPO, env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    # under torchrun only rank 1 gets the signal: rank 0 learns of it in the step's all-reduce, and checkpoints
    code, lines, below = sigterm_at(process, out, k, rank=None if processes == 1 else 1)
    assert sum("forkserver" in cmd for cmd in below.values()) == 2 * processes  # a fork server and a loader worker
    stops = [re.fullmatch(r"train_det\.py: interrupted by SIGTERM after (\d+) of 10 iterations; (.*)", line)
             for line in lines]  # fmt: skip
    stops = [match for match in stops if match]
    assert len(stops) == processes, lines
    done = int(stops[0][1])
    assert k <= done < 8 and {int(match[1]) for match in stops} == {done}  # every rank after the same step
    assert sorted(match[2] for match in stops) == sorted([
        f"the newest checkpoint is {out / f'model_{done:07d}.pth'}: run the same command with --resume to continue "
        "from it", *(["rank 0 names the checkpoint to resume from"] if processes == 2 else [])])  # fmt: skip
    saved = torch.load(out / f"model_{done:07d}.pth", weights_only=True)
    assert saved["iteration"] == saved["trainer"]["iteration"] == done and saved["trainer"]["world_size"] == processes
    assert code == (143 if processes == 1 else 1)  # torchrun: its workers exit 143, it reports them failed
    assert processes == 1 or "exitcode  : 143" in "\n".join(lines)
    assert f"SIGTERM: stopping after iteration {done}" in (out / "log.txt").read_text()

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=environment(), capture_output=True, text=True,
                             timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {done} to 10" in (out / "log.txt").read_text()
    reference = request.getfixturevalue("straight_single" if processes == 1 else "straight")
    assert same_weights(out / "model_final.pth", reference / "model_final.pth")
    assert list(logged_losses(out)) == list(range(1, MAX_ITER + 1))
    assert logged_losses(out) == logged_losses(reference)


def test_the_launch_layer_sits_below_the_runner():
    # launch imports tool (run_tool), never runner; runner imports launch: one direction, no import cycle
    loaded = subprocess.run([sys.executable, "-c", "import sys, detectron_res.engine.launch as launch; "
                             "print(sorted(m for m in sys.modules if m.startswith('detectron_res.engine')))"],
                            cwd=REPO, env=environment(), capture_output=True, text=True, check=True)  # fmt: skip
    assert loaded.stdout.split("\n")[0] == str(["detectron_res.engine", "detectron_res.engine.launch",
                                                "detectron_res.engine.tool"])  # fmt: skip
