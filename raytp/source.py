"""Where a model comes from: the `--model` argument to a config and to one rank's weights."""

from __future__ import annotations

import torch

from raytp.config import ModelConfig
from raytp.loader import load_shard
from raytp.models import resolve_model
from raytp.plan import RankShard


def model_config(model: str) -> ModelConfig:
    return ModelConfig.from_file(resolve_model(model))


def load_weights(model: str, config: ModelConfig, shard: RankShard, *, dtype: torch.dtype,
                 device: torch.device, progress: bool = True) -> dict[str, torch.Tensor]:
    return load_shard(resolve_model(model), config, shard, dtype=dtype, device=device, progress=progress)
