"""The kernels' torch fallbacks (what CPU ranks run) against Hugging Face's own modules."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from raytp.kernels.norm import add_rms_norm, rms_norm, swiglu
from transformers import LlamaConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_residual_add_match_transformers(dtype):
    x, delta = torch.randn(3, 5, 96).to(dtype), torch.randn(3, 5, 96).to(dtype)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    norm = norm.to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))
        total, normed = add_rms_norm(x, delta, norm.weight, 1e-5)
        assert torch.equal(total, x + delta)
        assert torch.equal(normed, norm(x + delta))


def test_swiglu_matches_the_llama_mlp():
    config = LlamaConfig(hidden_size=32, intermediate_size=48)
    mlp = LlamaMLP(config)
    x = torch.randn(2, 7, 32)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    with torch.no_grad():
        ours = mlp.down_proj(swiglu(torch.nn.functional.linear(x, gate_up)))
        torch.testing.assert_close(ours, mlp(x))
