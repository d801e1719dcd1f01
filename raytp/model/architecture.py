"""The model families raytp runs, one declaration each: what sets an architecture apart from the Llama decoder.

All of them share one forward (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) and one layout
(`raytp.model.layout`); a declaration says which optional tensors the layout has. Adding a family that fits
this shape is one entry here (see the README's "Adding an architecture").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that runs it: the reference the tests compare with
    qkv_bias: bool = False  # q/k/v projections carry a bias (whatever config.json's attention_bias says)
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm, k_norm of head_dim) before RoPE


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM"),
    Architecture("mistral", "MistralForCausalLM"),
    Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    Architecture("qwen3", "Qwen3ForCausalLM", qk_norm=True),
)}
