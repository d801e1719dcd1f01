"""Model configuration, read from a Hugging Face `config.json`.

Only decoder-only Llama-family models are supported: they share one forward (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) and differ in a few flags that live here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type in config.json -> whether q/k/v projections carry a bias
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}


class ConfigError(ValueError):
    """A config.json that cannot be read; the message names the file and where it breaks."""


class UnsupportedModelError(ConfigError):
    """The config describes a model raytp cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama", "mistral" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
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
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={arch!r} (architectures={d.get('architectures')}); "
                f"raytp runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
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
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=SUPPORTED_ARCHITECTURES[arch] or bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
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

    def param_count(self) -> int:
        """Parameters of the whole model (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h
