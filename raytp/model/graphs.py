"""Per-rank decode step replayed from CUDA graphs: Python launch cost leaves the critical path.

An eager decode step of an 8B-shaped model launches ~1450 kernels; at ~12 us of host time each that is
several times the ~4 ms the GPU needs to stream the weights (benchmarks/results/2026-11-21-h200/). Here
each batch-size bucket (1, 2, 4, ... max_batch) is captured once, all-reduces included, and a step is
three small copies into static inputs plus one graph replay.

Capturing needs a communicator whose collectives are kernels on the current stream (`graph_safe`: NCCL);
the CPU-driven host-staged path is not, and its ranks stay eager. A bucket is padded by repeating the
last row: the copy writes the same keys/values to the same cache cell, and its logits are dropped.
The Triton decode attention reads each sequence's length from device memory, so a replay reads only the
live part of the cache; the torch attention (no Triton) reads the whole `max_context` span with a mask.
"""

from __future__ import annotations

import torch

from raytp.model.llama import ShardedLlama


def buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class GraphedDecode:
    def __init__(self, model: ShardedLlama):
        self.model = model
        n, dev = model.max_batch, model.device
        self.tokens = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        self.positions = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        self.slots = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(buckets(n)):  # largest first: smaller graphs reuse its memory pool
            self.graphs[b] = self._capture(b, pool)

    def _run(self, b: int) -> torch.Tensor:
        return self.model.forward(self.tokens[:b], self.positions[:b], self.slots[:b],
                                  span=self.model.max_context)

    def _capture(self, b: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm up on a side stream (allocator, cuBLAS workspaces, NCCL) as torch.cuda.graphs requires;
        # every rank captures the same buckets in the same order, so collectives stay matched
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._run(b)
        return graph, logits

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Same contract as ShardedLlama.forward for a decode step: (batch, 1) inputs -> (batch, vocab_local)."""
        b = tokens.shape[0]
        bucket = min(size for size in self.graphs if size >= b)
        pad = bucket - b
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(slots)
        if pad:
            self.tokens[b:bucket].copy_(tokens[-1:].expand(pad, 1))
            self.positions[b:bucket].copy_(positions[-1:].expand(pad, 1))
            self.slots[b:bucket].copy_(slots[-1:].expand(pad))
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:b]
