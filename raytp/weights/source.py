"""Where a model comes from: the `--model` argument to a config and to one rank's weights."""

from __future__ import annotations

import torch

from raytp.model.config import ModelConfig
from raytp.weights.checkpoint import load_shard
from raytp.weights.smollm2 import resolve_model
from raytp.parallel.plan import RankShard
from raytp.weights.synthetic import is_synthetic, synthetic_config, synthetic_weights


def model_config(model: str) -> ModelConfig:
    if is_synthetic(model):
        return synthetic_config(model)
    return ModelConfig.from_file(resolve_model(model))


def load_weights(model: str, config: ModelConfig, shard: RankShard, *, dtype: torch.dtype,
                 device: torch.device, progress: bool = True) -> dict[str, torch.Tensor]:
    if is_synthetic(model):  # random weights drawn on the rank itself: see raytp.weights.synthetic
        return synthetic_weights(config, shard, dtype=dtype, device=device)
    return load_shard(resolve_model(model), config, shard, dtype=dtype, device=device, progress=progress)
