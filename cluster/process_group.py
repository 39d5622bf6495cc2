"""The expert-parallel process group: torch.distributed through deepspeed.comm (gloo on CPU, NCCL on GPU).

Owns rendezvous and collective timeouts; knows nothing of experts or Ray (callers pass the address).
Pitfalls handled (TOOLING.md): DeepSpeed JIT-builds a CPU shared-memory op on first init (40-55 s) that we never
use: it is replaced by a no-op before init.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

logger = logging.getLogger(__name__)


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the rendezvous port rank 0 publishes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_ep_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
                  timeout_s: float, local_rank: int = 0) -> None:
    """Join the EP group; every collective afterwards raises instead of hanging once `timeout_s` passes."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if master_addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (binds deepspeed.comm.torch in sys.modules)
    # Its functions take `group=group.WORLD` as a default, evaluated on import: imported after a group exists,
    # they would hold that group forever, and a dropped group would never close its sockets (abort_ep_group).
    import torch.distributed.nn.functional  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None   # skip the unused 40-55 s JIT build
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world_size)
    logger.info("EP rank %d/%d joined %s group at %s:%d", rank, world_size, backend, master_addr, master_port)


def destroy_ep_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_ep_group() -> None:
    """Drop the group after a failed collective, at once, so peers blocked on this rank fail now instead of at their
    timeout. Gloo closes its sockets only when the group object is freed: the caller must hold no reference to it
    (a failed call's traceback does: clear its frames first). NCCL aborts its communicators (destroying them would
    wait for the hung kernels). A new group can then be joined with init_ep_group (deepspeed.comm re-initialises
    over it)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    c10d = dist.distributed_c10d
    if dist.get_backend() == "nccl" and hasattr(c10d, "_abort_process_group"):
        c10d._abort_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def control_group(backend: str, timeout_s: float):
    """The group the ranks' per-step agreement runs on: a tiny all_reduce of host values, so on NCCL a gloo group
    beside it (no device round trip for a flag); on gloo the default group (None)."""
    if backend == "gloo":
        return None
    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
