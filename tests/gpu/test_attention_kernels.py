"""The fused RoPE + cache write (Qwen3's q_norm and k_norm included) and the decode attention kernels against their
torch versions, over model-dtype and FP8 caches, and a whole model's tokens with every Triton kernel on against all
of them off, and the FP8 KV cache's tokens in CUDA graphs against eager steps, with its torch and its Triton paths
(GPU host only)."""

from types import SimpleNamespace

import pytest
import torch

from raytp.kernels import attention, dispatch, kv_fp8, rope_cache
from raytp.kernels.dispatch import triton
from tests import test_rope_cache
from tests.gpu.test_graphed_decode import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                                 reason="needs CUDA and Triton")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or
                               torch.cuda.get_device_capability() < dispatch.FP8_CAPABILITY,
                               reason="the FP8 KV cache's Triton paths need compute capability 8.9+")


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
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=needs_fp8)], ids=["cache", "fp8_cache"])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", [(1, 1, 32, 8, 128), (4, 1, 8, 2, 128), (2, 7, 3, 1, 64)])
def test_rope_and_cache_kernel_with_qk_norms_equals_torch_up_to_the_rsqrt(monkeypatch, dtype, fp8, B, T, n_q, n_kv, D):
    """q_norm and k_norm (Qwen3) in the kernel against rms_norm_torch and then RoPE, on rows whose sums of squares are
    exact in any order (tests.test_rope_cache.rope_inputs), so that only the rsqrt can differ: Triton's and torch's
    disagree in the last bit for some inputs on an H200 (2026-12-05: the cache rows of the first shape), so queries
    and keys match within one rounding of it and values bit for bit. The reference runs with Triton off, rms_norm would
    run its own kernel."""
    g = torch.Generator().manual_seed(B * T + n_q)
    qkv, cos, sin, positions, slots, norms, cache = test_rope_cache.rope_inputs(B, T, n_q, n_kv, D, 64, dtype, fp8, g)
    qkv, cos, sin, positions, slots = (t.cuda() for t in (qkv, cos, sin, positions, slots))
    (q_norm, k_norm), cache = [t.cuda() for t in norms], [t.cuda() for t in cache]
    ref = [t.clone() for t in cache]
    with monkeypatch.context() as m:
        m.setattr(dispatch, "_enabled", False)
        q_ref = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, *ref, q_norm=q_norm,
                                                k_norm=k_norm, eps=1e-6)
    q = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, *cache, q_norm=q_norm, k_norm=k_norm,
                                  eps=1e-6)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)  # ~one rounding
    torch.testing.assert_close(q, q_ref, **tol)
    if fp8:  # the keys as e4m3 bytes with their scales: compare what they hold
        (k, v, k_scale, v_scale), (k_r, v_r, k_scale_r, v_scale_r) = cache, ref
        torch.testing.assert_close(k.float() * k_scale[..., None], k_r.float() * k_scale_r[..., None],
                                   rtol=0.13, atol=1e-2)  # one e4m3 step where a rounding tips it
        assert torch.equal(v.view(torch.uint8), v_r.view(torch.uint8)) and torch.equal(v_scale, v_scale_r)
    else:
        (k, v), (k_r, v_r) = cache, ref
        torch.testing.assert_close(k, k_r, **tol)
        assert torch.equal(v, v_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", [(1, 1, 32, 8, 128), (2, 7, 3, 1, 64)])
def test_rope_and_cache_kernel_with_qk_norms_on_random_rows_matches_torch(monkeypatch, dtype, B, T, n_q, n_kv, D):
    """Random rows: the kernel adds a row's squares in another order than torch, so a row whose float32 sum rounds
    otherwise can differ in its last bits."""
    qkv, cos, sin, positions, slots, (k, v) = rope_inputs(B, T, n_q, n_kv, D, 64, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    q_norm, k_norm = ((torch.rand(D, device="cuda", generator=g) + 0.5).to(dtype) for _ in range(2))
    k_ref, v_ref = k.clone(), v.clone()
    with monkeypatch.context() as m:
        m.setattr(dispatch, "_enabled", False)
        q_ref = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, k_ref, v_ref,
                                                q_norm=q_norm, k_norm=k_norm, eps=1e-6)
    q = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, k, v, q_norm=q_norm, k_norm=k_norm,
                                  eps=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, v_ref)


