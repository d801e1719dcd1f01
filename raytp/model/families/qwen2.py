"""Qwen2 and Qwen2.5: q/k/v carry a bias and o_proj none, whatever config.json's attention_bias says."""

from raytp.model.families.base import Family


def read(d: dict, fields: dict) -> dict:
    return fields | dict(attention_bias=True, o_proj_bias=False)


QWEN2 = Family("qwen2", "Qwen2ForCausalLM", read)
