"""A decode step replayed from CUDA graphs: Python launch cost leaves the critical path.

An eager decode step of an 8B-shaped model launches ~1450 kernels, and their host time adds up to several
times what the GPU needs to stream the weights. Here
a step function over static buffers (raytp.runtime.batch: forward, sampling and the write of the next
step's inputs) is captured once per batch-size bucket (1, 2, 4, ... max_batch) and per variant (the kind
of sampling the batch needs), all-reduces included, and a step is one graph replay.

Capturing needs a communicator whose collectives are kernels on the current stream (`graph_safe`); the
CPU-driven host-staged path is not, and its ranks stay eager. A bucket is padded by repeating the last
row: it writes the same keys/values to the same cache cell, and its outputs are dropped. The Triton decode
attention (over an FP8 cache too, on GPUs of compute capability 8.9+) reads each sequence's length from device
memory, so a replay reads only the live part of the cache; the torch attention (no Triton, or an FP8 cache on an older
GPU) reads the whole `max_context` span with a mask.

Every rank captures the same graphs in the same order (the token loop asks for them at the same step), so
the collectives inside stay matched. Capture runs the step once for real first (warm-up): the caller
rewrites the static inputs afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


def buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class CapturedSteps:
    """`step(bucket, variant)` captured per bucket of `buckets(max_batch)` and variant, on first need."""

    def __init__(self, step: Callable[[int, Hashable], torch.Tensor], max_batch: int):
        self.step, self.sizes = step, buckets(max_batch)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, Hashable], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, b: int) -> int:
        return min(size for size in self.sizes if size >= b)

    def has(self, variant: Hashable) -> bool:
        return (self.sizes[-1], variant) in self.graphs

    def capture(self, variant: Hashable) -> None:
        """Every bucket of `variant`, largest first: smaller graphs reuse its memory pool."""
        for b in reversed(self.sizes):
            # warm up on a side stream (allocator, cuBLAS workspaces, NCCL) as torch.cuda.graphs requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(b, variant)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(b, variant)
            self.graphs[b, variant] = graph, out

    def __call__(self, b: int, variant: Hashable) -> torch.Tensor:
        """Replay the graph of `b`'s bucket; returns its static output (bucket rows)."""
        graph, out = self.graphs[self.bucket(b), variant]
        graph.replay()
        return out
