"""A mixture of experts in the GPU decode loop (GPU host only): replayed from CUDA graphs, the routed Triton kernels
give the eager loop's tokens for greedy and sampled rows in batch buckets 4, 2 and 1; w4a16 experts likewise, as
per-expert GEMVs (every expert inside a graph) and with --routed-quantized-experts."""

import json

import pytest
import torch

from raytp.kernels import dispatch

from tests.gpu.test_graphed_decode import generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Qwen3-MoE's shape in small: 16 experts of width 96, 4 per token
TINY_MOE = {"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16,
            "num_experts_per_tok": 4, "moe_intermediate_size": 96, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def test_graphed_moe_decode_matches_eager_steps(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE))
    model = f"synthetic:{config}"
    assert generate(True, "nccl", model=model) == generate(False, "nccl", model=model)


@pytest.mark.parametrize("routed", [False, True])
def test_graphed_w4a16_moe_decode_matches_eager_steps(tmp_path, monkeypatch, routed):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE | {"moe_intermediate_size": 128}))  # whole groups of 128
    monkeypatch.setattr(dispatch, "_routed_experts", routed)  # what --routed-quantized-experts sets
    model = f"synthetic:{config}@w4a16"
    assert generate(True, "nccl", model=model) == generate(False, "nccl", model=model)
