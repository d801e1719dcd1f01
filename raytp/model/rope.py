"""Rotary position embeddings: each mixer kind's angles, computed once per model and looked up once per step.

Frequencies follow transformers' ROPE_INIT_FUNCTIONS for the scalings of `raytp.model.config.ROPE_TYPES`: llama3's
(high frequencies kept, low ones divided by `factor`, interpolated in between), linear (every position divided by
`factor`) and YaRN's (gpt-oss: `yarn_inv_freq`, whose attention factor multiplies cos and sin). Sliding-window
layers take config.local_rope_theta, unscaled, where the config has one (Gemma 3). RoPE on a share of each head's
dims (config.rotary_fraction, Qwen3.5's partial_rotary_factor) has frequencies of that many dims, and angle 0 on the
others, which the attention puts where the kernel's rotate-half pairs them with each other
(raytp.model.attention.head_dims).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raytp.model.config import ModelConfig
from raytp.model.kv_cache import Rope


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies (head_dim/2,), and the factor cos and sin are multiplied by (1 but with YaRN)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling)
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled), 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071, transformers' `_compute_yarn_parameters` step for step): frequencies that turn fewer
    than beta_slow times over the original context divided by `factor`, those turning more than beta_fast times
    kept, a linear ramp between; and the factor cos and sin are multiplied by (0.1 ln(factor) + 1 unless the config
    gives it)."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
        given, all_dims = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(given) / mscale(all_dims) if given and all_dims else mscale(1)

    def dimension(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling.get("beta_fast") or 32), dimension(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kept = 1 - ramp  # each frequency's share left as it was
    return 1.0 / (factor * base) * (1 - kept) + 1.0 / base * kept, attention_factor


def rope_parameters(config: ModelConfig, mixer: str) -> tuple[float, dict | None]:
    """(base, scaling) of a mixer kind's RoPE."""
    if mixer == "sliding_attention" and config.local_rope_theta is not None:
        return config.local_rope_theta, None
    return config.rope_theta, config.rope_scaling


ROTARY_MIXERS = ("full_attention", "sliding_attention")  # the mixer kinds that rotate queries and keys


class RopeTables:
    """cos and sin (positions, head_dim) of every mixer kind the config lists, in float32, rotate-half layout; kinds
    with the same parameters share one table."""

    def __init__(self, config: ModelConfig, max_context: int, device: torch.device):
        positions = torch.arange(max_context, dtype=torch.float32, device=device)
        tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tables = {}
        for mixer in dict.fromkeys(m for m in config.mixers if m in ROTARY_MIXERS):
            theta, scaling = rope_parameters(config, mixer)
            key = (theta, repr(scaling))
            if key not in tables:
                rotary = int(config.head_dim * config.rotary_fraction)
                inv_freq, factor = rope_inv_freq(rotary, theta, scaling)
                angles = torch.outer(positions, inv_freq.to(device))
                # dims RoPE leaves alone turn by angle 0 (raytp.model.attention.head_dims puts them there)
                angles = F.pad(angles, (0, (config.head_dim - rotary) // 2))
                angles = torch.cat((angles, angles), dim=-1)
                tables[key] = angles.cos() * factor, angles.sin() * factor  # exact where the factor is 1
            self.tables[mixer] = tables[key]

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        """Each kind's angles at positions (batch, seq), in the model dtype."""
        looked_up: dict[int, Rope] = {}
        for mixer, (cos, sin) in self.tables.items():
            if id(cos) not in looked_up:
                looked_up[id(cos)] = Rope(cos[positions].to(dtype), sin[positions].to(dtype))
        return {mixer: looked_up[id(cos)] for mixer, (cos, _) in self.tables.items()}
