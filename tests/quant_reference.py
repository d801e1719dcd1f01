"""The format libraries' own dequantization, copied from their releases as independent references for the readers.

Neither library installs on a CPU-only machine without a build toolchain and pinned dependencies (AutoAWQ 0.2.9's
sdist fails to build its metadata here; GPTQModel 7.7.0 builds CUDA extensions and imports its whole model zoo), so
the few functions the tests need are reproduced here, unchanged but for the names in the marked places. raytp's
readers share no code with them.
"""

import torch

# --- AutoAWQ 0.2.9, awq/utils/packing_utils.py (MIT License, Copyright (c) 2023 MIT HAN Lab), verbatim ---
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int):
    shifts = torch.arange(0, 32, bits, device=qzeros.device)

    # unpacking columnwise
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(
        torch.int8  # smallest dtype available
    )
    iweights = iweights.view(iweights.shape[0], -1)

    # unpacking columnwise
    if qzeros is not None:
        izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(
            torch.int8  # smallest dtype available
        )
        izeros = izeros.view(izeros.shape[0], -1)
    else:
        izeros = qzeros

    return iweights, izeros


def reverse_awq_order(iweights: torch.Tensor, izeros: torch.Tensor, bits: int):
    reverse_order_tensor = torch.arange(
        iweights.shape[-1],
        dtype=torch.int32,
        device=izeros.device,
    )
    reverse_order_tensor = reverse_order_tensor.view(-1, 32 // bits)
    reverse_order_tensor = reverse_order_tensor[:, AWQ_REVERSE_ORDER]
    reverse_order_tensor = reverse_order_tensor.view(-1)

    if izeros is not None:
        izeros = izeros[:, reverse_order_tensor]
    iweights = iweights[:, reverse_order_tensor]

    return iweights, izeros


def dequantize_gemm(qweight, qzeros, scales, bits, group_size):
    # Unpack the qweight and qzeros tensors
    iweight, izeros = unpack_awq(qweight, qzeros, bits)
    # Reverse the order of the iweight and izeros tensors
    iweight, izeros = reverse_awq_order(iweight, izeros, bits)

    # overflow checks
    iweight = torch.bitwise_and(iweight, (2**bits) - 1)
    izeros = torch.bitwise_and(izeros, (2**bits) - 1)

    # fp16 weights
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    iweight = (iweight - izeros) * scales

    return iweight
# --- end of AutoAWQ ---


# --- GPTQModel 7.7.0 (Apache-2.0, ModelCloud.ai), gptqmodel/nn_modules/qlinear/__init__.py
# BaseQuantLinear.dequantize_weight and _dequantize_from_codes for bits 2/4/8 (num_itr=1), with the module's
# attributes as arguments: wf from _init_wf_unsqueeze_buffers, dequant_dtype from qlinear/torch.py, and the v1 -> v2
# zero-point conversion of gptqmodel/utils/model.py convert_gptq_v1_to_v2_format_module (int32 packing).
def gptq_dequantize_weight(qweight, qzeros, scales, g_idx, bits, checkpoint_format="gptq"):
    t = torch
    pack_factor, maxq = 32 // bits, 2 ** bits - 1
    dequant_dtype = torch.int16 if bits == 8 else torch.int8
    if checkpoint_format == "gptq":  # convert_gptq_v1_to_v2_format_module
        qzeros = qzeros.clone()
        if bits == 4:
            qzeros += 0b00010001000100010001000100010001
        elif bits == 8:
            qzeros += 0b00000001000000010000000100000001
    wf = t.tensor(list(range(0, 32, bits)), dtype=t.int32).unsqueeze(0)
    wf_unsqueeze_zero, wf_unsqueeze_neg_one = wf.unsqueeze(0), wf.unsqueeze(-1)

    zeros = t.bitwise_right_shift(
        t.unsqueeze(qzeros, 2).expand(-1, -1, pack_factor),
        wf_unsqueeze_zero  # self.wf.unsqueeze(0),
    ).to(dequant_dtype)
    zeros = t.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)
    zeros = zeros[:, :scales.shape[1]]

    weight = t.bitwise_and(
        t.bitwise_right_shift(
            t.unsqueeze(qweight, 1).expand(-1, pack_factor, -1),
            wf_unsqueeze_neg_one  # self.wf.unsqueeze(-1)
        ).to(dequant_dtype),
        maxq
    )
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    weights = scales[g_idx.long()] * (weight - zeros[g_idx.long()])
    return weights
# --- end of GPTQModel ---
