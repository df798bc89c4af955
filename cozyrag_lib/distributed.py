"""torch.distributed helpers that also work in a single process with no process group.

Launch under `torchrun` and these see the group; run `python -m ...` and `get_rank()` is 0,
`get_world_size()` is 1 and `all_gather_object` returns `[obj]`.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .errors import CozyError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """The global rank 0 owns every side effect (files, logs, progress bars)."""
    return get_rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str = "auto") -> str:
    """The device a setting names: "auto" is "cuda" where a CUDA GPU is available, else "cpu".

    Asking for CUDA on a machine without a GPU is a one-line CozyError, not an error from inside torch.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CozyError(f"config: device={device} but no CUDA GPU is available (use --device=cpu, or auto)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup(device: str = "auto") -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this process's device.

    NCCL on GPUs, gloo on CPU; the GPU index comes from LOCAL_RANK, never the global RANK.
    """
    use_cuda = resolve_device(device).startswith("cuda")
    dev = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and not is_distributed():
        timeout = datetime.timedelta(minutes=int(os.environ.get("COZYRAG_DIST_TIMEOUT_MIN", 30)))
        store = _restart_store(timeout)
        kw = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                       "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout, **kw)
    return dev


def _restart_store(timeout: datetime.timedelta):
    """torchrun's store under a fresh key prefix when `--max-restarts` has restarted this node's workers, else None.

    torchrun keeps one rendezvous store for all attempts, so a restarted group would read the addresses of the
    attempt that died and fail with "Connection refused". On one node every worker shares the restart count,
    which makes a safe prefix; across nodes the counts can differ, so there launch torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt) instead.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if restart == "0" or not one_node or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"cozyrag/restart-{restart}/", store)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """`setup` for the block, yielding the device; the group is destroyed afterwards only if this block joined it
    (a stage called from inside training, or from a test that set up the group, leaves it as it was)."""
    owns = launched_by_torchrun() and not is_distributed()
    try:
        yield setup(device)
    finally:
        if owns:
            cleanup()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """List of `obj` from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int, rank: int | None = None, world: int | None = None) -> range:
    """Contiguous share of range(n) for this rank; shares differ in size by at most one.

    >>> list(shard(5, rank=1, world=2))
    [3, 4]
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))
