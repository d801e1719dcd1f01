"""Qwen3.5 and Qwen3.6, dense and MoE (`qwen3_5`, `qwen3_5_moe`; their text models `qwen3_5_text`,
`qwen3_5_moe_text`).

Three of every four layers (config.json's layer_types) are Gated DeltaNet linear attention
(`raytp.model.linear_attention`); the fourth is full attention whose q_proj also gives each query head an output
gate (sigmoid, before o_proj), with per-head q/k norms and RoPE on the first quarter of each head's dims
(partial_rotary_factor). Every RMSNorm but the DeltaNet's own scales by 1 + its weight. The MoE models route each
token to its top-k experts (softmax, renormalized) and add a shared SwiGLU expert behind a sigmoid gate.

The published checkpoints are multimodal (Qwen3_5ForConditionalGeneration): the text model's keys under
config.json's text_config, its tensors under model.language_model., a vision tower raytp does not read (text only).
The text-only classes (Qwen3_5ForCausalLM) keep them at the top and under model.. Either may hold `mtp.*`, the
multi-token-prediction layers (mtp_num_hidden_layers), which raytp loads and keeps for speculative decoding.
"""

from raytp.model.config_fields import ExpertNames, LinearAttentionDims, MoeConfig
from raytp.model.families.base import Family

EXPERTS = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj", ("num_experts",), "moe_intermediate_size", None)
FULL_ATTENTION_INTERVAL = 4  # layer_types when config.json has none: every 4th layer full attention (transformers')
MULTIMODAL_KEYS = ("quantization_config", "tie_word_embeddings")  # a multimodal config.json says at its top level


def text_model(d: dict) -> dict:
    """A multimodal config.json's text model: its text_config, with the top level's model_type, quantization and
    embedding tying."""
    return d["text_config"] | {"model_type": d["model_type"]} | {k: d[k] for k in MULTIMODAL_KEYS if k in d}


def moe_text_model(d: dict) -> dict:
    """A Qwen3.5-MoE config.json's text model: it has no dense MLP, and says no intermediate_size."""
    return {"intermediate_size": 0} | (text_model(d) if "text_config" in d else d)


def read(d: dict, fields: dict) -> dict:
    n = fields["num_layers"]
    interval = d.get("full_attention_interval", FULL_ATTENTION_INTERVAL)
    layer_types = d.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    rope = d.get("rope_parameters") or {}
    extra = dict(layer_types=tuple(layer_types), linear_attention=LinearAttentionDims.from_dict(d), qk_norm=True,
                 norm_offset=1.0, attention_gate=True, mtp_layers=d.get("mtp_num_hidden_layers", 0),
                 rotary_fraction=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)))
    if "num_experts" in d:
        extra |= dict(intermediate_size=0, moe=MoeConfig.from_dict(d, EXPERTS),
                      shared_expert_size=d["shared_expert_intermediate_size"])
    return fields | extra


def read_multimodal(d: dict, fields: dict) -> dict:
    return read(d, fields) | dict(text_prefix="model.language_model.")


QWEN3_5 = Family("qwen3_5", "Qwen3_5ForConditionalGeneration", read_multimodal, unwrap=text_model)
QWEN3_5_TEXT = Family("qwen3_5_text", "Qwen3_5ForCausalLM", read)
QWEN3_5_MOE = Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", read_multimodal, unwrap=moe_text_model)
QWEN3_5_MOE_TEXT = Family("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", read, unwrap=moe_text_model)
