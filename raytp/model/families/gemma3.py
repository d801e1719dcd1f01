"""Gemma 3's text model (`gemma3_text`, Gemma3ForCausalLM).

Five sliding-window layers to every full-attention one (config.json's layer_types, sliding_window), each kind with
its own RoPE base (the local base unscaled, the global one with the config's scaling); per-head q/k norms; scores
scaled by query_pre_attn_scalar ** -0.5; a GeGLU MLP (tanh GELU); every RMSNorm scales by 1 + its weight, and there
are four per layer, before and after attention and the MLP; the embedding rows are multiplied by sqrt(hidden_size).
The (1 + weight) is computed once at load in the model dtype: in float32 the same arithmetic as transformers', in
bfloat16 one rounding more than its float32 product.
"""

from raytp.model.config_fields import HIDDEN_ACTS, rope_scaling
from raytp.model.errors import UnsupportedModelError
from raytp.model.families.base import Family, LayerNames

SLIDING_WINDOW_PATTERN = 6  # layer_types when config.json has none: every 6th layer full attention (transformers')


def read(d: dict, fields: dict) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise UnsupportedModelError(f"{key}={d[key]}: raytp runs Gemma 3 without soft-capping (as published)")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=true: raytp runs causal decoders only")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in HIDDEN_ACTS:
        raise UnsupportedModelError(f"hidden_activation={act!r}; raytp runs {' or '.join(HIDDEN_ACTS)}")
    n = fields["num_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % d.get("sliding_window_pattern", SLIDING_WINDOW_PATTERN) else "full_attention"
        for i in range(n)]
    # transformers 5 writes one rope_parameters per layer type; older configs rope_theta, rope_local_base_freq and
    # the global layers' rope_scaling
    params = d.get("rope_parameters") or {}
    full = params.get("full_attention") or d.get("rope_scaling") or {}
    local = params.get("sliding_attention") or {}
    if rope_scaling(local) is not None:
        raise UnsupportedModelError(f"sliding_attention rope_parameters {local}: Gemma 3's local RoPE is unscaled")
    return fields | dict(
        layer_types=tuple(layer_types), sliding_window=d["sliding_window"],
        rope_theta=full.get("rope_theta", d.get("rope_theta", 1e6)), rope_scaling=rope_scaling(full),
        local_rope_theta=local.get("rope_theta", d.get("rope_local_base_freq", 1e4)),
        qk_norm=True, attention_scale=d.get("query_pre_attn_scalar", 256) ** -0.5, hidden_act=act, norm_offset=1.0,
        embed_scale=fields["hidden_size"] ** 0.5)


GEMMA3 = Family("gemma3_text", "Gemma3ForCausalLM", read, LayerNames(
    attn_norm="input_layernorm", attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm"))
