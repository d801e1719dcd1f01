"""What a model family declares: how it reads its config.json and what it calls its tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass



@dataclass(frozen=True)
class LayerNames:
    """A layer's tensor names under `model.layers.<i>.`: its norms (None: the family has none there), its token
    mixer and its feed-forward block (a mixture of experts names its module in `MoeConfig.names`)."""

    attn_norm: str = "input_layernorm"  # before the mixer
    mlp_norm: str = "post_attention_layernorm"  # before the feed-forward block
    attn_out_norm: str | None = None  # on the mixer's output, before the residual add (Gemma's sandwich norms)
    mlp_out_norm: str | None = None  # on the feed-forward block's output, before the residual add
    attention: str = "self_attn."
    linear_attention: str = "linear_attn."
    mlp: str = "mlp."

    def mixer(self, kind: str) -> str:
        """The module of a token mixer of `kind` (a key of raytp.model.layout.MIXERS)."""
        return self.linear_attention if kind == "linear_attention" else self.attention


def plain(d: dict, fields: dict) -> dict:
    """A config.json that says nothing beyond the common fields."""
    return fields


def mistral_attention(d: dict, fields: dict) -> dict:
    """Mistral's config.json: no attention biases whatever attention_bias says, and a sliding_window that every layer
    keeps (Mistral-7B-v0.1's 4096), or none (null)."""
    fields = fields | dict(attention_bias=False, o_proj_bias=False)
    if not d.get("sliding_window") or fields["layer_types"]:
        return fields
    return fields | dict(layer_types=("sliding_attention",) * fields["num_layers"], sliding_window=d["sliding_window"])


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that runs it: the reference the tests compare with
    # (config.json, its common fields) -> raytp.model.config.ModelConfig's fields: the common ones, added to or changed
    read: Callable[[dict, dict], dict] = plain
    names: LayerNames = LayerNames()
    # config.json -> the decoder's keys (a multimodal config.json nests them), before the common fields are read
    unwrap: Callable[[dict], dict] = lambda d: d
