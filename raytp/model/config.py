"""Model configuration, read from a Hugging Face `config.json`.

`ModelConfig.from_dict` reads what every decoder's config.json says alike (widths, heads, RoPE, vocabulary,
quantization) and hands it to the family that config.json's model_type names (`raytp.model.families`), which reads
the rest and refuses what it does not run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raytp.model.config_fields import (HIDDEN_ACTS, ROPE_TYPES, ExpertNames, LinearAttentionDims, MoeConfig,
                                      common_fields)
from raytp.model.errors import ConfigError, UnsupportedModelError
from raytp.model.families import FAMILIES, Family

if TYPE_CHECKING:  # the checkpoint methods import torch, which the CLI's argument checks do without
    from raytp.model.quant.base import QuantConfig

__all__ = ["HIDDEN_ACTS", "NO_QUANT", "QUANT_PRESETS", "ROPE_TYPES", "ConfigError", "ExpertNames", "ModelConfig",
           "MoeConfig", "quant_preset", "UnsupportedModelError", "quant_name"]


# The quantizations a synthetic model takes (`synthetic:NAME@w4a16`, `--quant`), as llmcompressor's presets of the
# same names: int4 symmetric in groups of 128, int8 symmetric with one scale per output row, float8 e4m3 weights with
# one scale per output row (fp8-blocks: per block of 128 x 128, as Qwen's FP8 checkpoints); fp8-dynamic
# (FP8_DYNAMIC) and w8a8 (W8A8) the same 8-bit weights with activations quantized per token at run time. The planner
# counts them like the same quantization read from a checkpoint.
QUANT_PRESETS = ("w4a16", "w8a16", "fp8", "fp8-blocks", "fp8-dynamic", "w8a8")


@functools.cache
def quant_preset(name: str) -> QuantConfig:
    """The method config of the preset `name` (one of QUANT_PRESETS)."""
    from raytp.model.quant.compressed_tensors import CompressedTensors
    from raytp.model.quant.fp8_blocks import FP8Blocks

    return {"w4a16": CompressedTensors("int", 4, 128), "w8a16": CompressedTensors("int", 8, None),
            "fp8": CompressedTensors("fp8", 8, None),
            "fp8-blocks": FP8Blocks("fp8", 8, 128, block_rows=128),
            "fp8-dynamic": CompressedTensors("fp8", 8, None, dynamic_activations=True),
            "w8a8": CompressedTensors("int", 8, None, dynamic_activations=True)}[name]


NO_QUANT = "none"  # `raytp bench --quant none`: every weight in the model dtype


def quant_name(quant: QuantConfig | None) -> str:
    """What results call a model's quantization: NO_QUANT, a preset's name, or else (a checkpoint's own) its
    description, so that a row never claims a preset it does not match."""
    if quant is None:
        return NO_QUANT
    return next((name for name in QUANT_PRESETS if quant_preset(name) == quant), quant.describe())


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # config.json's model_type, a key of raytp.model.families.FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's SwiGLU inner width; 0 in a mixture of experts (see `moe`)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; each serves num_heads // num_kv_heads query heads
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # frequency scaling of one of ROPE_TYPES, as in config.json ({"rope_type": "llama3", "factor": ...}) or None
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (always with Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quant: QuantConfig | None = None  # quantized Linear weights, or None: every weight in the model dtype
    moe: MoeConfig | None = None  # experts in place of every layer's dense MLP, or None
    # Each layer's token mixer, a key of raytp.model.layout.MIXERS (config.json's layer_types); () all full attention
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # positions a sliding_attention layer's query sees, itself included
    local_rope_theta: float | None = None  # the RoPE base of sliding_attention layers, unscaled; None: as the others
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm, k_norm of head_dim) before RoPE (Qwen3, Gemma 3)
    attention_scale: float | None = None  # attention scores' scale; None: head_dim ** -0.5
    hidden_act: str = "silu"  # the MLP's gate activation, a key of raytp.model.mlp.ACTIVATIONS
    norm_offset: float = 0.0  # every RMSNorm scales by (offset + weight): Gemma stores 1 + its weights' values as 0
    embed_scale: float | None = None  # the embedding rows are multiplied by this (Gemma: sqrt(hidden_size))
    linear_attention: LinearAttentionDims | None = None  # the linear_attention layers' sizes (Qwen3.5), or None
    rotary_fraction: float = 1.0  # the share of each head's dims RoPE rotates, the first ones (Qwen3.5: 0.25)
    attention_gate: bool = False  # q_proj also gives each query head an output gate, sigmoid-applied (Qwen3.5)
    shared_expert_size: int = 0  # a mixture of experts' always-on SwiGLU expert, its width; gated by a sigmoid
    text_prefix: str = "model."  # the decoder's tensors' prefix; a multimodal checkpoint's: "model.language_model."
    mtp_layers: int = 0  # multi-token-prediction layers stored under mtp.* (Qwen3.5), loaded and kept
    attention_sinks: bool = False  # a learned logit per query head in its softmax's denominator (gpt-oss)
    o_proj_bias: bool = False  # o_proj has a bias (config.json's attention_bias but for Qwen2), added by one rank

    def __post_init__(self):
        if self.moe is None and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size is {self.intermediate_size or 'missing'}: a dense MLP needs its "
                              f"width")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types lists {len(self.layer_types)} layers where num_hidden_layers is "
                              f"{self.num_layers}; give one type per layer")
        if self.moe is not None and self.quant is not None and self.quant.dynamic_activations:
            # here, not in from_dict: synthetic presets add quant. An expert's down_proj input is split over the
            # ranks, so its per-token activation scale would need an exchange per expert and layer
            raise UnsupportedModelError(f"{self.arch} with activations quantized at run time ({self.quant.describe()})"
                                        f": raytp runs quantized experts with 16-bit activations (w4a16, w8a16, "
                                        f"GPTQ, AWQ, fp8 weights); use one of those checkpoints")

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @property
    def mixers(self) -> tuple[str, ...]:
        """Each layer's token mixer (layer_types, or full attention everywhere)."""
        return self.layer_types or ("full_attention",) * self.num_layers

    def norm(self, weight):
        """An RMSNorm's weight as the forward multiplies by it (a tensor read from the checkpoint)."""
        return weight + self.norm_offset if self.norm_offset else weight

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = d.get("model_type")
        if arch not in FAMILIES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={arch!r} (architectures={d.get('architectures')}); "
                f"raytp runs {', '.join(sorted(FAMILIES))}"
            )
        d = FAMILIES[arch].unwrap(d)
        return cls(**FAMILIES[arch].read(d, common_fields(d)))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix it or "
                              f"download the model again") from None
        try:
            return cls.from_dict(d)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{path}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a config.json raytp can read: {e} is missing or malformed") from None
