"""Qwen3: per-head RMSNorm of q and k before RoPE (q_norm, k_norm), no bias."""

from raytp.model.families.base import Family


def read(d: dict, fields: dict) -> dict:
    return fields | dict(qk_norm=True)


QWEN3 = Family("qwen3", "Qwen3ForCausalLM", read)
