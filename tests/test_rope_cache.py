"""raytp.kernels.rope_cache on CPU: with q_norm and k_norm (Qwen3) the torch version equals RMSNorm of each query and
key head followed by the RoPE and cache write without them, bit for bit; and the Triton kernel under Triton's CPU
interpreter (TRITON_INTERPRET=1, read when a kernel is defined, hence a process of its own) against the torch version,
with and without the norms, over model-dtype and FP8 caches (tests/gpu/test_attention_kernels.py checks it on a GPU,
bfloat16 included)."""

import importlib.util

import pytest
import torch

from raytp.kernels import kv_fp8, rope_cache
from raytp.kernels.norm import rms_norm_torch


def rope_inputs(B, T, n_q, n_kv, D, ctx, dtype, fp8, g):
    """qkv rows of quarters in [-2, 2], whose float32 sums of squares are exact in any order (a row's norm does not
    depend on the order torch, numpy or a GPU adds them in), RoPE at every row's position, random norm weights, and a
    cache: one layer's model-dtype keys and values, or e4m3 ones with their float32 scales."""
    qkv = (torch.randint(-8, 9, (B, T, (n_q + 2 * n_kv) * D), generator=g) / 4).to(dtype)
    positions = torch.stack([torch.arange(T) + 17 * b for b in range(B)])
    slots = torch.randperm(B + 1, generator=g)[:B]
    angles = torch.rand(ctx, D // 2, generator=g) * 100
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos()[positions].to(dtype), angles.sin()[positions].to(dtype)
    norms = [(torch.rand(D, generator=g) + 0.5).to(dtype) for _ in range(2)]
    if fp8:
        cache = [kv_fp8.zeros((B + 1, n_kv, ctx, D), torch.device("cpu")) for _ in range(2)]
        cache += [torch.ones(B + 1, n_kv, ctx) for _ in range(2)]
    else:
        cache = [torch.randn(B + 1, n_kv, ctx, D, generator=g).to(dtype) for _ in range(2)]
    return qkv, cos, sin, positions, slots, norms, cache

SHAPES = [(1, 1, 32, 8, 128), (2, 7, 3, 1, 64), (3, 1, 2, 2, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("B,T,n_q,n_kv,D", SHAPES + [(2, 3, 4, 2, 80)])
def test_qk_norms_in_the_torch_version_equal_rms_norm_per_head_then_rope(dtype, fp8, B, T, n_q, n_kv, D):
    """What raytp.model.llama did before the norms moved into the RoPE call: each query and key head normalized,
    the heads concatenated with the values, then RoPE. Random rows, not quarters: both sum the same way."""
    g = torch.Generator().manual_seed(B * T + D)
    qkv, cos, sin, positions, slots, (q_norm, k_norm), cache = rope_inputs(B, T, n_q, n_kv, D, 64, dtype, fp8, g)
    qkv = (torch.randn(qkv.shape, generator=g) * 3).to(dtype)
    ref = [t.clone() for t in cache]
    q, k, v = qkv.view(B, T, -1, D).split([n_q, n_kv, n_kv], dim=2)
    normed = torch.cat((rms_norm_torch(q, q_norm, 1e-6), rms_norm_torch(k, k_norm, 1e-6), v), dim=2)
    want = rope_cache.rope_and_cache_torch(normed.view(B, T, -1), n_q, n_kv, cos, sin, positions, slots, *ref)
    got = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, *cache, q_norm=q_norm,
                                    k_norm=k_norm, eps=1e-6)
    assert torch.equal(got, want)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(cache, ref))


INTERPRETED = """
import torch

from raytp.kernels import rope_cache
from tests.test_rope_cache import SHAPES, rope_inputs

# the dispatch asks for CUDA tensors; the interpreter runs the kernel on CPU ones
rope_cache.use_triton = rope_cache.use_triton_fp8_kv = lambda t: True
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for fp8 in (False, True):
        for norm in (False, True):
            for B, T, n_q, n_kv, D in SHAPES:
                qkv, cos, sin, positions, slots, (q_norm, k_norm), cache = rope_inputs(B, T, n_q, n_kv, D, 64, dtype,
                                                                                       fp8, g)
                norms = dict(q_norm=q_norm, k_norm=k_norm, eps=1e-6) if norm else {}
                ref = [t.clone() for t in cache]
                want = rope_cache.rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, *ref, **norms)
                got = rope_cache.rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, *cache, **norms)
                case = (dtype, fp8, norm, B, T, n_q, n_kv, D)
                assert torch.equal(got, want), case
                # FP8: the scales (each rotated key row's amax, each value row's) only; the interpreter's e4m3
                # rounding is not a GPU's (half-way cases go up, a carry into the exponent is lost)
                kept = cache[2:] if fp8 else cache
                assert all(torch.equal(a, b) for a, b in zip(kept, ref[-len(kept):])), case
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.triton_interpreter(INTERPRETED)
def test_rope_cache_kernel_equals_the_torch_version_in_the_interpreter(interpreted):
    """float32 and float16: the interpreter rounds to bfloat16 by truncation, unlike a GPU and torch."""
    printed, error = interpreted
    assert not error and printed.strip() == "equal", error[-3000:]
