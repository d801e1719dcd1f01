"""Qwen3-MoE: Qwen3's attention, and in every layer a mixture of SwiGLU experts in place of the MLP."""

from raytp.model.config_fields import ExpertNames, MoeConfig
from raytp.model.families.base import Family

# transformers 5 writes num_local_experts, the published configs num_experts
EXPERTS = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj", ("num_experts", "num_local_experts"),
                      "moe_intermediate_size", "norm_topk_prob")


def read(d: dict, fields: dict) -> dict:
    return fields | dict(qk_norm=True, intermediate_size=0, moe=MoeConfig.from_dict(d, EXPERTS))


QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", read)
