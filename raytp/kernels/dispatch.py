"""When a Triton kernel runs instead of its torch version: on CUDA tensors, with Triton installed, unless this
process switched Triton off (`set_triton(False)`, which each rank calls once from RuntimeOptions.triton; the
torch versions then run everywhere: for debugging, and to compare the two on a GPU).

Some kernels have a switch of their own, so one GPU can compare them with their torch versions: the FP8 KV cache's
Triton paths (raytp.kernels.kv_fp8), `fp8_kv` (RuntimeOptions.triton_fp8_kv), which run only where the GPU converts
e4m3 in hardware (compute capability 8.9+), and the Triton dequantization of packed weights for prefill
(raytp.kernels.packed_dequant), `prefill_dequant` (RuntimeOptions.triton_prefill_dequant): both on, since measured
on an H200. The routed GEMV of quantized experts (raytp.kernels.routed_packed_gemv), `routed_experts`
(RuntimeOptions.routed_quantized_experts), is off until measured end to end, and so is the weight-only packed GEMV
for checkpoints that quantize activations (FP8_DYNAMIC, W8A8), `weight_only_act_quant` (RuntimeOptions.
weight_only_act_quant), which applies on every rank, CPUs included, so that all ranks run one arithmetic and join
the same collectives. The one-launch routing and combining of a mixture of experts and its one-token expert GEMVs
(raytp.kernels.moe_routing, moe_gemv), `fused_moe` (RuntimeOptions.fused_moe), is off until measured too, and so is
prefill of model-dtype experts by torch._grouped_mm on GPUs where it runs without a host sync (Hopper and later),
`grouped_mm_experts` (RuntimeOptions.grouped_mm_experts)."""

from __future__ import annotations

from functools import cache

import torch

try:
    import triton
except ImportError:  # CPU-only installs: every kernel's torch version runs
    triton = None

# Per process, not per call: a rank sets it once before its first forward, and a kernel call must not pay for a
# lookup (the decode step makes hundreds of them).
_enabled = triton is not None
_fp8_kv = True
_prefill_dequant = True
_routed_experts = False
_weight_only_act_quant = False
_fused_moe = False
_grouped_mm_experts = False

FP8_CAPABILITY = (8, 9)  # Ada and Hopper convert e4m3 in hardware; before them Triton would emulate it per element
GROUPED_MM_CAPABILITY = (9, 0)  # torch._grouped_mm's CUTLASS kernel; before Hopper torch loops and syncs


def set_triton(enabled: bool, fp8_kv: bool = True, prefill_dequant: bool = True,
               routed_experts: bool = False, weight_only_act_quant: bool = False, fused_moe: bool = False,
               grouped_mm_experts: bool = False) -> None:
    """Use the Triton kernels in this process (where Triton is installed) or the torch versions everywhere; with
    `fp8_kv` also for the FP8 KV cache's write and decode attention, with `prefill_dequant` also to dequantize
    packed weights for prefill, with `routed_experts` also for quantized experts, with `weight_only_act_quant` also
    to repack activation-quantized weights for the weight-only packed GEMV, with `fused_moe` also to route and
    combine a mixture of experts' choices, with `grouped_mm_experts` also to prefill model-dtype experts by
    torch._grouped_mm."""
    global _enabled, _fp8_kv, _prefill_dequant, _routed_experts, _weight_only_act_quant, _fused_moe
    global _grouped_mm_experts
    _enabled = enabled and triton is not None
    _fp8_kv = fp8_kv
    _prefill_dequant = prefill_dequant
    _routed_experts = routed_experts
    _weight_only_act_quant = weight_only_act_quant
    _fused_moe = fused_moe
    _grouped_mm_experts = grouped_mm_experts


def use_triton(t: torch.Tensor) -> bool:
    return _enabled and t.is_cuda


def use_triton_prefill_dequant(t: torch.Tensor) -> bool:
    """Whether packed weights like t are dequantized for prefill by raytp.kernels.packed_dequant."""
    return _prefill_dequant and use_triton(t)


def use_routed_quantized_experts(t: torch.Tensor) -> bool:
    """Whether quantized experts held like t are stacked for raytp.kernels.routed_packed_gemv."""
    return _routed_experts and use_triton(t)


def use_fused_moe(t: torch.Tensor) -> bool:
    """Whether a mixture of experts' routing and combining run as raytp.kernels.moe_routing's kernels for t, and a
    one-token step's model-dtype experts as raytp.kernels.moe_gemv's GEMVs over its choices."""
    return _fused_moe and use_triton(t)


def use_grouped_mm_experts(t: torch.Tensor) -> bool:
    """Whether model-dtype experts prefill tokens like t by torch._grouped_mm: bfloat16 on a GPU of compute
    capability 9.0 or later, where torch runs it as one CUTLASS kernel without a host sync (before Hopper torch
    loops over the experts and syncs, as raytp's own torch code does)."""
    return (_grouped_mm_experts and t.is_cuda and t.dtype == torch.bfloat16
            and _capability(t.device.index) >= GROUPED_MM_CAPABILITY)


def weight_only_act_quant() -> bool:
    """Whether activation-quantized weights run as weight-only ones, their inputs left unquantized: on every rank, so
    that all of them compute alike and join the same collectives (a CUDA rank then repacks them for
    raytp.kernels.packed_gemv, a CPU rank keeps them as e4m3 or int8 weights for torch)."""
    return _weight_only_act_quant


def use_triton_fp8_kv(t: torch.Tensor) -> bool:
    """Whether the FP8 KV cache's Triton kernels run for tensors like t."""
    return _fp8_kv and use_triton(t) and _capability(t.device.index) >= FP8_CAPABILITY


@cache  # a device's capability does not change; asking CUDA every call would cost each decode step's kernels
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
