"""Synthetic models: a real config's shapes with random weights made on each rank, no checkpoint, no disk.

    synthetic:llama-3.1-8b | synthetic:llama-3.1-70b | synthetic:llama-3.1-405b   the published HF configs
    synthetic:tiny                                                               a small config for tests
    synthetic:PATH/config.json                                                   any supported config.json

Every weight is cut into fixed global blocks (one head of q/k/v/o, `BLOCK` rows of the MLP and the vocab) and
each block is drawn from its own generator, seeded from (tensor name, block index). A rank draws only the blocks
that cover its slices, on its own device, so the concatenation over ranks is exactly a one-rank model's weights
whatever the split. Values depend on the device type (CPU and CUDA generators differ): compare splits on one kind
of device. Weights are N(0, 0.02^2), norms 1 + N(0, 0.02^2), so activations stay in range at any depth.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from raytp.model.config import ModelConfig
from raytp.parallel.plan import RankShard

PREFIX = "synthetic:"
BLOCK = 64  # MLP columns and vocab rows are drawn in blocks of this many (the last may be partial)
SCALE = 0.02
SEED = 20261121

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}

# Shapes from meta-llama/Llama-3.1-{8B,70B,405B}/config.json.
CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": _LLAMA31 | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32},
    "llama-3.1-70b": _LLAMA31 | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                 "num_attention_heads": 64},
    "llama-3.1-405b": _LLAMA31 | {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                                  "num_attention_heads": 128},
    # Small but awkward on purpose: 4 KV groups split 2/1/1 over 3 ranks (and zero-width ranks beyond 4), 1408 MLP
    # columns = 22 blocks, a vocab of 1000 ending in a partial block, and llama3 RoPE scaling. No EOS: runs go on.
    "tiny": {"model_type": "llama", "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1408,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE | {"original_max_position_embeddings": 256},
             "max_position_embeddings": 4096, "tie_word_embeddings": False},
}


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def synthetic_config(model: str) -> ModelConfig:
    """`synthetic:NAME` or `synthetic:PATH/config.json` -> its ModelConfig."""
    name = model.removeprefix(PREFIX)
    if name in CONFIGS:
        return ModelConfig.from_dict(CONFIGS[name])
    path = Path(name)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return ModelConfig.from_file(path)
    raise ValueError(f"unknown synthetic model {model!r}: use synthetic:{', synthetic:'.join(CONFIGS)} "
                     f"or synthetic:PATH/config.json")


def config_dict(name: str) -> dict:
    """The config.json-style dict of a named synthetic model (for writing one out)."""
    return json.loads(json.dumps(CONFIGS[name]))


class _Blocks:
    """Draws rows [start, stop) of a (size, width) tensor from per-block generators, on `device`."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator(device=device)

    def draw(self, name: str, index: int, shape: tuple[int, ...], mean: float = 0.0) -> torch.Tensor:
        self.gen.manual_seed(SEED ^ zlib.crc32(f"{name}#{index}".encode()))
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return t.mul_(SCALE).add_(mean).to(self.dtype)

    def rows(self, name: str, size: int, block: int, span: range, width: int) -> torch.Tensor:
        """Rows `span` of the (size, width) tensor `name`, whose global blocks have `block` rows."""
        if not span:
            return torch.empty((0, width), dtype=self.dtype, device=self.device)
        first, last = span.start // block, (span.stop - 1) // block
        parts = [self.draw(name, b, (min(block, size - b * block), width)) for b in range(first, last + 1)]
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        lo = span.start - first * block
        return full[lo : lo + len(span)].contiguous() if (lo, len(span)) != (0, full.shape[0]) else full


def synthetic_weights(config: ModelConfig, shard: RankShard, *, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Rank `shard`'s weights, in the layout of `raytp.model.llama.ShardedLlama` (see its docstring).

    Row-parallel matrices (o_proj, down_proj) are drawn as their transposes, so the blocks are rows there too.
    """
    c, D, H = config, config.head_dim, config.hidden_size
    g = _Blocks(dtype, torch.device(device))
    with torch.inference_mode(False), torch.no_grad():
        w: dict[str, torch.Tensor] = {"embed": g.rows("embed", c.vocab_size, BLOCK, shard.vocab_rows, H)}
        w["lm_head"] = w["embed"] if c.tie_word_embeddings else g.rows("lm_head", c.vocab_size, BLOCK,
                                                                       shard.vocab_rows, H)
        w["final_norm"] = g.draw("final_norm", 0, (H,), mean=1.0)
        heads_q, heads_kv = shard.q_heads, shard.kv_heads
        nq, nkv = c.num_heads * D, c.num_kv_heads * D
        q_rows = range(heads_q.start * D, heads_q.stop * D)
        kv_rows = range(heads_kv.start * D, heads_kv.stop * D)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            w[p + "attn_norm"] = g.draw(p + "attn_norm", 0, (H,), mean=1.0)
            w[p + "mlp_norm"] = g.draw(p + "mlp_norm", 0, (H,), mean=1.0)
            w[p + "wqkv"] = torch.cat([g.rows(p + "q", nq, D, q_rows, H), g.rows(p + "k", nkv, D, kv_rows, H),
                                       g.rows(p + "v", nkv, D, kv_rows, H)])
            if c.attention_bias:
                w[p + "bqkv"] = torch.cat([g.rows(p + "bq", nq, D, q_rows, 1), g.rows(p + "bk", nkv, D, kv_rows, 1),
                                           g.rows(p + "bv", nkv, D, kv_rows, 1)]).view(-1)
            w[p + "wo"] = g.rows(p + "o", nq, D, q_rows, H).t().contiguous()  # (hidden, local q * head_dim)
            cols, I = shard.mlp_cols, c.intermediate_size
            w[p + "w_gate_up"] = torch.cat([g.rows(p + "gate", I, BLOCK, cols, H), g.rows(p + "up", I, BLOCK, cols, H)])
            w[p + "w_down"] = g.rows(p + "down", I, BLOCK, cols, H).t().contiguous()  # (hidden, local cols)
    return w
