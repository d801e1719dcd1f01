"""What config.json says that families read alike: the common fields, RoPE scalings, experts.

`raytp.model.config.ModelConfig.from_dict` reads `common_fields` and hands them to the family of config.json's
model_type (`raytp.model.families`), whose reading adds or overrides fields and refuses what it does not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from raytp.model.errors import UnsupportedModelError

if TYPE_CHECKING:  # the checkpoint methods import torch, which the CLI's argument checks do without
    from raytp.model.quant.base import QuantConfig

# The MLP gate activations raytp runs (`raytp.model.mlp.ACTIVATIONS`): SwiGLU's and GeGLU's tanh GELU
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
# RoPE frequency scalings raytp computes (`raytp.model.rope.rope_inv_freq`): llama3's, linear position scaling and
# YaRN's (gpt-oss)
ROPE_TYPES = ("llama3", "linear", "yarn")


@dataclass(frozen=True)
class ExpertNames:
    """What a mixture-of-experts family calls its tensors and config.json keys."""

    module: str  # the block's module in each layer; its router is `<module>.gate`
    gate: str  # each expert's projections, `<module>.experts.<e>.<name>`
    up: str
    down: str
    count_keys: tuple[str, ...]  # config.json's number of experts, under the first of these names it has
    width_key: str  # config.json's inner width of one expert
    normalize_key: str | None  # config.json's switch for renormalizing the top-k weights; None: always renormalized


@dataclass(frozen=True)
class MoeConfig:
    """The mixture of experts that replaces every layer's dense MLP (a family that reads one)."""

    num_experts: int
    top_k: int  # experts each token is routed to (num_experts_per_tok)
    expert_size: int  # one expert's SwiGLU inner width: the columns the ranks split, the same range of every expert
    normalize: bool  # the top-k routing weights renormalized to sum to 1 (Mixtral always, Qwen3-MoE: norm_topk_prob)
    names: ExpertNames
    kind: str = "experts"  # the layer kind, a key of raytp.model.layout.MIXTURES
    # (alpha, limit) of experts computing (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate,
    # limit) (gpt-oss); None: silu(gate) * up
    swiglu_clamp: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: dict, names: ExpertNames) -> MoeConfig:
        sparse_step, dense_layers = d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
        if sparse_step != 1 or dense_layers:  # Qwen3-MoE can interleave dense MLP layers; no published model does
            raise UnsupportedModelError(f"decoder_sparse_step={sparse_step}, mlp_only_layers={dense_layers}: raytp "
                                        f"runs {d.get('model_type')} models whose every layer is a mixture of experts "
                                        f"(decoder_sparse_step 1, no mlp_only_layers)")
        count_key = next((k for k in names.count_keys if k in d), names.count_keys[0])
        moe = cls(d[count_key], d["num_experts_per_tok"], d[names.width_key],
                  bool(d[names.normalize_key]) if names.normalize_key else True, names)
        if not 0 < moe.top_k <= moe.num_experts:
            raise UnsupportedModelError(f"num_experts_per_tok={moe.top_k} with {count_key}={moe.num_experts}: each "
                                        f"token needs between 1 and {moe.num_experts} experts")
        return moe


@dataclass(frozen=True)
class LinearAttentionDims:
    """A Gated DeltaNet's sizes (Qwen3.5's linear attention, `raytp.model.linear_attention`), from config.json's
    linear_* keys."""

    key_heads: int  # linear_num_key_heads: the split's unit, each with its query head
    value_heads: int  # linear_num_value_heads, a multiple of key_heads
    key_dim: int  # linear_key_head_dim
    value_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim

    @classmethod
    def from_dict(cls, d: dict) -> LinearAttentionDims:
        dims = cls(d["linear_num_key_heads"], d["linear_num_value_heads"], d["linear_key_head_dim"],
                   d["linear_value_head_dim"], d["linear_conv_kernel_dim"])
        if dims.value_heads % dims.key_heads:
            raise UnsupportedModelError(f"linear_num_value_heads={dims.value_heads} is not a multiple of "
                                        f"linear_num_key_heads={dims.key_heads}")
        return dims

    @property
    def values_per_key(self) -> int:
        return self.value_heads // self.key_heads

    def conv_channels(self, key_heads: int) -> int:
        """q, k and v channels of `key_heads` key heads with their value heads: what the convolution mixes."""
        return key_heads * (2 * self.key_dim + self.values_per_key * self.value_dim)

    def state_bytes(self, key_heads: int, nbytes: int) -> int:
        """One sequence's state of `key_heads` key heads in one layer: the conv inputs in the model dtype (`nbytes`
        each) and the float32 recurrent state of their value heads."""
        conv = self.conv_channels(key_heads) * (self.conv_kernel - 1) * nbytes
        return conv + key_heads * self.values_per_key * self.key_dim * self.value_dim * 4


def common_fields(d: dict) -> dict:
    """ModelConfig's fields that every decoder's config.json gives alike, by their names there."""
    num_heads = d["num_attention_heads"]
    num_kv_heads = d.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    # transformers >= 5 writes "rope_parameters" (rope_theta inside); older configs "rope_scaling"
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    eos = d.get("eos_token_id")
    layer_types = tuple(d.get("layer_types") or ())
    return dict(
        arch=d["model_type"],
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d.get("intermediate_size", 0),  # a mixture of experts may have none
        num_layers=d["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=(rope or {}).get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling(rope),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),  # q, k, v and o_proj alike (Llama, Qwen3)
        o_proj_bias=bool(d.get("attention_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        quant=_quant_config(d["quantization_config"]) if d.get("quantization_config") else None,
        layer_types=layer_types,
        sliding_window=d["sliding_window"] if "sliding_attention" in layer_types else None,
    )


def rope_scaling(rope: dict | None) -> dict | None:
    """config.json's RoPE parameters -> the scaling of one of ROPE_TYPES, or None; refuses any other."""
    kind = (rope or {}).get("rope_type", (rope or {}).get("type"))
    if kind in ("default", None):
        return None
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}; raytp supports "
                                    f"{' or '.join(map(repr, ROPE_TYPES))} scaling or none")
    return dict(rope)


def _quant_config(q: dict) -> QuantConfig:
    from raytp.model.quant.registry import quant_config

    return quant_config(q)
