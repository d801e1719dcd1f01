"""The decode kernel's repacking (raytp.kernels.packed_gemv) on CPU: every layout it makes holds exactly the weight
it was made from. The reference is the IntWeight dequantization (raytp.kernels.dequant_matmul.dequantize), itself
checked per element against the format's contract in tests/test_quant_kernels.py; the kernel itself is checked
against this on a GPU (tests/gpu/test_packed_gemv.py)."""

import importlib.util

import pytest
import torch

from raytp.kernels import packed_gemv as pg
from raytp.kernels.dequant_matmul import dequantize
from tests.test_quant_kernels import random_int_weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,cols,group_size,group_start,act_order", [
    (64, 256, 64, 0, False), (100, 320, 64, 40, False), (70, 200, 200, 0, False), (130, 1600, 50, 2, False),
    (96, 512, 128, 0, True), (33, 96, 32, 0, True)])
@pytest.mark.parametrize("sym", [True, False])
def test_int_layouts_hold_the_weight(bits, out, cols, group_size, group_start, act_order, sym):
    packed, scales, zeros, g_idx = random_int_weight(out, cols, bits, group_size, group_start, sym, act_order,
                                                     torch.float32)
    dense = dequantize(packed, scales, zeros, bits=bits, group_size=group_size, group_start=group_start, g_idx=g_idx)
    w = pg.pack_int(packed, scales, zeros, bits=bits, group_size=group_size, group_start=group_start, g_idx=g_idx)
    kp, np_ = w.padded
    assert kp % 32 == 0 and np_ % 64 == 0 and np_ - out < 64
    # every input appears once in physical order; the rest is padding
    if w.x_index is not None:
        real = w.x_index[w.x_index >= 0].long()
        assert torch.equal(real.sort().values, torch.arange(cols))
    x = torch.randn(3, cols, dtype=torch.float64)
    torch.testing.assert_close(pg.mma_linear_torch(x, w), x @ dense.double().T, rtol=1e-9, atol=1e-9)
    # the physical weight, read back through the inputs it multiplies, is the dense weight exactly
    back = pg.dequantize_mma(w, torch.float64)
    cols_of = w.x_index.long() if w.x_index is not None else torch.arange(kp)
    real = (cols_of >= 0) & (cols_of < cols)
    torch.testing.assert_close(back[real], dense.double().T[cols_of[real]], rtol=0, atol=0)
    assert not back[~real].any()  # padding multiplies nothing


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
def test_tiles_round_trip(kind):
    bits = 4 if kind == "int4" else 8
    values = torch.randint(0, 1 << bits, (96, 192), dtype=torch.int32)
    tiled = pg._tile_words(values, pg.KINDS[kind])
    assert tiled.shape == (3, 3, 32, 8 if kind == "int4" else 16)
    w = pg.MMAPacked(tiled, torch.ones(1, 192), None, pg.KINDS[kind], 3, 96, 192, None)
    assert torch.equal(pg._untile(w), values)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_layout_holds_the_weight(per_tensor):
    weight = (torch.randn(70, 200) * 0.3).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.7) if per_tensor else torch.rand(70, 1) + 0.5
    w = pg.pack_fp8(weight, scale, torch.float32)
    dense = weight.float() * scale
    torch.testing.assert_close(pg.dequantize_mma(w, torch.float32)[:200], dense.T, rtol=0, atol=0)
    x = torch.randn(2, 200)
    torch.testing.assert_close(pg.mma_linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size,k_in", [(128, 384), (32, 200), (64, 300)])
def test_fp8_layout_holds_block_scaled_weights(group_size, k_in):
    """Fine-grained FP8 (one scale per row and group of inputs, as FP8Weight holds Qwen's block scales): groups of
    whole 32-input tiles, the last one partial where the inputs stop mid-group."""
    from raytp.model.formats import FP8Weight

    weight = (torch.randn(70, k_in) * 0.3).to(torch.float8_e4m3fn)
    scale = torch.rand(70, -(-k_in // group_size)) + 0.5
    held = FP8Weight(weight, scale, group_size=group_size)
    assert pg.fp8_packs(group_size) and not pg.fp8_packs(group_size, group_start=16) and not pg.fp8_packs(48)
    w = pg.pack_fp8(weight, scale, torch.float32, group_size)
    torch.testing.assert_close(pg.dequantize_mma(w, torch.float32)[:k_in], held.dequantize().T, rtol=0, atol=0)
    x = torch.randn(2, k_in)
    torch.testing.assert_close(pg.mma_linear(x, w), held.apply(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_out,k_tiles", [(28672, 128), (4096, 448), (4096, 32), (1536, 128), (100, 1)])
def test_launches_cover_every_input_tile(n_out, k_tiles):
    launch = pg.launch_for(n_out, k_tiles, 132)
    assert launch.warps in (4, 8) and launch.split >= 1
    per_split = -(-k_tiles // launch.split)
    assert per_split * launch.split >= k_tiles


INTERPRETED_DEQUANT = r"""
import sys, torch
from raytp.kernels import packed_gemv as pg
from raytp.kernels.packed_dequant import dequantize_tiles
from tests.test_quant_kernels import random_int_weight
cases = [(4, 128, True, False, 0, torch.float32), (4, 64, False, False, 40, torch.float16),
         (8, 32, True, True, 0, torch.float32), (8, 128, False, False, 0, torch.float16)]
for bits, group_size, sym, act_order, start, dtype in cases:
    packed, scales, zeros, g_idx = random_int_weight(70, 256, bits, group_size, start, sym, act_order, dtype)
    w = pg.pack_int(packed, scales, zeros, bits=bits, group_size=group_size, group_start=start, g_idx=g_idx)
    got = dequantize_tiles(w.values, w.scales, w.zeros, w.kind, w.group_tiles, w.out_features, dtype)
    assert torch.equal(got, pg.dequantize_mma(w, dtype)), (bits, group_size, sym, act_order, dtype)
codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
weight = codes[~codes.float().isnan()].repeat(70, 2)[:, :300].contiguous()  # every code, subnormals included
w = pg.pack_fp8(weight, torch.rand(70, 1) + 0.5, torch.float32)
got = dequantize_tiles(w.values, w.scales, w.zeros, w.kind, w.group_tiles, w.out_features, torch.float32)
assert torch.equal(got, pg.dequantize_mma(w, torch.float32))
w = pg.pack_fp8(weight, torch.rand(70, 3) + 0.5, torch.float32, group_size=128)  # block scales: a group per 128
got = dequantize_tiles(w.values, w.scales, w.zeros, w.kind, w.group_tiles, w.out_features, torch.float32)
assert torch.equal(got, pg.dequantize_mma(w, torch.float32))
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.triton_interpreter(INTERPRETED_DEQUANT)
def test_triton_prefill_dequantization_equals_the_torch_one_in_the_interpreter(interpreted):
    """raytp.kernels.packed_dequant under Triton's CPU interpreter (TRITON_INTERPRET=1, read when the kernel is
    defined, hence a process of its own) against dequantize_mma, bit for bit: the tile's index arithmetic for every
    kind, zero points, act-order and a slice starting mid-group. float32 and float16 outputs: the interpreter rounds
    to bfloat16 otherwise than a GPU (tests/gpu/test_packed_gemv.py checks bfloat16 there)."""
    printed, error = interpreted
    assert not error and printed.strip() == "equal", error[-3000:]
