"""The decode kernel's repacking (raytp.kernels.packed_gemv) on CPU: every layout it makes holds exactly the weight
it was made from. The reference is the IntWeight dequantization (raytp.kernels.dequant_matmul.dequantize), itself
checked per element against the format's contract in tests/test_quant_kernels.py; the kernel itself is checked
against this on a GPU (tests/gpu/test_packed_gemv.py)."""

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
    tiled = pg._tile_words(values, kind)
    assert tiled.shape == (3, 3, 32, 8 if kind == "int4" else 16)
    w = pg.MMAPacked(tiled, torch.ones(1, 192), None, kind, 3, 96, 192, None)
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


@pytest.mark.parametrize("n_out,k_tiles", [(28672, 128), (4096, 448), (4096, 32), (1536, 128), (100, 1)])
def test_launches_cover_every_input_tile(n_out, k_tiles):
    launch = pg.launch_for(n_out, k_tiles, 132)
    assert launch.warps in (4, 8) and launch.split >= 1
    per_split = -(-k_tiles // launch.split)
    assert per_split * launch.split >= k_tiles
