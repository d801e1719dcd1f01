"""A mixture of experts in the GPU decode loop (GPU host only): replayed from CUDA graphs, the routed Triton kernels
give the eager loop's tokens for greedy and sampled rows in batch buckets 4, 2 and 1; w4a16 experts (the packed
GEMV's routed launch) likewise; both with the Triton routing and combining against torch's; and the prefill
(the grouped GEMM on Hopper and later) against one matmul per selected expert."""

import json

import pytest
import torch

from raytp.kernels import dispatch, moe_routing
from raytp.model.experts import PackedExperts, StackedExperts, TorchExperts
from raytp.model.formats import DenseWeight

from tests.gpu.test_graphed_decode import generate, load

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


def test_graphed_w4a16_moe_decode_matches_eager_steps(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE | {"moe_intermediate_size": 128}))  # whole groups of 128
    model = f"synthetic:{config}@w4a16"
    lm, comm = load(model, "nccl")
    comm.close()
    assert isinstance(lm.layers[0].mlp.experts, PackedExperts)  # the routed launch, not per-expert GEMVs
    assert generate(True, "nccl", model=model) == generate(False, "nccl", model=model)


@pytest.mark.parametrize("quant", ["", "@w4a16"])
def test_routing_kernels_give_the_torch_routings_tokens(tmp_path, monkeypatch, quant):
    """The routing and combining kernels (one launch each) against torch's ops, in graphs: the same greedy and
    sampled tokens (float32 sums may differ in the last bit)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE | {"moe_intermediate_size": 128}))
    model = f"synthetic:{config}{quant}"
    want = generate(True, "nccl", model=model)
    monkeypatch.setattr(moe_routing, "use_triton", lambda t: False)  # torch's routing and combining
    assert generate(True, "nccl", model=model) == want


def test_prefill_gives_the_per_expert_prefills_logits(tmp_path):
    """bfloat16 prefill of 4 prompts of 40 tokens (the grouped GEMM on Hopper and later, the routed kernels before):
    every position's logits as with one matmul per selected expert, up to bfloat16 rounding (the GEMMs add in other
    orders)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE))
    lm, comm = load(f"synthetic:{config}", "nccl", dtype="bfloat16")
    tokens = torch.randint(0, 1000, (4, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    positions, slots = torch.arange(40, device="cuda").expand(4, 40), torch.arange(4, device="cuda")
    stacked = [layer.mlp.experts for layer in lm.layers]
    assert all(isinstance(e, StackedExperts) for e in stacked)
    assert stacked[0].grouped_mm == (torch.cuda.get_device_capability() >= dispatch.GROUPED_MM_CAPABILITY)
    got = lm.forward(tokens, positions, slots, every=True)
    for layer, e in zip(lm.layers, stacked):  # the torch reference on the same weights
        layer.mlp.experts = TorchExperts([DenseWeight(w) for w in e.gate_up], [DenseWeight(w) for w in e.down])
    want = lm.forward(tokens, positions, slots, every=True)
    comm.close()
    assert got.shape == (4, 40, 1000)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
