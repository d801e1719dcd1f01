"""Micro-benchmarks a rank runs on its own communicator and device (through `Worker.on_rank`), between opening
its communicator and loading its shard, so they see an idle device."""

from __future__ import annotations

import torch

from raytp.parallel.comm import Communicator
from raytp.parallel.comm.timing import time_allreduce
from raytp.runtime import bandwidth


def allreduce_us(comm: Communicator, device: torch.device, sizes: list[int], iters: int,
                 dtype: str = "bfloat16") -> dict[int, float]:
    """Mean microseconds of one all-reduce per size (elements); every rank calls it at once (it is collective)."""
    return time_allreduce(comm, device, sizes, iters, dtype)


def copy_bandwidth(comm: Communicator, device: torch.device, nbytes: int = 1 << 31, iters: int = 10) -> float:
    """The device's memory bandwidth in bytes/s (raytp.runtime.bandwidth; `comm` unused: every micro-benchmark
    takes the same arguments)."""
    return bandwidth.copy_bandwidth(device, nbytes, iters)
