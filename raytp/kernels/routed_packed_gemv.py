"""Quantized experts of a mixture of experts decoded by the packed GEMV kernel (`raytp.kernels.packed_gemv`), routed
on the GPU: each (token, choice) pair is one row of x times its chosen expert's matrix, the expert read from the
routing's ids by the kernel itself. So a decode step reads only the selected experts, also inside a CUDA graph
(which cannot wait for the routing on the host), at the kernel's speed for one expert: the same launches, layout
and arithmetic as a dense quantized GEMV, for int4, int8 and FP8 experts alike.

    gate_up   (pairs, 2 * cols) = x[token] @ gate_up[expert].T, one block row per pair (blockIdx.z)
    swiglu    (pairs, cols)
    down      (pairs, hidden) = h[pair] @ down[expert].T
    sum       out[token] = sum over its choices, in order, of weight * down, in float32, rounded once

Act-order experts read x each in their own input order: each pair's row is gathered into its expert's order
first (one gather over the stacked indices, on the GPU). Two tokens that chose one expert each read it (L2 may keep
it): at batch 1 nothing is read twice, at batch 8 of Qwen3-30B-A3B about 64 pairs share ~53 experts; Mixtral's 8
experts are read 2-4 times over at 8-16 tokens, where running every expert once is faster. No split along the
inputs (a split would need a workspace per pair): the pairs already give the grid its blocks.

Prefill (`sort`) sorts the pairs by expert first, so that the blocks reading one expert run one after another
and find it in L2: each selected expert comes from HBM about once, in a handful of launches per layer, where one
matmul per expert costs several launches each and a host sync. Up to `prefill_pairs` pairs a launch; the caller
runs longer prefills in chunks of tokens (raytp.model.experts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.moe_routing import by_expert, combine_choices
from raytp.kernels.norm import swiglu
from raytp.kernels.packed_gemv import (TILE_K, TILE_N, MMAPacked, _device_index, _kernel, launch_for, mma_linear_torch,
                                       physical_inputs, runs_kernel, sm_count)


@dataclass
class StackedMMA:
    """One projection of every expert in the packed layout, stacked: values (experts, Np / 64, Kp / 32, 32, words),
    scales and zeros (experts, groups, Np), x_index (experts, Kp) int32 or None (every expert reads x as it is).
    `like` is expert 0's MMAPacked (views): the format every expert shares."""

    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    x_index: torch.Tensor | None
    like: MMAPacked

    @classmethod
    def stack(cls, weights: Sequence[MMAPacked]) -> StackedMMA | None:
        """The experts' packed weights stacked, or None unless they share one format and shape."""
        def form(w: MMAPacked) -> tuple:
            return (w.kind, w.values.shape, w.scales.shape, w.zeros is None, w.group_tiles, w.in_features,
                    w.out_features, w.x_index is None)

        first = weights[0]
        if any(form(w) != form(first) for w in weights):
            return None
        stacked = lambda name: (None if getattr(first, name) is None  # noqa: E731
                                else torch.stack([getattr(w, name) for w in weights]))
        values, scales, zeros, x_index = (stacked(name) for name in ("values", "scales", "zeros", "x_index"))
        return cls(values, scales, zeros, x_index, cls._expert(first, values, scales, zeros, x_index, 0,
                                                              all(w.foldable for w in weights)))

    @classmethod
    def split(cls, packed: MMAPacked, experts: int) -> StackedMMA:
        """The stack of `experts` matrices packed as one, their rows one after another, each expert's rows a whole
        number of the kernel's 64-row blocks and every expert in one column order: one packing pass for a whole
        layer's experts instead of one per expert (a model's load makes thousands)."""
        groups = packed.scales.shape[0]
        rows = packed.out_features // experts
        assert rows % TILE_N == 0 and rows * experts == packed.out_features
        per_expert = lambda t: t.view(groups, experts, rows).transpose(0, 1).contiguous()  # noqa: E731
        values = packed.values.view(experts, -1, *packed.values.shape[1:])
        scales = per_expert(packed.scales)
        zeros = None if packed.zeros is None else per_expert(packed.zeros)
        x_index = None if packed.x_index is None else packed.x_index.expand(experts, -1)  # one order: one copy
        like = dataclasses.replace(packed, out_features=rows)
        first = cls._expert(like, values, scales, zeros, x_index, 0, packed.foldable)
        return cls(values, scales, zeros, x_index, first)

    @staticmethod
    def _expert(like: MMAPacked, values, scales, zeros, x_index, e: int, foldable: bool) -> MMAPacked:
        at = lambda t: None if t is None else t[e]  # noqa: E731
        return dataclasses.replace(like, values=values[e], scales=scales[e], zeros=at(zeros), x_index=at(x_index),
                                   foldable=foldable)

    def expert(self, e: int) -> MMAPacked:
        """Expert e's MMAPacked as views of the stacks: nothing held twice."""
        return self._expert(self.like, self.values, self.scales, self.zeros, self.x_index, e, self.like.foldable)

    def experts(self) -> list[MMAPacked]:
        return [self.expert(e) for e in range(self.values.shape[0])]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.scales, self.zeros, self.x_index) if t is not None]


