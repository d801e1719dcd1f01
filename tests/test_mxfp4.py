"""MXFP4 experts (gpt-oss) on CPU against transformers' own code: raytp's dequantization equals transformers'
`convert_moe_packed_tensors` on the same stored bytes, a rank's slice read from a saved checkpoint at uneven splits
equals that slice of the whole dequantized tensor, the config's modules_to_not_convert is matched as transformers
matches it, and the torch experts equal transformers' GptOssExperts on the dequantized weights; the Triton kernels
against the torch experts under Triton's CPU interpreter."""

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from raytp.kernels.mxfp4 import dequantize_mxfp4, mxfp4_experts_torch
from raytp.model.errors import UnsupportedModelError
from raytp.model.quant.mxfp4 import MXFP4
from raytp.model.quant.registry import quant_config
from raytp.model.slice import Slice
from raytp.weights.checkpoint import SafetensorsReader

# published in openai/gpt-oss-20b's and -120b's config.json
GPT_OSS_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                   "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def stored(experts: int, out: int, inp: int, seed: int, exponents: tuple[int, int] = (118, 124)):
    """Random MXFP4 tensors as a checkpoint stores them: blocks (experts, out, inp / 32, 16), scales (experts, out,
    inp / 32) of exponents in `exponents` (a spread of ~0.02 at 120)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, inp // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*exponents, (experts, out, inp // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exponents", [(118, 124), (1, 255)])
def test_dequantization_equals_transformers(dtype, exponents):
    """Bit for bit, at realistic exponents and over the whole e8m0 range (overflow to inf included)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = stored(3, 40, 96, seed=exponents[0], exponents=exponents)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (experts, in, out), as GptOssExperts holds it
    got = dequantize_mxfp4(blocks.flatten(-2), scales, dtype)  # (experts, out, in)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("splits", [[96], [32, 64], [64, 0, 32], [32, 32, 0, 0, 32]])
def test_a_ranks_slice_equals_the_slice_of_the_whole(tmp_path, splits):
    """gate_up rows (gate and up interleaved) and down_proj's input columns of each rank's expert columns, read
    through the checkpoint reader, in whole groups of 32; ranks holding none included. The checkpoint holds the
    tensors, names and dtypes the method declares (what `raytp check` compares), and a slice reads only its bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    experts, hidden, width = 4, 64, 96
    name = "model.layers.0.mlp.experts."
    gu_blocks, gu_scales = stored(experts, 2 * width, hidden, seed=1)
    d_blocks, d_scales = stored(experts, hidden, width, seed=2)
    save_file({name + "gate_up_proj_blocks": gu_blocks, name + "gate_up_proj_scales": gu_scales,
               name + "down_proj_blocks": d_blocks, name + "down_proj_scales": d_scales},
              tmp_path / "model.safetensors")
    quant = MXFP4.from_config(GPT_OSS_QUANTIZATION)
    declared = quant.stored_tensors(name + "gate_up_proj", (experts, 2 * width, hidden)) | quant.stored_tensors(
        name + "down_proj", (experts, hidden, width))
    e8m0 = {torch.float8_e8m0fnu: torch.uint8}  # the scales' values, stored as their bytes
    assert {n: (t.shape, e8m0.get(t.dtype, t.dtype)) for n, t in declared.items()} == {
        n: (tuple(t.shape), t.dtype) for n, t in ((name + "gate_up_proj_blocks", gu_blocks),
                                                  (name + "gate_up_proj_scales", gu_scales),
                                                  (name + "down_proj_blocks", d_blocks),
                                                  (name + "down_proj_scales", d_scales))}
    gate_up = convert_moe_packed_tensors(gu_blocks, gu_scales, dtype=torch.float32).transpose(1, 2)
    down = convert_moe_packed_tensors(d_blocks, d_scales, dtype=torch.float32).transpose(1, 2)
    start = 0
    with SafetensorsReader(tmp_path, torch.float32, torch.device("cpu")) as reader:
        for n in splits:
            cols = range(start, start + n)
            rows = range(2 * cols.start, 2 * cols.stop)
            got_gu = quant.read(reader, Slice(name + "gate_up_proj", (experts, 2 * width, hidden), rows, None, quant,
                                              stacked=True))
            got_d = quant.read(reader, Slice(name + "down_proj", (experts, hidden, width), range(hidden), cols,
                                             quant, stacked=True))
            assert got_gu.blocks.numel() + got_gu.scales.numel() == experts * 2 * n * (hidden // 2 + hidden // 32)
            assert got_d.blocks.numel() + got_d.scales.numel() == experts * hidden * (n // 2 + n // 32)
            torch.testing.assert_close(got_gu.dequantize(torch.float32), gate_up[:, rows.start:rows.stop],
                                       rtol=0, atol=0)
            torch.testing.assert_close(got_d.dequantize(torch.float32), down[:, :, cols.start:cols.stop],
                                       rtol=0, atol=0)
            start += n
        with pytest.raises(ValueError, match="not whole groups of 32"):
            quant.read(reader, Slice(name + "down_proj", (experts, hidden, width), range(hidden), range(16, 48),
                                     quant, stacked=True))


def test_the_config_converts_what_transformers_converts():
    from transformers.quantizers.quantizers_utils import should_convert_module

    quant = quant_config(GPT_OSS_QUANTIZATION)
    assert isinstance(quant, MXFP4) and quant.group_size == 32
    for module in ("model.layers.3.mlp.experts", "model.layers.3.self_attn", "model.layers.3.mlp.router",
                   "lm_head", "model.embed_tokens"):
        converts = should_convert_module(module, GPT_OSS_QUANTIZATION["modules_to_not_convert"])
        assert quant.quantizes(module + ".gate_up_proj") == (converts and module.endswith("experts")), module
    assert not quant_config(GPT_OSS_QUANTIZATION | {"modules_to_not_convert": ["model.layers.3"]}).quantizes(
        "model.layers.3.mlp.experts.down_proj")
    with pytest.raises(UnsupportedModelError, match="unsupported mxfp4 quantization: block_size"):
        quant_config(GPT_OSS_QUANTIZATION | {"block_size": 64})


def experts_case(tokens: int, experts: int, top_k: int, hidden: int, width: int, seed: int, dtype=torch.float32):
    """x, ids, weights and every expert's (blocks, scales, bias) of gate_up and down, as raytp holds them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    gu_blocks, gu_scales = stored(experts, 2 * width, hidden, seed=seed + 1, exponents=(122, 126))
    d_blocks, d_scales = stored(experts, hidden, width, seed=seed + 2, exponents=(122, 126))
    gate_up = (gu_blocks.flatten(-2), gu_scales, torch.randn(experts, 2 * width, generator=g).to(dtype))
    down = (d_blocks.flatten(-2), d_scales, torch.randn(experts, hidden, generator=g).to(dtype))
    return x, ids, weights, gate_up, down


