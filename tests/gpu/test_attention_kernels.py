"""The fused RoPE + cache write and the decode attention kernels against their torch versions, and a whole
model's tokens with every Triton kernel on against all of them off (GPU host only); likewise with the FP8 KV cache
(raytp.kernels.kv_fp8), whose Triton paths need compute capability 8.9."""

from types import SimpleNamespace

import pytest
import torch

from raytp.kernels import attention, dispatch, kv_fp8, rope_cache
from raytp.kernels.dispatch import triton
from tests.gpu.test_graphed_decode import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                                 reason="needs CUDA and Triton")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="Triton converts float8 e4m3 from compute capability 8.9")


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


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", [(1, 1, 32, 8, 128), (4, 1, 8, 2, 128), (2, 7, 3, 1, 64), (3, 1, 2, 2, 64)])
def test_rope_and_cache_kernel_writes_the_fp8_cache_of_torch_bit_for_bit(dtype, B, T, n_q, n_kv, D):
    """Same e4m3 bytes, same scales: the kernel divides as IEEE does (div_rn) and rounds to nearest even."""
    qkv, cos, sin, positions, slots, _ = rope_inputs(B, T, n_q, n_kv, D, 64, dtype)
    caches = [kv_fp8.zeros((B + 1, n_kv, 64, D), torch.device("cuda")) for _ in range(2)]
    scales = [torch.ones(B + 1, n_kv, 64, device="cuda") for _ in range(2)]
    ref_caches = [c.view(torch.uint8).clone().view(c.dtype) for c in caches]
    ref_scales = [s.clone() for s in scales]
    q_ref = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, *ref_caches, *ref_scales)
    q = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, *caches, *scales)
    assert torch.equal(q, q_ref)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches, ref_caches))
    assert all(torch.equal(a, b) for a, b in zip(scales, ref_scales))
    assert any(c.view(torch.uint8).any() for c in caches)  # something was written


def decode_step(lengths: list[int], ctx: int):
    """Slots and the fields of the model's StepInputs the attention kernels read, for one query token per
    sequence at these lengths."""
    B = len(lengths)
    slots = torch.arange(B, device="cuda").flip(0) + 1
    positions = torch.tensor(lengths, device="cuda").view(B, 1) - 1
    visible = torch.arange(ctx, device="cuda").view(1, 1, ctx) <= positions.unsqueeze(-1)
    return slots, SimpleNamespace(span=ctx, lengths=positions[:, -1] + 1, visible=visible.unsqueeze(1))


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(32, 8, 128), (8, 1, 128), (3, 3, 64), (9, 3, 64)])
@pytest.mark.parametrize("ctx,lengths", [(300, [1, 2, 300]), (2048, [255, 256, 257, 1999]),
                                         (8192, [64, 4097, 8192])])
def test_decode_attention_kernel_matches_torch(dtype, n_q, n_kv, D, ctx, lengths):
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q)
    k, v = (torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    slots, step = decode_step(lengths, ctx)
    got = attention.cached_attention(q, k, v, slots, step)
    want = attention.cached_attention_torch(q, k, v, slots, step)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(32, 8, 128), (8, 1, 128), (9, 3, 64)])
@pytest.mark.parametrize("ctx,lengths", [(300, [1, 2, 300]), (2048, [255, 256, 257, 1999])])
def test_decode_attention_kernel_reads_the_fp8_cache_as_torch_does(dtype, n_q, n_kv, D, ctx, lengths):
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q)
    caches, scales = [], []
    for _ in range(2):  # rows of very different magnitudes, so that the scales matter
        rows = torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g)
        rows *= torch.randn(B + 2, n_kv, ctx, 1, device="cuda", generator=g).exp()
        caches.append(kv_fp8.zeros(rows.shape, torch.device("cuda")))
        scales.append(torch.ones(rows.shape[:-1], device="cuda"))
        kv_fp8.write(caches[-1], scales[-1], (slice(None),), rows.to(dtype))
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    slots, step = decode_step(lengths, ctx)
    got = attention.cached_attention(q, *caches, slots, step, *scales)
    want = attention.cached_attention_torch(q, *caches, slots, step, *scales)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_tokens_with_triton_kernels_equal_the_torch_path(monkeypatch):
    fused = generate(True, "hoststaged")  # float32: RoPE and cache bit-exact, attention within float32 rounding
    monkeypatch.setattr(dispatch, "_enabled", False)  # what set_triton(False) does, undone after the test
    assert generate(False, "hoststaged") == fused


@needs_fp8
def test_fp8_cache_tokens_with_triton_kernels_equal_the_torch_path(monkeypatch):
    """Decode replayed from CUDA graphs with the FP8 cache: the Triton kernels' tokens are the torch versions'."""
    fused = generate(True, "hoststaged", kv_dtype="fp8")  # the cache bit-exact, attention within float32 rounding
    monkeypatch.setattr(dispatch, "_enabled", False)
    assert generate(True, "hoststaged", kv_dtype="fp8") == fused
