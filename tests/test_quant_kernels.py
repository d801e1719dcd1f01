"""The quantized matmuls' torch fallbacks (what CPU ranks run) against the dequantization written out per element.

The reference below follows the IntWeight contract (HELPERS.md, and the formula checked against transformers'
compressed-tensors decompression in the project notes) one input column at a time with numpy's unsigned
integers, sharing no code with raytp.kernels.dequant_matmul.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytp.kernels.dequant_matmul import dequantize, int_linear
from raytp.kernels.fp8_matmul import fp8_linear


def reference_dequant(packed, scales, zeros, bits, group_size, group_start, g_idx):
    words = packed.numpy().view(np.uint32)
    per = 32 // bits
    cols = []
    for j in range(words.shape[1] * per):
        q = (words[:, j // per] >> np.uint32(bits * (j % per))) & np.uint32((1 << bits) - 1)
        g = int(g_idx[j]) if g_idx is not None else (j + group_start) // group_size
        zero = zeros[:, g].double() if zeros is not None else 2 ** (bits - 1)
        cols.append((torch.from_numpy(q.astype(np.float64)) - zero) * scales[:, g].double())
    return torch.stack(cols, 1)


def random_int_weight(out, cols, bits, group_size, group_start, sym, act_order, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = (cols + group_start + group_size - 1) // group_size
    packed = torch.randint(-2 ** 31, 2 ** 31, (out, cols * bits // 32), generator=g, dtype=torch.int64).int()
    scales = (torch.rand(out, n_groups, generator=g) * 0.02 + 0.001).to(dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (out, n_groups), generator=g).to(dtype)
    g_idx = torch.randint(0, n_groups, (cols,), generator=g).int() if act_order else None
    return packed, scales, zeros, g_idx


# 200 columns in groups of 64 from offset 40: 5 groups, the first and last partial; 3 groups of 32 exactly.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols,group_size,group_start", [(200, 64, 40), (96, 32, 0), (128, 128, 0), (64, 64, 16)])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_matches_the_contract_per_element(bits, cols, group_size, group_start, sym):
    packed, scales, zeros, _ = random_int_weight(7, cols, bits, group_size, group_start, sym, False, torch.float32)
    ours = dequantize(packed, scales, zeros, bits=bits, group_size=group_size, group_start=group_start)
    ref = reference_dequant(packed, scales, zeros, bits, group_size, group_start, None)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_group_index_overrides_contiguous_groups(bits):
    packed, scales, zeros, g_idx = random_int_weight(5, 96, bits, 32, 0, False, True, torch.float32)
    ours = dequantize(packed, scales, zeros, bits=bits, group_size=32, g_idx=g_idx)
    torch.testing.assert_close(ours.double(), reference_dequant(packed, scales, zeros, bits, 32, 0, g_idx),
                               rtol=1e-6, atol=0)
    assert not torch.equal(ours, dequantize(packed, scales, zeros, bits=bits, group_size=32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_linear_fallback_is_dequantize_then_matmul(dtype):
    packed, scales, zeros, _ = random_int_weight(24, 200, 4, 64, 40, False, False, dtype)
    x = torch.randn(3, 2, 200).to(dtype)
    w = reference_dequant(packed, scales, zeros, 4, 64, 40, None)
    y = int_linear(x, packed, scales, zeros, bits=4, group_size=64, group_start=40)
    assert y.shape == (3, 2, 24) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y, F.linear(x.double(), w).to(dtype), **tol)


def test_fp8_linear_fallback_scales_each_output_row():
    weight = torch.randn(6, 32).to(torch.float8_e4m3fn)
    x = torch.randn(2, 32)
    per_row = torch.rand(6, 1) + 0.5
    # float8 -> float64 is exact; per-row scale i multiplies output i
    expected = (x.double() @ weight.double().T) * per_row.double().T
    torch.testing.assert_close(fp8_linear(x, weight, per_row), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8_linear(x, weight, torch.tensor(0.5)), (x.double() @ weight.double().T * 0.5).float(),
                               rtol=1e-5, atol=1e-5)
