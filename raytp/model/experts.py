"""The experts of one rank's mixture-of-experts block: this rank's columns of every expert, applied to each token's
selected experts and summed with its routing weights (the formula in raytp.kernels.moe_gemv). One interface,
`Experts`; its backend is chosen once, at load (`load_experts`), from the device and the weights' format:

    TorchExperts    the reference: CPU ranks, and GPU ranks under --no-triton (and quantized experts the packed GEMV
                    does not read). Each expert's projections in their format's torch path, one per selected expert
                    after sorting on the host; inside a CUDA graph, which cannot wait for the host, every expert runs
    StackedExperts  the model dtype on a GPU. Decode, and every step inside a CUDA graph: the routed Triton kernels
                    (raytp.kernels.moe_gemv.routed_experts), which read only the selected experts. Prefill: two
                    torch._grouped_mm calls on GPUs of compute capability 9.0+ (Qwen3-30B-A3B prefilled 128 tokens
                    at 3207 tokens/s on one H100 so, against 751 with one matmul per expert), the routed kernels before
    PackedExperts   quantized experts (int4, int8, FP8) on a GPU, repacked and stacked in the packed GEMV's layout.
                    Decode, and every step inside a CUDA graph: its routed launch (raytp.kernels.routed_packed_gemv),
                    which reads only the selected experts (w4a16 Qwen3-30B-A3B: 2.92 ms a step at batch 1 on one
                    H100, where a CUDA graph of per-expert GEMVs ran every expert: 146 ms). Prefill: the same launch
                    over the (token, choice) pairs sorted by expert, in chunks of tokens

The routing and the weighted sum of each token's choices are raytp.kernels.moe_routing's (one Triton launch each on
GPUs). Quantized experts keep their checkpoint's format as read, each expert's slice read like a dense MLP's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from raytp.kernels.dispatch import grouped_mm_runs, use_triton
from raytp.kernels.moe_gemv import grouped_experts, grouped_mm_experts, grouped_mm_reads, routed_experts
from raytp.kernels.packed_gemv import TILE_N
from raytp.kernels.routed_packed_gemv import StackedMMA, prefill_pairs, routed_packed_experts
from raytp.model.formats import DenseWeight, Weight, WeightReader, for_device, fuse, read_linear
from raytp.model.slice import Slice

@dataclass(frozen=True)
class ExpertsLayout:
    """A mixture-of-experts block's slices on one rank (`raytp.model.moe`)."""

    router: Slice  # (experts, hidden), whole on every rank
    experts: tuple[tuple[Slice, Slice, Slice], ...]  # per expert: gate rows, up rows, down input columns of the
    # rank's expert columns

    def slices(self) -> Iterator[Slice]:
        yield self.router
        for expert in self.experts:
            yield from expert


# Up to this many tokens a step is a decode step (a batch of sequences); more is a prefill, where each expert has
# enough tokens for tensor-core tiles
ROUTED_ROWS = 16


class Experts:
    """x (tokens, hidden), ids (tokens, k) int64, weights (tokens, k) float32 -> this rank's partial output
    (tokens, hidden) in x's dtype, before the all-reduce. A backend gives `decode` (graph-safe), `prefill` and
    `tensors` (what it holds)."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= ROUTED_ROWS or x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.decode(x, ids, weights)
        return self.prefill(x, ids, weights)

    def decode(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class TorchExperts(Experts):
    """Each expert's gate/up (fused) and down projections as weights of any format, applied by their `apply`."""

    def __init__(self, gate_up: Sequence[Weight], down: Sequence[Weight]):
        self.gate_up, self.down = list(gate_up), list(down)

    def decode(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x, ids, weights, len(self.down), lambda e, t: self.gate_up[e].apply(t),
                               lambda e, h: self.down[e].apply(h))

    prefill = decode

    def tensors(self) -> list[torch.Tensor]:
        return [t for w in self.gate_up + self.down for t in w.tensors()]


