"""The model families raytp runs, one declaration each: what sets an architecture apart from the Llama decoder.

All of them share one forward (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP or a mixture of SwiGLU experts)
and one layout (`raytp.model.layout`); a declaration says which optional tensors the layout has and, for a
mixture of experts, what its tensors and config.json keys are called. Adding a family that fits
this shape is one entry here (see docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts family: every layer's MLP is a sparse block of SwiGLU experts behind a router."""

    module: str  # the block's module in each layer; its router is `<module>.gate`
    gate: str  # each expert's projections, `<module>.experts.<e>.<name>`
    up: str
    down: str
    count_keys: tuple[str, ...]  # config.json's number of experts, under the first of these names it has
    width_key: str  # config.json's inner width of one expert
    normalize_key: str | None  # config.json's switch for renormalizing the top-k weights; None: always renormalized


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that runs it: the reference the tests compare with
    qkv_bias: bool = False  # q/k/v projections carry a bias (whatever config.json's attention_bias says)
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm, k_norm of head_dim) before RoPE
    experts: Experts | None = None  # a mixture of experts in place of the dense MLP


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM"),
    Architecture("mistral", "MistralForCausalLM"),
    Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    Architecture("qwen3", "Qwen3ForCausalLM", qk_norm=True),
    Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, experts=Experts(
        "mlp", "gate_proj", "up_proj", "down_proj", ("num_experts", "num_local_experts"),  # transformers 5 writes
        "moe_intermediate_size", "norm_topk_prob")),  # num_local_experts, the published configs num_experts
    Architecture("mixtral", "MixtralForCausalLM", experts=Experts(
        "block_sparse_moe", "w1", "w3", "w2", ("num_local_experts",), "intermediate_size", None)),
)}