def routed_linear(x: torch.Tensor, w: StackedMMA, ids: torch.Tensor, x_div: int) -> torch.Tensor:
    """y[p] = x[p // x_div] @ w[ids[p]].T for every pair p: x (rows, K), ids (pairs,) int64 -> (pairs, N)."""
    like = w.like
    pairs = ids.numel()
    if not runs_kernel(x[:1], like):
        # CPU, float32 models: every expert on every row, then each pair's (no host sync: CUDA graphs too)
        every = torch.stack([mma_linear_torch(x, w.expert(e)) for e in range(w.values.shape[0])])  # (E, rows, N)
        return every[ids, torch.arange(pairs, device=x.device) // x_div]
    kp, np_ = like.padded
    if w.x_index is not None:  # each pair's row in its expert's input order; -1 (padding) reads an appended zero
        index = w.x_index[ids].long()  # (pairs, Kp)
        rows = F.pad(x, (0, 1))[torch.arange(pairs, device=x.device) // x_div]  # (pairs, K + 1)
        x2, x_div = rows.gather(1, torch.where(index >= 0, index, x.shape[-1])), 1
    else:
        x2 = physical_inputs(x, like) if kp != x.shape[-1] else x
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # the kernel reads x in 16-byte vectors
        x2 = x2.clone()
    n_blocks, k_tiles = np_ // TILE_N, kp // TILE_K
    launch = launch_for(np_ * pairs, k_tiles, sm_count(_device_index(x.device)), like.kind, like.zeros is not None)
    launch = dataclasses.replace(launch, split=1, scaled=launch.scaled and like.foldable)
    y = torch.empty((pairs, like.out_features), dtype=x.dtype, device=x.device)
    kernel = _kernel(like.kind, x.dtype == torch.bfloat16, like.zeros is not None, launch, 1, _device_index(x.device),
                     routed=True)
    zeros = w.zeros if w.zeros is not None else w.scales
    kernel(grid=(n_blocks, 1, pairs), block=(32 * launch.warps, 1, 1),
           args=[x2, w.values, w.scales, zeros, y, y, y, 1, like.out_features, np_, k_tiles, k_tiles, like.group_tiles,
                 ids, w.values[0].numel(), w.scales[0].numel(), x_div])
    return y


# At most this many (token, choice) pairs take the routed launch sorted by expert: blockIdx.z stops at 65535; act-order
# experts gather each pair's row through an int64 index of its expert's input order (16 KB a pair at 2048 inputs)
ROUTED_PREFILL_PAIRS, ACT_ORDER_PREFILL_PAIRS = 32768, 4096


def prefill_pairs(gate_up: StackedMMA) -> int:
    """The most (token, choice) pairs one routed launch over experts like `gate_up` takes."""
    return ROUTED_PREFILL_PAIRS if gate_up.x_index is None else ACT_ORDER_PREFILL_PAIRS


def routed_packed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: StackedMMA,
                          down: StackedMMA, sort: bool = False) -> torch.Tensor:
    """x (tokens, hidden), ids (tokens, k) int64, weights (tokens, k) float32 -> (tokens, hidden) in x's dtype;
    `sort` runs the pairs sorted by expert (prefill, see the module docstring)."""
    def experts(rows: torch.Tensor, pair_ids: torch.Tensor, x_div: int) -> torch.Tensor:
        h = swiglu(routed_linear(rows, gate_up, pair_ids, x_div))  # (pairs, cols)
        return routed_linear(h, down, pair_ids, x_div=1)  # (pairs, hidden)

    if sort:
        y = by_expert(x, ids, lambda rows, pair_ids: experts(rows, pair_ids, 1))
    else:
        y = experts(x.contiguous(), ids.reshape(-1).contiguous(), ids.shape[1])
    return combine_choices(y.view(*ids.shape, -1), weights, x.dtype)