def decode_step(ctx: int, lengths: list[int]) -> SimpleNamespace:
    """The fields of a full-attention layer's view of a step (raytp.model.attention.FullView) the kernels read, for
    one query token per sequence that sees `lengths` positions of a `ctx`-position cache."""
    positions = torch.tensor(lengths, device="cuda").view(len(lengths), 1) - 1
    return SimpleNamespace(span=ctx, lengths=positions[:, -1] + 1,
                           visible=(torch.arange(ctx, device="cuda").view(1, 1, ctx) <= positions.unsqueeze(-1)).unsqueeze(1))


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
    step = decode_step(ctx, lengths)
    got = attention.cached_attention(q, k, v, slots, step)
    want = attention.cached_attention_torch(q, k, v, slots, step)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(64, 8, 64), (9, 3, 64)])
@pytest.mark.parametrize("ctx,lengths", [(300, [1, 2, 300]), (8192, [64, 4097, 8192])])
def test_decode_attention_kernel_with_sinks_matches_torch(dtype, n_q, n_kv, D, ctx, lengths):
    """gpt-oss's sinks (a logit per head in the denominator), some larger than every score of their head."""
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q)
    k, v = (torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    sinks = (torch.randn(n_q, device="cuda", generator=g) * 4).to(dtype)
    slots = torch.arange(B, device="cuda").flip(0) + 1
    step = decode_step(ctx, lengths)
    got = attention.cached_attention(q, k, v, slots, step, sinks=sinks)
    want = attention.cached_attention_torch(q, k, v, slots, step, sinks=sinks)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def fp8_cache(B, n_kv, ctx, D):
    """An FP8 cache's values and scales, made as the model makes them (raytp.model.llama)."""
    return (kv_fp8.zeros((B, n_kv, ctx, D), torch.device("cuda")),
            torch.ones((B, n_kv, ctx), dtype=torch.float32, device="cuda"))


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", [(1, 1, 32, 8, 128), (8, 1, 8, 2, 128), (2, 7, 3, 1, 64), (3, 1, 2, 2, 64)])
def test_rope_and_fp8_cache_kernel_equals_torch_bit_for_bit(dtype, B, T, n_q, n_kv, D):
    """e4m3 values and float32 scales of every written row, the largest, the subnormal and the all-zero rows
    included, equal kv_fp8.quantize's bit for bit, up to the sign of a zero: in float16 the RoPE kernel and torch can
    round a rotated element that underflows to zeros of opposite signs (the model-dtype kernel does too; the values
    are equal), and e4m3 keeps that sign. Every other e4m3 value has one encoding, so equal values are equal bytes."""
    qkv, cos, sin, positions, slots, _ = rope_inputs(B, T, n_q, n_kv, D, 128, dtype)  # batch 8 reaches position 119
    # rows of very different ranges (e4m3's subnormals at the small end), one value row of zeros (scale 1)
    g = torch.Generator(device="cuda").manual_seed(1)
    qkv = (qkv.float() * torch.rand(qkv.shape, device="cuda", generator=g).pow(8) * 100).to(dtype)
    qkv.view(B, T, -1, D)[0, 0, n_q + n_kv] = 0
    (k, k_scale), (v, v_scale) = fp8_cache(B + 1, n_kv, 128, D), fp8_cache(B + 1, n_kv, 128, D)
    ref = [t.clone() for t in (k, v, k_scale, v_scale)]
    q_ref = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, *ref)
    q = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, k, v, k_scale, v_scale)
    assert torch.equal(q, q_ref)
    assert torch.equal(k.float(), ref[0].float()) and torch.equal(v.float(), ref[1].float())
    if dtype != torch.float16:
        assert torch.equal(k.view(torch.uint8), ref[0].view(torch.uint8))
        assert torch.equal(v.view(torch.uint8), ref[1].view(torch.uint8))
    assert torch.equal(k_scale, ref[2]) and torch.equal(v_scale, ref[3])
    assert v_scale[slots[0], 0, positions[0, 0]] == 1  # the all-zero row


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(32, 8, 128), (8, 1, 64), (3, 3, 64)])
@pytest.mark.parametrize("ctx,lengths", [(300, [17]), (2048, [1, 17, 255, 256, 257, 1024, 1999, 2048]),
                                         (8192, [8192]), (8192, [1, 64, 4097, 8192, 17, 513, 8000, 3])])
