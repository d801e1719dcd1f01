"""A mixture of experts in the GPU decode loop (GPU host only): replayed from CUDA graphs, the routed Triton kernels
give the eager loop's tokens for greedy and sampled rows in batch buckets 4, 2 and 1; w4a16 experts likewise, as
per-expert GEMVs (every expert inside a graph) and with --routed-quantized-experts; and both with
--fused-moe, against the same loop without it; prefill with --grouped-mm-experts likewise."""

import json

import pytest
import torch

from raytp.kernels import dispatch

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


@pytest.mark.parametrize("routed", [False, True])
def test_graphed_w4a16_moe_decode_matches_eager_steps(tmp_path, monkeypatch, routed):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE | {"moe_intermediate_size": 128}))  # whole groups of 128
    monkeypatch.setattr(dispatch, "_routed_experts", routed)  # what --routed-quantized-experts sets
    model = f"synthetic:{config}@w4a16"
    assert generate(True, "nccl", model=model) == generate(False, "nccl", model=model)


@pytest.mark.parametrize("quant", ["", "@w4a16"])
def test_fused_moe_gives_the_torch_routings_tokens(tmp_path, monkeypatch, quant):
    """--fused-moe (routing and combining as one kernel each, one-token steps' experts as GEMVs over the choices)
    against torch's ops and the tiled expert kernels, in graphs: the same greedy and sampled tokens (float32 sums
    may differ in the last bit)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE | {"moe_intermediate_size": 128}))
    monkeypatch.setattr(dispatch, "_routed_experts", True)
    model = f"synthetic:{config}{quant}"
    monkeypatch.setattr(dispatch, "_fused_moe", False)
    want = generate(True, "nccl", model=model)
    monkeypatch.setattr(dispatch, "_fused_moe", True)  # what --fused-moe sets
    assert generate(True, "nccl", model=model) == want


def test_grouped_mm_prefill_gives_the_per_expert_prefills_logits(tmp_path, monkeypatch):
    """--grouped-mm-experts (bfloat16, Hopper and later) prefills 4 prompts of 40 tokens: every position's logits as
    with one matmul per selected expert, up to bfloat16 rounding (the GEMMs add in other orders)."""
    if torch.cuda.get_device_capability() < dispatch.GROUPED_MM_CAPABILITY:
        pytest.skip("not used before compute capability 9.0")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE))
    lm, comm = load(f"synthetic:{config}", "nccl", dtype="bfloat16")
    tokens = torch.randint(0, 1000, (4, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    positions, slots = torch.arange(40, device="cuda").expand(4, 40), torch.arange(4, device="cuda")
    want = lm.forward(tokens, positions, slots, every=True)
    monkeypatch.setattr(dispatch, "_grouped_mm_experts", True)
    got = lm.forward(tokens, positions, slots, every=True)
    comm.close()
    assert got.shape == (4, 40, 1000)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
