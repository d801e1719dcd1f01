"""Timing a communicator: what `--comm auto` measures at start-up and what `raytp bench` reports."""

from __future__ import annotations

import time

import torch

from raytp.parallel.comm.base import Communicator


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock times it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_allreduce(comm: Communicator, device: torch.device, sizes, iters: int,
                   dtype: str = "bfloat16") -> dict[int, float]:
    """Mean microseconds of one `comm.all_reduce` of each size (elements), on `device` in `dtype`.

    Collective: every rank calls it with the same arguments, and warm-up calls precede each size's timing."""
    out = {}
    for n in sizes:
        t = torch.ones(n, dtype=getattr(torch, dtype), device=device)
        for _ in range(max(3, iters // 10)):
            comm.all_reduce(t.fill_(1))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            comm.all_reduce(t)
        synchronize(device)
        out[n] = (time.perf_counter() - start) / iters * 1e6
    return out


def time_allreduce_in_graph(comm: Communicator, device: torch.device, sizes, iters: int,
                            dtype: str = "bfloat16") -> dict[int, float]:
    """Mean microseconds of one `comm.all_reduce` of each size, `iters` of them captured in one CUDA graph and
    replayed: the setting of a decode step, without launch overhead. Where graphs cannot capture `comm` (CPU
    devices, CPU-driven backends) it is `time_allreduce`. Collective, like `time_allreduce`."""
    if device.type != "cuda" or not comm.graph_safe:
        return time_allreduce(comm, device, sizes, iters, dtype)
    out = {}
    for n in sizes:
        t = torch.ones(n, dtype=getattr(torch, dtype), device=device)
        for _ in range(3):  # warm-up outside the capture: lazy initialization (NCCL communicators, kernels)
            comm.all_reduce(t.fill_(1))
        synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                comm.all_reduce(t)
        graph.replay()  # the first replay uploads the graph
        synchronize(device)
        comm.barrier()  # every rank starts the timed replay together
        start = time.perf_counter()
        graph.replay()
        synchronize(device)
        out[n] = (time.perf_counter() - start) / iters * 1e6
        comm.check()
    return out