def test_decode_attention_kernel_over_fp8_cache_matches_torch(dtype, n_q, n_kv, D, ctx, lengths):
    """Batch 1 and 8, lengths on both sides of the split boundaries (256 positions each up to 8192)."""
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q + B)
    (k, k_scale), (v, v_scale) = fp8_cache(B + 2, n_kv, ctx, D), fp8_cache(B + 2, n_kv, ctx, D)
    for cache, scales in ((k, k_scale), (v, v_scale)):
        rows = torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g)
        rows *= 0.5 + torch.rand(B + 2, n_kv, ctx, 1, device="cuda", generator=g) / 2  # rows of different scales
        kv_fp8.write(cache, scales, (slice(None),), rows.to(dtype))
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    slots = torch.randperm(B + 2, device="cuda", generator=g)[:B]
    step = decode_step(ctx, lengths)
    got = attention.cached_attention(q, k, v, slots, step, k_scale, v_scale)
    want = attention.cached_attention_torch(q, k, v, slots, step, k_scale, v_scale)
    # float32: e4m3 values are exact in float32, so only the order of roundings differs; bfloat16: the torch
    # version rounds each dequantized element to bfloat16, the kernel applies the scale in float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_tokens_with_triton_kernels_equal_the_torch_path(monkeypatch):
    fused = generate(True, "hoststaged")  # float32: RoPE and cache bit-exact, attention within float32 rounding
    monkeypatch.setattr(dispatch, "_enabled", False)  # what set_triton(False) does, undone after the test
    assert generate(False, "hoststaged") == fused


@pytest.mark.parametrize("fp8_kernels", [False, pytest.param(True, marks=needs_fp8)], ids=["torch", "triton"])
def test_fp8_cache_tokens_in_cuda_graphs_equal_eager_steps(monkeypatch, fp8_kernels):
    """The FP8 cache, written and read by torch code or by the Triton kernels, replayed from CUDA graphs gives the
    eager steps' tokens."""
    if not fp8_kernels:  # the torch code, as --no-triton or a GPU before compute capability 8.9 runs it
        monkeypatch.setattr(attention, "use_triton_fp8_kv", lambda t: False)
        monkeypatch.setattr(rope_cache, "use_triton_fp8_kv", lambda t: False)
    assert generate(True, "hoststaged", kv_dtype="fp8") == generate(False, "hoststaged", kv_dtype="fp8")


@needs_fp8
def test_fp8_cache_tokens_with_triton_kernels_equal_the_torch_path(monkeypatch):
    """float32: the write is bit-exact, the attention within float32 rounding, so greedy and sampled tokens agree."""
    fused = generate(True, "hoststaged", kv_dtype="fp8")
    monkeypatch.setattr(attention, "use_triton_fp8_kv", lambda t: False)  # the torch code for the FP8 cache only
    monkeypatch.setattr(rope_cache, "use_triton_fp8_kv", lambda t: False)
    assert generate(True, "hoststaged", kv_dtype="fp8") == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,D", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("ctx,last,queries", [(300, [2, 150, 299], 3), (8192, [64, 4097, 8191], 5)])
def test_verify_attention_kernel_matches_torch(monkeypatch, dtype, n_q, n_kv, D, ctx, last, queries):
    """A verify step's queries (speculative decoding): each sequence's last token and its draft, the first row's
    draft padded with copies of its last position; each query sees the positions up to its own."""
    monkeypatch.setattr(attention, "TRITON_VERIFY", True)
    B = len(last)
    g = torch.Generator(device="cuda").manual_seed(ctx + n_q)
    k, v = (torch.randn(B + 2, n_kv, ctx, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, n_q, queries, D, device="cuda", generator=g).to(dtype)
    slots = torch.arange(B, device="cuda").flip(0) + 1
    positions = torch.tensor(last, device="cuda").view(B, 1) - torch.arange(queries - 1, -1, -1, device="cuda")
    positions[0] = positions[0].clamp(max=int(positions[0, 1]))  # a shorter draft, padded
    step = SimpleNamespace(span=ctx, lengths=positions[:, -1] + 1, limits=positions + 1,
                           visible=(torch.arange(ctx, device="cuda").view(1, 1, ctx) <= positions.unsqueeze(-1)
                                    ).unsqueeze(1))
    got = attention.cached_attention(q, k, v, slots, step)
    want = attention.cached_attention_torch(q, k, v, slots, step)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
