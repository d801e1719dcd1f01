"""gpt-oss (`gpt_oss`, GptOssForCausalLM: openai/gpt-oss-20b and -120b).

Sliding-window (128 positions) and full-attention layers in turn (config.json's layer_types), each query head with a
learned sink logit in its softmax's denominator (`self_attn.sinks`); biases on q, k, v and o_proj; YaRN RoPE; in
every layer a mixture of experts stored stacked in MXFP4 (`raytp.model.stacked_moe`): a router with a bias, each
token's weights the softmax of its top-k logits, each expert a SwiGLU clamped at swiglu_limit with a sigmoid gain of
alpha over interleaved gate/up rows. The chat format (harmony) is the checkpoint's chat_template.jinja, which the
tokenizer renders as any other; raytp.serving.harmony reads the answers.
"""

import dataclasses

from raytp.model.config_fields import ExpertNames, MoeConfig
from raytp.model.errors import UnsupportedModelError
from raytp.model.families.base import Family

# the router is `mlp.router`; gate and up share one stacked tensor, `mlp.experts.gate_up_proj`, rows interleaved
EXPERTS = ExpertNames("mlp", "gate_up_proj", "gate_up_proj", "down_proj", ("num_local_experts",), "intermediate_size",
                      None)
SWIGLU_ALPHA = 1.702  # GptOssConfig's default, which the published configs leave unsaid
SWIGLU_LIMIT = 7.0


def read(d: dict, fields: dict) -> dict:
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={d['hidden_act']!r}: gpt-oss's experts are clamped SwiGLUs (silu)")
    layer_types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(fields["num_layers"])]  # transformers' default
    moe = dataclasses.replace(MoeConfig.from_dict(d, EXPERTS), kind="stacked_experts", swiglu_clamp=(
        d.get("swiglu_alpha", SWIGLU_ALPHA), d.get("swiglu_limit", SWIGLU_LIMIT)))
    return fields | dict(layer_types=tuple(layer_types), sliding_window=d["sliding_window"], intermediate_size=0,
                         attention_sinks=True, moe=moe)


GPT_OSS = Family("gpt_oss", "GptOssForCausalLM", read)
