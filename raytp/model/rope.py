"""Rotary position embeddings: each mixer kind's angles, computed once per model and looked up once per step.

Frequencies follow transformers' ROPE_INIT_FUNCTIONS for the scalings of `raytp.model.config.ROPE_TYPES`: llama3's
(high frequencies kept, low ones divided by `factor`, interpolated in between) and linear (every position divided by
`factor`). Sliding-window layers take config.local_rope_theta, unscaled, where the config has one (Gemma 3).
"""

from __future__ import annotations

import math

import torch

from raytp.model.config import ModelConfig
from raytp.model.kv_cache import Rope


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim/2,)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_parameters(config: ModelConfig, mixer: str) -> tuple[float, dict | None]:
    """(base, scaling) of a mixer kind's RoPE."""
    if mixer == "sliding_attention" and config.local_rope_theta is not None:
        return config.local_rope_theta, None
    return config.rope_theta, config.rope_scaling


class RopeTables:
    """cos and sin (positions, head_dim) of every mixer kind the config lists, in float32, rotate-half layout; kinds
    with the same parameters share one table."""

    def __init__(self, config: ModelConfig, max_context: int, device: torch.device):
        positions = torch.arange(max_context, dtype=torch.float32, device=device)
        tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tables = {}
        for mixer in dict.fromkeys(config.mixers):
            theta, scaling = rope_parameters(config, mixer)
            key = (theta, repr(scaling))
            if key not in tables:
                angles = torch.outer(positions, rope_inv_freq(config.head_dim, theta, scaling).to(device))
                angles = torch.cat((angles, angles), dim=-1)
                tables[key] = angles.cos(), angles.sin()
            self.tables[mixer] = tables[key]

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        """Each kind's angles at positions (batch, seq), in the model dtype."""
        looked_up: dict[int, Rope] = {}
        for mixer, (cos, sin) in self.tables.items():
            if id(cos) not in looked_up:
                looked_up[id(cos)] = Rope(cos[positions].to(dtype), sin[positions].to(dtype))
        return {mixer: looked_up[id(cos)] for mixer, (cos, _) in self.tables.items()}