def test_torch_experts_equal_transformers_gpt_oss_experts():
    """GptOssExperts (transformers' eager loop over experts) on the dequantized weights and biases: clamped SwiGLU
    with alpha over interleaved gate/up rows; the swiglu limit bites (gate_up outputs reach past 7)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    tokens, experts, top_k, hidden, width = 9, 8, 3, 64, 96
    x, ids, weights, gate_up, down = experts_case(tokens, experts, top_k, hidden, width, seed=5)
    config = GptOssConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=experts,
                          num_experts_per_tok=top_k)
    reference = GptOssExperts(config)
    with torch.no_grad():
        reference.gate_up_proj.copy_(dequantize_mxfp4(gate_up[0], gate_up[1], torch.float32).transpose(1, 2))
        reference.gate_up_proj_bias.copy_(gate_up[2])
        reference.down_proj.copy_(dequantize_mxfp4(down[0], down[1], torch.float32).transpose(1, 2))
        reference.down_proj_bias.copy_(down[2])
        want = reference(x, ids, weights)
        assert (x @ reference.gate_up_proj[0]).abs().max() > config.swiglu_limit
    got = mxfp4_experts_torch(x, ids, weights, gate_up, down, config.swiglu_alpha, config.swiglu_limit)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


INTERPRETED = """
import torch

from raytp.kernels.mxfp4 import mxfp4_experts_torch, mxfp4_routed_experts
from tests.test_mxfp4 import experts_case

# batch 1 and 8 decode, a prefill over two token tiles; uneven widths (a rank's share of 32-column groups), a
# hidden size that is not a whole number of the kernel's steps, a rank without down_proj's bias
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for tokens, experts, top_k, hidden, width, bias in ((1, 16, 4, 96, 64, True), (8, 8, 2, 160, 32, True),
                                                         (19, 6, 3, 64, 96, False)):
        x, ids, weights, gate_up, down = experts_case(tokens, experts, top_k, hidden, width, seed=tokens, dtype=dtype)
        if not bias:
            down = down[:2] + (None,)
        want = mxfp4_experts_torch(x, ids, weights, gate_up, down, 1.702, 7.0)
        for pairs_up_to in (0, tokens * top_k):  # token tiles, then one GEMV per (token, choice)
            got = mxfp4_routed_experts(x, ids, weights, gate_up, down, 1.702, 7.0, pairs_up_to=pairs_up_to)
            # outputs reach ~200: float32 accumulation order costs ~1e-7 of that, not of each element
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.triton_interpreter(INTERPRETED)
def test_routed_kernels_equal_the_torch_experts_in_the_interpreter(interpreted):
    printed, error = interpreted
    assert not error and printed.strip() == "equal", error[-3000:]
