"""Model configuration, read from a Hugging Face `config.json`.

Only decoder-only Llama-family models are supported: they share one forward (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) and differ in what `raytp.model.architecture` declares for each.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raytp.model.architecture import ARCHITECTURES, Architecture
from raytp.model.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # the checkpoint methods import torch, which the CLI's argument checks do without
    from raytp.model.quant.base import QuantConfig

__all__ = ["NO_QUANT", "QUANT_PRESETS", "ConfigError", "ModelConfig", "MoeConfig", "quant_preset",
           "UnsupportedModelError", "quant_name"]


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
class MoeConfig:
    """The mixture of experts that replaces every layer's dense MLP (an architecture that declares `experts`)."""

    num_experts: int
    top_k: int  # experts each token is routed to (num_experts_per_tok)
    expert_size: int  # one expert's SwiGLU inner width: the columns the ranks split, the same range of every expert
    normalize: bool  # the top-k routing weights renormalized to sum to 1 (Mixtral always, Qwen3-MoE: norm_topk_prob)

    @classmethod
    def from_dict(cls, d: dict, arch: Architecture) -> MoeConfig:
        names = arch.experts
        sparse_step, dense_layers = d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
        if sparse_step != 1 or dense_layers:  # Qwen3-MoE can interleave dense MLP layers; no published model does
            raise UnsupportedModelError(f"decoder_sparse_step={sparse_step}, mlp_only_layers={dense_layers}: raytp "
                                        f"runs {arch.model_type} models whose every layer is a mixture of experts "
                                        f"(decoder_sparse_step 1, no mlp_only_layers)")
        count_key = next((k for k in names.count_keys if k in d), names.count_keys[0])
        moe = cls(d[count_key], d["num_experts_per_tok"], d[names.width_key],
                  bool(d[names.normalize_key]) if names.normalize_key else True)
        if not 0 < moe.top_k <= moe.num_experts:
            raise UnsupportedModelError(f"num_experts_per_tok={moe.top_k} with {count_key}={moe.num_experts}: each "
                                        f"token needs between 1 and {moe.num_experts} experts")
        return moe


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # config.json's model_type, a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's SwiGLU inner width; 0 in a mixture of experts (see `moe`)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; each serves num_heads // num_kv_heads query heads
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3-style frequency scaling, as in config.json ({"rope_type": "llama3", "factor": ...}) or None
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (always with Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quant: QuantConfig | None = None  # quantized Linear weights, or None: every weight in the model dtype
    moe: MoeConfig | None = None  # experts in place of every layer's dense MLP, or None

    def __post_init__(self):
        if self.moe is not None and self.quant is not None and self.quant.dynamic_activations:
            # here, not in from_dict: synthetic presets add quant. An expert's down_proj input is split over the
            # ranks, so its per-token activation scale would need an exchange per expert and layer
            raise UnsupportedModelError(f"{self.arch} with activations quantized at run time ({self.quant.describe()})"
                                        f": raytp runs quantized experts with 16-bit activations (w4a16, w8a16, "
                                        f"GPTQ, AWQ, fp8 weights); use one of those checkpoints")

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.architecture.qkv_bias

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = d.get("model_type")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={arch!r} (architectures={d.get('architectures')}); "
                f"raytp runs {', '.join(sorted(ARCHITECTURES))}"
            )
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        # transformers >= 5 writes "rope_parameters" (rope_theta inside); older configs "rope_scaling"
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_theta = (rope or {}).get("rope_theta", d.get("rope_theta", 10000.0))
        rope_scaling = rope
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise UnsupportedModelError(
                    f"unsupported rope_scaling type {kind!r}; raytp supports 'llama3' scaling or none"
                )
            rope_scaling = None if kind in ("default", None) else dict(rope_scaling)
        moe = MoeConfig.from_dict(d, ARCHITECTURES[arch]) if ARCHITECTURES[arch].experts else None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=0 if moe else d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quant=_quant_config(d["quantization_config"]) if d.get("quantization_config") else None,
            moe=moe,
        )

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
            raise ConfigError(f"{path} is not a Llama-family config.json: {e} is missing or malformed") from None


def _quant_config(q: dict) -> QuantConfig:
    from raytp.model.quant.registry import quant_config

    return quant_config(q)
