"""Device helpers of the GPU benchmark: synchronisation, free memory, copy bandwidth, shared random prompts."""
from __future__ import annotations

import os
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")                       # free RAM


def measure_bandwidth(device: torch.device, num_bytes: int, repeats: int = 5) -> float:
    """Bytes/s (read + written) of a device-to-device copy, best of `repeats` after a warm-up."""
    src = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(times[1:])


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` random prompts of `length` ids, the same for both implementations."""
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()
