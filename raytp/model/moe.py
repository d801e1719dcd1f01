"""One rank's share of a sparse mixture-of-experts block (Qwen3-MoE, Mixtral), in place of the dense MLP.

    router   replicated: every rank holds the whole (experts, hidden) matrix and computes the same logits from the
             same all-reduced input, so every rank selects the same experts with the same weights, with no
             communication
    experts  rank r holds columns `expert_cols[r]` of EVERY expert (gate/up rows, down input columns): the same
             uneven range in each expert, like the dense MLP's columns, so each token's work is shared by the ranks
             as their memory is, whichever experts it selects; a rank may hold no columns at all. Quantized experts
             keep their checkpoint's format, each expert's slice read like a dense MLP's (act-order checkpoints
             permute each expert's columns by its own down_proj groups, `raytp.model.layout`)
    output   sum over each token's k experts of weight * down(swiglu(gate_up(x))) over the rank's columns: a
             partial sum, all-reduced once per layer as down_proj's is

Routing follows transformers' Qwen3MoeTopKRouter and MixtralTopKRouter: softmax over all experts in float32, the
top k of those probabilities by torch.topk (so ties fall as they do there), renormalized to sum to 1 where the model
says so (Mixtral always: the softmax of the top-k logits; Qwen3-MoE when `norm_topk_prob`). The weights stay in
float32 up to the weighted sum (Qwen3-MoE's own code rounds them to the model dtype first, a difference below that
dtype's rounding of the sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import use_routed_quantized_experts
from raytp.kernels.moe_gemv import ROUTED_ROWS, grouped_experts, routed_experts
from raytp.kernels.moe_routing import top_k_routing
from raytp.kernels.packed_gemv import TILE_N
from raytp.kernels.routed_packed_gemv import StackedMMA, routed_packed_experts, routes_prefill
from raytp.model.config import MoeConfig
from raytp.model.formats import PackedWeight, Weight, WeightReader, for_device, fuse, read_linear
from raytp.model.layout import ExpertsLayout
from raytp.parallel.comm import Communicator


@dataclass(frozen=True)
class Routing:
    top_k: int  # experts per token (num_experts_per_tok)
    normalize: bool  # renormalize the top-k probabilities to sum to 1

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (tokens, experts) -> weights (tokens, top_k) float32, expert ids (tokens, top_k) int64."""
        return top_k_routing(logits, self.top_k, self.normalize)


