"""Starting a tool on several processes of one machine (`--num-gpus N`) through torch.distributed's launcher API:
the same elastic agent `torchrun --standalone --nproc_per_node=N` runs, with its c10d rendezvous on a free local
port. Each worker process finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment and
joins the job in `runner.setup` (`utils.comm.init_distributed`), exactly as under torchrun.

A worker that fails writes its error to the agent's error file (`tool.run_tool` does it), and the agent stops the
others at once; `launch` then raises `DistributedJobError` with the first failing rank and its message.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .tool import run_tool


class DistributedJobError(RuntimeError):
    """A worker process of a launched job failed; the message names its rank and its error."""


def launch(main: Callable[[list[str]], Any], argv: Sequence[str], *, num_processes: int) -> list[Any]:
    """Runs `main(argv)` in `num_processes` worker processes of one distributed job on this machine and returns
    their results in rank order.

    On CPUs, each worker gets `cpu_count // num_processes` threads unless OMP_NUM_THREADS is already set (torchrun
    gives each 1), so that the workers do not fight over the cores.

    Raises:
        ValueError: num_processes < 1.
        DistributedJobError: a worker failed (the others were stopped).
    """
    if num_processes < 1:
        raise ValueError(f"--num-gpus must be >= 1, got {num_processes}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        run_id=f"detectron_res-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, _worker)(main, list(argv))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = failure.message  # the error file's {"message": ..., "extraInfo": {...}}, or text
        message = str(message.get("message", message) if isinstance(message, dict) else message)
        raise DistributedJobError(
            f"rank {rank} of {num_processes} failed (exit code {failure.exitcode}): {message.strip() or 'no message'}"
        ) from None
    return [results[rank] for rank in sorted(results)]


def _worker(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """One worker: runs the tool's `main` like `run_tool` does, and exits with status 1 when it fails so that the
    agent stops the job (`run_tool` has written the error file the agent reports)."""
    result: list[Any] = []
    status = run_tool(lambda args: result.append(main(args)), argv)
    if status:
        sys.exit(status)
    return result[0] if result else None
