"""Mixtral: Mistral's attention, and in every layer a mixture of SwiGLU experts (w1, w3, w2) in place of the MLP."""

from raytp.model.config_fields import ExpertNames, MoeConfig
from raytp.model.families.base import Family, mistral_attention

EXPERTS = ExpertNames("block_sparse_moe", "w1", "w3", "w2", ("num_local_experts",), "intermediate_size", None)


def read(d: dict, fields: dict) -> dict:
    return mistral_attention(d, fields) | dict(intermediate_size=0, moe=MoeConfig.from_dict(d, EXPERTS))


MIXTRAL = Family("mixtral", "MixtralForCausalLM", read)