class StackedExperts:
    """Every expert's slice in the model dtype, stacked as the routed kernels read them: gate_up (experts,
    2 * cols, hidden), each expert's gate rows of the rank's columns then its up rows; down (experts, hidden, cols),
    the same columns of each expert's down_proj."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up, self.down = gate_up.contiguous(), down.contiguous()

    @classmethod
    def load(cls, layout: ExpertsLayout, reader: WeightReader) -> StackedExperts:
        gate_up = torch.stack([torch.cat((reader.read(gate), reader.read(up))) for gate, up, _ in layout.experts])
        return cls(gate_up, torch.stack([reader.read(down) for _, _, down in layout.experts]))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_experts(x, ids, weights, self.gate_up, self.down)

    def tensors(self) -> list[torch.Tensor]:
        return [self.gate_up, self.down]


class QuantizedExperts:
    """Every expert's slice in its checkpoint's weight format (`raytp.model.formats`: GPTQ, AWQ, compressed-tensors
    int4/int8, fp8), gate and up fused per expert like a dense MLP's, each applied by its format's kernel to the
    tokens that chose the expert (`grouped_experts`): only the selected experts' weights are read.

    With RuntimeOptions.routed_quantized_experts on a CUDA rank, experts repacked for the GEMV kernel are stacked
    (`routed`, the per-expert weights then being views of the stacks) and decode batches take its routed launch
    (`raytp.kernels.routed_packed_gemv`), which reads only the selected experts inside CUDA graphs too; so does
    prefill of up to a few thousand (token, choice) pairs (`routes_prefill`), sorted by expert.
    """

    def __init__(self, gate_up: list[Weight], down: list[Weight],
                 routed: tuple[StackedMMA, StackedMMA] | None = None):
        self.gate_up, self.down, self.routed = gate_up, down, routed

    @classmethod
    def load(cls, layout: ExpertsLayout, reader: WeightReader) -> QuantizedExperts:
        gate_up = [fuse([read_linear(reader, gate), read_linear(reader, up)]) for gate, up, _ in layout.experts]
        down = [read_linear(reader, down) for _, _, down in layout.experts]
        if use_routed_quantized_experts(down[0].tensors()[0]):
            routed = _stacked(gate_up, reader.dtype), _stacked(down, reader.dtype)
            if None not in routed:  # views of the stacks serve prefill: nothing is held twice
                return cls(*([PackedWeight(p, None) for p in s.experts()] for s in routed), routed)
        held = lambda w: for_device(w, reader.dtype)  # noqa: E731
        return cls([held(w) for w in gate_up], [held(w) for w in down])

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.routed is not None:
            if x.shape[0] <= ROUTED_ROWS or x.is_cuda and torch.cuda.is_current_stream_capturing():
                return routed_packed_experts(x, ids, weights, *self.routed)
            if routes_prefill(ids.numel(), self.routed[0]):
                return routed_packed_experts(x, ids, weights, *self.routed, sort=True)
        return grouped_experts(x, ids, weights, len(self.down), lambda e, t: self.gate_up[e].apply(t),
                               lambda e, h: self.down[e].apply(h))

    def tensors(self) -> list[torch.Tensor]:
        if self.routed is not None:  # the per-expert weights are views of these
            return [t for stacked in self.routed for t in stacked.tensors()]
        return [t for w in self.gate_up + self.down for t in w.tensors()]


def _stacked(weights: list[Weight], dtype: torch.dtype) -> StackedMMA | None:
    """One projection of every expert stacked for the routed GEMV: repacked in one pass over their rows one after
    another where they share a format and column order and each has whole 64-row blocks of the kernel, else expert
    by expert; None where some expert's weight is not one the kernel reads."""
    one = fuse(weights)
    if one.out_features % (len(weights) * TILE_N) == 0:
        held = for_device(one, dtype)
        if held.decode_layout is not None and held.bias is None:
            return StackedMMA.split(held.decode_layout, len(weights))
    held = [for_device(w, dtype) for w in weights]
    if all(w.decode_layout is not None and w.bias is None for w in held):
        return StackedMMA.stack([w.decode_layout for w in held])
    return None


class SparseMoeBlock:
    """y = all_reduce(routed experts over this rank's columns): the MoE layer of one rank.

    router (experts, hidden), whole; experts: this rank's columns of every expert (StackedExperts or
    QuantizedExperts), or None where the rank holds no columns.
    """

    def __init__(self, router: torch.Tensor, experts: StackedExperts | QuantizedExperts | None, routing: Routing,
                 comm: Communicator):
        self.router, self.experts, self.routing, self.comm = router, experts, routing, comm

    @classmethod
    def load(cls, layout: ExpertsLayout, moe: MoeConfig, reader: WeightReader, comm: Communicator) -> SparseMoeBlock:
        """The router and this rank's slices of every expert."""
        gate, _, down = layout.experts[0]
        if not down.cols:
            experts = None
        else:
            experts = (QuantizedExperts if gate.quant is not None else StackedExperts).load(layout, reader)
        return cls(reader.read(layout.router), experts, Routing(moe.top_k, moe.normalize), comm)

    def partial(self, h: torch.Tensor) -> torch.Tensor:
        """(..., hidden) normed input -> this rank's partial output (..., hidden), before the all-reduce."""
        if self.experts is None:  # no columns here: this rank's share of the sum is zero
            return torch.zeros_like(h)
        x = h.reshape(-1, h.shape[-1])  # (tokens, hidden)
        weights, ids = self.routing.route(F.linear(x, self.router))
        return self.experts(x, ids, weights).view(h.shape)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.partial(h))

    def tensors(self) -> list[torch.Tensor]:
        return [self.router] + (self.experts.tensors() if self.experts is not None else [])
