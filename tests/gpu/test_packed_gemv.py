"""The packed decode GEMV (raytp.kernels.packed_gemv) against the dequantize-then-matmul path of the layout it was
packed from (raytp.kernels.dequant_matmul.dequantize, itself checked per element in tests/test_quant_kernels.py):
every shape class, 1-16 rows, group sizes, zero points, act-order, mid-group slices, eager and in CUDA graphs."""

import pytest
import torch
import torch.nn.functional as F

from raytp.kernels import dequant_matmul as dm
from raytp.kernels import packed_gemv as pg
from tests.test_quant_kernels import random_int_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def int_case(out, cols, bits, group_size, group_start=0, sym=True, act_order=False, dtype=torch.bfloat16):
    packed, scales, zeros, g_idx = random_int_weight(out, cols, bits, group_size, group_start, sym, act_order, dtype)
    packed, scales = packed.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    g_idx = g_idx.cuda() if g_idx is not None else None
    dense = dm.dequantize(packed, scales, zeros, bits=bits, group_size=group_size, group_start=group_start,
                          g_idx=g_idx)
    return pg.pack_int(packed, scales, zeros, bits=bits, group_size=group_size, group_start=group_start,
                       g_idx=g_idx), dense


def assert_matches(y, x, dense):
    ref = (x.double() @ dense.double().T)
    # the reference's weights are exact; the kernel sums in float32 (ieee for float32 x) and rounds y once
    # bf16/fp16 y is rounded once (2**-8 of its size); the kernel sums in float32 in another order than the reference
    scale = ref.abs().max().item()
    tol = dict(rtol=1e-4, atol=1e-4 * scale) if x.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2 * scale)
    torch.testing.assert_close(y.double(), ref, **tol)


SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336), (4096, 1024), (1536, 4096), (1000, 4096)]


@pytest.mark.parametrize("out,cols", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_int_kernel_every_shape_class(out, cols, bits, rows):
    w, dense = int_case(out, cols, bits, 128)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, w), x, dense)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
def test_int_kernel_groups_and_zero_points(group_size, sym, rows):
    w, dense = int_case(2048, 4096, 4, group_size, sym=sym)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, w), x, dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(group_start=40, group_size=64), dict(act_order=True, group_size=128),
                                  dict(group_size=1600), dict(group_size=56, group_start=8),
                                  dict(act_order=True, group_size=32, bits=8)])
def test_int_kernel_mid_group_slices_act_order_and_dtypes(dtype, case):
    case = dict(bits=4) | case
    w, dense = int_case(300, 1600, sym=False, dtype=dtype, **case)
    for rows in (1, 3, 16):
        x = torch.randn(rows, 1600, device="cuda", dtype=dtype)
        assert_matches(pg.mma_linear(x, w), x, dense.to(dtype))


@pytest.mark.parametrize("launch", [pg.Launch(4, 1), pg.Launch(8, 16), pg.Launch(4, 3), pg.Launch(8, 5),
                                    pg.Launch(1, 64), pg.Launch(8, 2, 4), pg.Launch(4, 3, 2, scaled=True),
                                    pg.Launch(8, 1, 3, scaled=True), pg.Launch(8, 2, 2, scaled=True, min_blocks=3),
                                    pg.Launch(8, 4, 3, min_blocks=2)])
def test_every_launch_shape_gives_the_same_product(launch):
    """The benchmark's sweep tries these; ragged last slices included, every kind and zero points."""
    for bits, sym in ((4, True), (4, False), (8, True)):
        w, dense = int_case(4096, 14336, bits, 128, sym=sym)
        for rows in (1, 8, 11):
            x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
            assert_matches(pg.mma_linear(x, w, launch), x, dense)
    weight = (torch.randn(1000, 4096, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(1000, 1, device="cuda") + 0.5
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, pg.pack_fp8(weight, scale), launch), x, weight.float() * scale.bfloat16().float())


def test_split_k_is_deterministic_and_graph_replays_equal_eager():
    """The last program of each output block sums the slices in slice order: the same bits on every call, eager
    or replayed, and the counters are reset for the next call."""
    w, dense = int_case(4096, 14336, 4, 128, sym=False)
    pg.reserve(w)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    first = pg.mma_linear(x, w)
    assert pg.launch_for(4096, w.values.shape[1], pg.sm_count(0)).split > 1  # the path under test
    for _ in range(20):
        assert torch.equal(pg.mma_linear(x, w), first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pg.mma_linear(x, w)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, first)
    assert_matches(first, x, dense)


