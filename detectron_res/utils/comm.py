"""Distributed training helpers over torch.distributed: who this process is, and the few collectives the engine
needs (barrier, gathering Python objects, broadcasting one, averaging a tensor).

A process joins a job when it was started by `torchrun` (or `detectron_res.engine.launch`), which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: `init_distributed` reads them and creates the process group
(NCCL on CUDA, gloo on the CPU). Without them every function here answers for a single process (rank 0 of 1) and
the collectives do nothing, so single-process code calls them unconditionally.

Python objects (detections, random states, metrics) travel through a gloo group even when the tensors go through
NCCL, so that gathering them needs no GPU memory (detectron2 does the same).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("", "gloo", "nccl")
_object_group: dist.ProcessGroup | None = None  # the gloo group for Python objects, made by init_distributed


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """This process's place on its machine (torchrun's LOCAL_RANK): the CUDA device it uses."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_world_size() -> int:
    """The WORLD_SIZE a launcher (torchrun) set for this process; 1 when started directly."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(*, backend: str = "", timeout_s: float = 1800.0, device_type: str | None = None) -> bool:
    """Joins the job torchrun started this process in (see the module); returns whether it is distributed.

    Args:
        backend: "nccl", "gloo", or "" for NCCL when this process uses CUDA, else gloo.
        timeout_s: how long a collective waits for the other ranks before failing (a rank that died or hangs
            brings the job down with an error after this long, instead of a silent hang).
        device_type: "cuda" or "cpu" (default: CUDA when available). On CUDA the process takes device LOCAL_RANK.

    Raises:
        ValueError: an unknown backend, or NCCL without CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"DISTRIBUTED.BACKEND={backend!r}: expected one of {BACKENDS} ('' = automatic)")
    if is_distributed():
        return True
    if launched_world_size() <= 1:
        return False
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("DISTRIBUTED.BACKEND=nccl needs CUDA; use gloo (or '') to train on CPUs")
    check_restartable_store()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)
    global _object_group
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return True


def check_restartable_store() -> None:
    """Refuses a torchrun job that may restart its workers (`--max-restarts` > 0) while they share the agent's store
    (TORCHELASTIC_USE_AGENT_STORE=True, torchrun's default since torch 2.4).

    That store outlives a restart with the keys of the first attempt in it: a restarted rank reads the address its
    dead predecessor listened on, before the new one overwrote it, and `init_process_group` fails ("Gloo
    connectFullMesh failed ... Connection refused"; NCCL reads a stale unique id: pytorch/pytorch#135712). A prefix
    per attempt cannot fix it from here: TORCHELASTIC_RESTART_COUNT differs between the machines of a job (an agent
    that restarts its healthy workers for another machine's failure does not count it). With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the agents hand each attempt a fresh store, hosted by its rank 0.

    Raises:
        ValueError: the combination above, with the variable to set.
    """
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if max_restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError(
            f"torchrun --max-restarts={max_restarts} with the agent's shared store: restarted workers would read "
            "the addresses of the dead ones from it and fail to connect (pytorch/pytorch#135712); start torchrun "
            "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/distributed.md)"
        )


def elastic_restart() -> int:
    """How many times torchrun's agents restarted this job's workers (`--max-restarts`), agreed by all ranks: the
    largest TORCHELASTIC_RESTART_COUNT of any rank (the count is per machine; see `check_restartable_store`).
    0 outside torchrun. A collective in a distributed job."""
    return max(all_gather(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))))


def leave_distributed() -> None:
    """Leaves the job at once, without waiting for the other ranks (an interruption: a rank may be dead or stopped
    elsewhere, and a barrier could wait for it until the timeout)."""
    global _object_group
    if is_distributed():
        dist.destroy_process_group()
    _object_group = None


def destroy_distributed() -> None:
    """Leaves the job (the end of a tool's run): once every rank got here, the process group is destroyed and the
    process is single again."""
    global _object_group
    if is_distributed():
        synchronize()  # no rank tears its connections down while another still talks to it
        dist.destroy_process_group()
    _object_group = None


def synchronize() -> None:
    """Waits until every rank reaches this point (a barrier); nothing in a single process."""
    if get_world_size() > 1:
        dist.barrier(group=_object_group)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a data set or a cache), then the other ranks, which find its
    results: no two ranks write the same files."""
    if not is_main_process():
        synchronize()
    yield
    if is_main_process():
        synchronize()


def all_gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (`[obj]` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_object_group)
    return gathered


def gather(obj: Any, *, dst: int = 0) -> list[Any]:
    """`obj` of every rank in rank order on rank `dst`; [] on the others."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst, group=_object_group)
    return gathered if gathered is not None else []


def broadcast(obj: Any, *, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_object_group)
    return holder[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `tensor` over all ranks (a new tensor; `tensor` itself in a single process)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world_size


def broadcast_buffers(module: torch.nn.Module, *, src: int = 0) -> None:
    """Copies rank `src`'s buffers (e.g. BatchNorm's running statistics, which each rank updates from its own
    images) to every rank, so that all ranks hold the weights that rank 0 checkpoints and evaluate the same model."""
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)
