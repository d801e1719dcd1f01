"""Micro-benchmarks a rank runs on its own communicator and device (through `Worker.on_rank`), between opening
its communicator and loading its shard, so they see an idle device."""

from __future__ import annotations

import time

import torch

from raytp.parallel.comm import Communicator
from raytp.parallel.comm.timing import synchronize, time_allreduce


def allreduce_us(comm: Communicator, device: torch.device, sizes: list[int], iters: int,
                 dtype: str = "bfloat16") -> dict[int, float]:
    """Mean microseconds of one all-reduce per size (elements); every rank calls it at once (it is collective)."""
    return time_allreduce(comm, device, sizes, iters, dtype)


def copy_bandwidth(comm: Communicator, device: torch.device, nbytes: int = 1 << 31, iters: int = 10) -> float:
    """The device's memory bandwidth in bytes/s from a large copy, counting bytes read and written (`comm`
    unused: every micro-benchmark takes the same arguments)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * iters / elapsed