@pytest.mark.parametrize("out,cols", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_kernel(out, cols, rows, per_tensor):
    weight = (torch.randn(out, cols, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = (torch.rand(()) + 0.5 if per_tensor else torch.rand(out, 1) + 0.5).cuda()
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, pg.pack_fp8(weight, scale)), x, weight.float() * scale.to(x.dtype).float())


@pytest.mark.parametrize("out,cols", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_fp8_kernel_with_block_scales(out, cols, rows):
    """Fine-grained FP8 (Qwen3-*-FP8): one scale per row and 128 inputs, as FP8Weight holds them."""
    weight = (torch.randn(out, cols, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(out, -(-cols // 128), device="cuda") * 0.01 + 0.001
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    per_column = scale.to(x.dtype).float().repeat_interleave(128, dim=1)[:, :cols]
    assert_matches(pg.mma_linear(x, pg.pack_fp8(weight, scale, group_size=128)), x, weight.float() * per_column)


@pytest.mark.parametrize("launch", [None, pg.Launch(8, 1, 2, scaled=True)])
def test_fp16_models(launch):
    for bits in (4, 8):
        w, dense = int_case(2048, 4096, bits, 128, sym=False, dtype=torch.float16)
        x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
        assert_matches(pg.mma_linear(x, w, launch), x, dense)
    weight = (torch.randn(512, 1024, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(512, 1, device="cuda") + 0.5
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    assert_matches(pg.mma_linear(x, pg.pack_fp8(weight, scale, torch.float16), launch), x,
                   weight.float() * scale.half().float())


@pytest.mark.parametrize("launch", [None, pg.Launch(8, 1, 2, scaled=True)])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -9])
def test_fp8_every_code_including_subnormals(launch, scale):
    """Each e4m3 code times a power-of-two scale is exact in bf16, so the product must be too (the scaled launch
    folds the scale into the rescaling multiplier: products that land among bf16's subnormals included)."""
    codes = torch.arange(256, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    codes = codes[~codes.float().isnan()]
    weight = torch.diag_embed(codes.float()).to(torch.float8_e4m3fn)  # output i reads only code i
    x = torch.ones(1, len(codes), device="cuda", dtype=torch.bfloat16)  # every e4m3 value is exact in bf16
    got = pg.mma_linear(x, pg.pack_fp8(weight, torch.full((len(codes), 1), scale, device="cuda")), launch)
    assert torch.equal(got[0].float(), codes.float() * scale)


def test_scaled_launch_keeps_fp8_scales_that_would_overflow_out_of_the_weights():
    """scale * 2**120 overflows bf16 from scale 2**8 on: such a weight runs the unscaled kernel, still exact."""
    weight = (torch.randn(1000, 4096, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(1000, 1, device="cuda") * 1000 + 300
    packed = pg.pack_fp8(weight, scale)
    assert not packed.foldable
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, packed, pg.Launch(8, 1, 2, scaled=True)), x,
                   weight.float() * scale.bfloat16().float())


def test_prefill_rows_take_dequantize_then_matmul():
    w, dense = int_case(512, 1024, 4, 64, sym=False, act_order=True)
    x = torch.randn(100, 1024, device="cuda", dtype=torch.bfloat16)
    assert_matches(pg.mma_linear(x, w), x, dense)
    torch.testing.assert_close(pg.mma_linear(x, w), F.linear(x, dense), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_prefill_dequantization_equals_torch_bit_for_bit(dtype, monkeypatch):
    """raytp.kernels.packed_dequant against dequantize_mma for every kind, zero points and act-order, and the
    prefill product it feeds against the one torch's dequantization feeds."""
    from raytp.kernels.packed_dequant import dequantize_tiles
    for case in (dict(bits=4, group_size=128), dict(bits=4, group_size=64, sym=False, group_start=40),
                 dict(bits=8, group_size=32, act_order=True)):
        w, _ = int_case(1000, 4096, dtype=dtype, **case)
        got = dequantize_tiles(w.values, w.scales, w.zeros, w.kind, w.group_tiles, w.out_features, dtype)
        assert torch.equal(got, pg.dequantize_mma(w, dtype)), case
    codes = torch.arange(256, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    weight = codes[~codes.float().isnan()].repeat(500, 10)[:, :2000].contiguous()
    fp8 = pg.pack_fp8(weight, torch.rand(500, 1, device="cuda") + 0.5, dtype)
    got = dequantize_tiles(fp8.values, fp8.scales, fp8.zeros, fp8.kind, fp8.group_tiles, fp8.out_features, dtype)
    assert torch.equal(got, pg.dequantize_mma(fp8, dtype))
    x = torch.randn(100, 4096, device="cuda", dtype=dtype)
    triton = pg.mma_linear(x, w)
    monkeypatch.setattr(pg, "use_triton", lambda t: False)  # torch's dequantization, as --no-triton runs it
    assert torch.equal(pg.mma_linear(x, w), triton)
