"""The fused RoPE + cache write and the decode attention kernels against their torch versions, and a whole
model's tokens with every Triton kernel on against all of them off, and the FP8 KV cache's tokens in CUDA graphs
against eager steps (GPU host only)."""

from types import SimpleNamespace

import pytest
import torch

from raytp.kernels import attention, dispatch, rope_cache
from raytp.kernels.dispatch import triton
from tests.gpu.test_graphed_decode import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                                 reason="needs CUDA and Triton")]


def rope_inputs(B, T, n_q, n_kv, D, ctx, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, T, (n_q + 2 * n_kv) * D, device="cuda", generator=g).to(dtype)
    positions = torch.stack([torch.arange(T, device="cuda") + 17 * b for b in range(B)])
    slots = torch.randperm(B + 1, device="cuda", generator=g)[:B]
    angles = torch.rand(ctx, D // 2, device="cuda", generator=g) * 100
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos()[positions].to(dtype), angles.sin()[positions].to(dtype)
    caches = [torch.randn(B + 1, n_kv, ctx, D, device="cuda", generator=g).to(dtype) for _ in range(2)]
    return qkv, cos, sin, positions, slots, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", [(1, 1, 32, 8, 128), (4, 1, 8, 2, 128), (2, 7, 3, 1, 64), (3, 1, 2, 2, 64)])
def test_rope_and_cache_kernel_equals_torch_bit_for_bit(dtype, B, T, n_q, n_kv, D):
    qkv, cos, sin, positions, slots, (k, v) = rope_inputs(B, T, n_q, n_kv, D, 64, dtype)
    k_ref, v_ref = k.clone(), v.clone()
    q_ref = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, k_ref, v_ref)
    q = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, k, v)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(32, 8, 128), (8, 1, 128), (3, 3, 64), (9, 3, 64)])
@pytest.mark.parametrize("ctx,lengths", [(300, [1, 2, 300]), (2048, [255, 256, 257, 1999]),
                                         (8192, [64, 4097, 8192])])
def test_decode_attention_kernel_matches_torch(dtype, n_q, n_kv, D, ctx, lengths):
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q)
    k, v = (torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    slots = torch.arange(B, device="cuda").flip(0) + 1
    positions = torch.tensor(lengths, device="cuda").view(B, 1) - 1
    # the kernels read only these fields of the model's StepInputs
    step = SimpleNamespace(span=ctx, lengths=positions[:, -1] + 1,
                           visible=(torch.arange(ctx, device="cuda").view(1, 1, ctx) <= positions.unsqueeze(-1)).unsqueeze(1))
    got = attention.cached_attention(q, k, v, slots, step)
    want = attention.cached_attention_torch(q, k, v, slots, step)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_tokens_with_triton_kernels_equal_the_torch_path(monkeypatch):
    fused = generate(True, "hoststaged")  # float32: RoPE and cache bit-exact, attention within float32 rounding
    monkeypatch.setattr(dispatch, "_enabled", False)  # what set_triton(False) does, undone after the test
    assert generate(False, "hoststaged") == fused


def test_fp8_cache_tokens_in_cuda_graphs_equal_eager_steps():
    """The FP8 cache (torch code on every device) replayed from CUDA graphs gives the eager steps' tokens."""
    assert generate(True, "hoststaged", kv_dtype="fp8") == generate(False, "hoststaged", kv_dtype="fp8")
