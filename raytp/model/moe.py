"""One rank's share of a sparse mixture-of-experts block (Qwen3-MoE, Mixtral), in place of the dense MLP.

    router   replicated: every rank holds the whole (experts, hidden) matrix and computes the same logits from the
             same all-reduced input, so every rank selects the same experts with the same weights, with no
             communication
    experts  rank r holds columns `expert_cols[r]` of EVERY expert (gate/up rows, down input columns): the same
             uneven range in each expert, like the dense MLP's columns, so each token's work is shared by the ranks
             as their memory is, whichever experts it selects; a rank may hold no columns at all. How they are held
             and run is raytp.model.experts' (act-order checkpoints permute each expert's columns by its own
             down_proj groups, `raytp.model.layout`)
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

from raytp.kernels.moe_routing import top_k_routing
from raytp.model.config import MoeConfig
from raytp.model.experts import Experts, load_experts
from raytp.model.formats import WeightReader
from raytp.model.layout import ExpertsLayout
from raytp.parallel.comm import Communicator


@dataclass(frozen=True)
class Routing:
    top_k: int  # experts per token (num_experts_per_tok)
    normalize: bool  # renormalize the top-k probabilities to sum to 1

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (tokens, experts) -> weights (tokens, top_k) float32, expert ids (tokens, top_k) int64."""
        return top_k_routing(logits, self.top_k, self.normalize)


class SparseMoeBlock:
    """y = all_reduce(routed experts over this rank's columns): the MoE layer of one rank.

    router (experts, hidden), whole; experts: this rank's columns of every expert (raytp.model.experts), or None
    where the rank holds no columns.
    """

    def __init__(self, router: torch.Tensor, experts: Experts | None, routing: Routing, comm: Communicator):
        self.router, self.experts, self.routing, self.comm = router, experts, routing, comm

    @classmethod
    def load(cls, layout: ExpertsLayout, moe: MoeConfig, reader: WeightReader, comm: Communicator,
             act_quant_weight_only: bool) -> SparseMoeBlock:
        """The router and this rank's slices of every expert (`act_quant_weight_only`: formats.for_device)."""
        _, _, down = layout.experts[0]
        experts = load_experts(layout, reader, act_quant_weight_only) if down.cols else None
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