class StackedExperts(Experts):
    """Every expert's slice in the model dtype, stacked as the routed kernels read them: gate_up (experts,
    2 * cols, hidden), each expert's gate rows of the rank's columns then its up rows; down (experts, hidden, cols),
    the same columns of each expert's down_proj."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up, self.down = gate_up.contiguous(), down.contiguous()
        # chosen here, once: the device and the shapes do not change
        self.grouped_mm = grouped_mm_runs(self.down) and grouped_mm_reads(self.down)

    def decode(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_experts(x, ids, weights, self.gate_up, self.down)

    def prefill(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.grouped_mm:
            return grouped_mm_experts(x, ids, weights, self.gate_up, self.down)
        return self.decode(x, ids, weights)

    def tensors(self) -> list[torch.Tensor]:
        return [self.gate_up, self.down]


class PackedExperts(Experts):
    """Every expert's gate/up (fused) and down projections repacked for the packed GEMV and stacked."""

    def __init__(self, gate_up: StackedMMA, down: StackedMMA):
        self.gate_up, self.down = gate_up, down

    def decode(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_packed_experts(x, ids, weights, self.gate_up, self.down)

    def prefill(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        step = max(1, prefill_pairs(self.gate_up) // ids.shape[1])  # tokens per launch
        return torch.cat([routed_packed_experts(x[t:t + step], ids[t:t + step], weights[t:t + step], self.gate_up,
                                                self.down, sort=True) for t in range(0, x.shape[0], step)])

    def tensors(self) -> list[torch.Tensor]:
        return self.gate_up.tensors() + self.down.tensors()


def load_experts(layout: ExpertsLayout, reader: WeightReader, act_quant_weight_only: bool) -> Experts:
    """This rank's columns of every expert, held for the backend its device and their format run (see the module
    docstring); `act_quant_weight_only` as for the dense layers (raytp.model.formats.for_device)."""
    gate, _, _ = layout.experts[0]
    if gate.quant is None:
        gate_up = torch.stack([torch.cat((reader.read(g), reader.read(u))) for g, u, _ in layout.experts])
        down = torch.stack([reader.read(d) for _, _, d in layout.experts])
        if use_triton(down):
            return StackedExperts(gate_up, down)
        return TorchExperts([DenseWeight(w) for w in gate_up], [DenseWeight(w) for w in down])
    gate_up = [fuse([read_linear(reader, g), read_linear(reader, u)]) for g, u, _ in layout.experts]
    down = [read_linear(reader, d) for _, _, d in layout.experts]
    if use_triton(down[0].tensors()[0]):
        stacks = (_stacked(gate_up, reader.dtype, act_quant_weight_only),
                  _stacked(down, reader.dtype, act_quant_weight_only))
        if None not in stacks:
            return PackedExperts(*stacks)
    held = lambda w: for_device(w, reader.dtype, act_quant_weight_only)  # noqa: E731
    return TorchExperts([held(w) for w in gate_up], [held(w) for w in down])


def _stacked(weights: list[Weight], dtype: torch.dtype, act_quant_weight_only: bool) -> StackedMMA | None:
    """One projection of every expert stacked for the routed GEMV: repacked in one pass over their rows one after
    another where they share a format and column order and each has whole 64-row blocks of the kernel, else expert
    by expert; None where some expert's weight is not one the kernel reads."""
    one = fuse(weights)
    if one.out_features % (len(weights) * TILE_N) == 0:
        held = for_device(one, dtype, act_quant_weight_only)
        if held.decode_layout is not None and held.bias is None:
            return StackedMMA.split(held.decode_layout, len(weights))
    held = [for_device(w, dtype, act_quant_weight_only) for w in weights]
    if all(w.decode_layout is not None and w.bias is None for w in held):
        return StackedMMA.stack([w.decode_layout for w in held])
    return None
