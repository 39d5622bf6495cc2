"""Run a function on N ranks of a real gloo group, each in its own process (no Ray): how the EP benchmark and the EP
layer tests exercise collectives between ranks in a few seconds. A rank's failure (an assertion) fails the caller
with the rank's traceback. The caller's main module must be importable (spawn), as `epserve` and pytest are."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.process_group import free_port


def run_ranks(fn, world_size: int, *args, timeout_s: float = 60) -> None:
    """fn(rank, world_size, *args) on every rank of a fresh gloo group over loopback."""
    port = free_port("127.0.0.1")
    mp.spawn(_rank, args=(world_size, port, timeout_s, fn, args), nprocs=world_size, join=True)


def _rank(rank: int, world_size: int, port: int, timeout_s: float, fn, args) -> None:
    import datetime
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))      # the ranks share the host's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        dist.barrier()          # no rank tears its sockets down while a peer still has an operation in flight
    except BaseException:
        dist.destroy_process_group()
        raise
    # Success: leave without running gloo's C++ destructors. Tearing the group down (or letting the interpreter do
    # it) aborted a rank now and then on a loaded machine ("terminate called without an active exception"), even
    # after the barrier; the work is done and the results are written, so nothing is lost by skipping it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
