"""Run-time switches every rank obeys: one frozen `RuntimeOptions`, carried to each rank inside GroupSettings.

The CLI sets them with flags (`--no-triton`, `--no-triton-fp8-kv`, `--no-triton-prefill-dequant`,
`--routed-quantized-experts`, `--weight-only-act-quant`, `--fused-moe`,
`--grouped-mm-experts`, `--no-cuda-graphs`, `--no-gpu-hoststaged`, `--check-identical`).
`RuntimeOptions.from_env` is the one place where raytp reads RAYTP_* environment variables at run time, as the
flags' defaults in the process that starts the group (scripts and CI jobs that export them keep working):

    RAYTP_TRITON=0            triton=False
    RAYTP_TRITON_FP8_KV=0     triton_fp8_kv=False
    RAYTP_TRITON_PREFILL_DEQUANT=0  triton_prefill_dequant=False
    RAYTP_ROUTED_QUANTIZED_EXPERTS=1  routed_quantized_experts=True
    RAYTP_WEIGHT_ONLY_ACT_QUANT=1  weight_only_act_quant=True
    RAYTP_FUSED_MOE=1  fused_moe=True
    RAYTP_GROUPED_MM_EXPERTS=1  grouped_mm_experts=True
    RAYTP_CUDA_GRAPHS=0       cuda_graphs=False
    RAYTP_GPU_HOSTSTAGED=0    gpu_hoststaged=False
    RAYTP_CHECK_IDENTICAL=1   check_identical=True

Ranks never read the environment: what they run is what the options say, wherever Ray starts them.
(RAYTP_HOME, where models are cached, and RAYTP_API_KEY, `serve --api-key`'s default, are not run-time switches.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class RuntimeOptions:
    # Triton kernels on CUDA ranks; off runs the torch versions everywhere (debugging, A/B on one GPU).
    triton: bool = True
    # The FP8 KV cache (--kv-dtype fp8) written and read by Triton kernels on GPUs of compute capability 8.9+
    # (raytp.kernels.kv_fp8); off, torch code dequantizes it. On an H200 (2026-12-05) the kernels decode the 8B shape
    # at 0.99x the bf16 cache's speed at 2048 and 8192 tokens, the torch code at 0.52x.
    triton_fp8_kv: bool = True
    # Prefill with packed quantized weights dequantizes each matrix with one Triton kernel (raytp.kernels.
    # packed_dequant) instead of torch ops: w4a16 prefill at 0.91x the bf16 one at 2048 tokens on an H200
    # (2026-12-05), against 0.14x with torch ops.
    triton_prefill_dequant: bool = True
    # Quantized experts of a mixture of experts (int4, int8, FP8) stacked in the packed GEMV's layout and decoded
    # by its routed launch (raytp.kernels.routed_packed_gemv), which reads only the selected experts also inside
    # CUDA graphs; off, each expert is its own GEMV and a CUDA graph runs every expert. Off until measured on a GPU.
    routed_quantized_experts: bool = False
    # FP8_DYNAMIC and W8A8 layers run weight-only, their inputs left in the model dtype, on every rank (CUDA ranks
    # repack them for the packed GEMV, raytp.kernels.packed_gemv; CPU ranks use torch): on an H200 the same weight
    # bytes decode at 1.31x (fp8) and 1.33x (int8) the bf16 speed that way, against 0.94x and 1.03x with the
    # activations quantized. It changes the arithmetic
    # from what the checkpoint's config says (slightly more accurate). Off until measured per batch size on a GPU.
    weight_only_act_quant: bool = False
    # A mixture of experts' routing (softmax, top-k, renormalization) and the weighted sum of each token's choices
    # run as one Triton launch each (raytp.kernels.moe_routing) instead of up to eight torch kernels per layer, and a
    # one-token decode step's model-dtype experts as GEMVs over its k choices, the sum inside the down projection's
    # (raytp.kernels.moe_gemv). Off until measured on a GPU.
    fused_moe: bool = False
    # Prefill of a mixture of experts in the model dtype as two torch._grouped_mm calls over the tokens sorted by
    # expert (raytp.kernels.moe_gemv.grouped_mm_experts) on bfloat16 GPUs of compute capability 9.0+, instead of one
    # matmul per selected expert after a host sync: Qwen3-30B-A3B prefilled 128 tokens at 406 tokens/s on an H200
    # that way (2026-12-05), the dense 8B at 4995. Off until measured.
    grouped_mm_experts: bool = False
    # Decode replayed from CUDA graphs where the communicator allows capture; off to debug or profile eager steps.
    cuda_graphs: bool = True
    # GPU ranks run the host-staged all-reduce as a kernel polling mapped host memory; off keeps the CPU-driven
    # path (the kernel path also falls back by itself, with the reason logged, where cudaHostRegister fails).
    gpu_hoststaged: bool = True
    # After every all-reduce every rank checks that all ranks hold bit-identical results: one extra collective
    # per all-reduce, so for tests only.
    check_identical: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RuntimeOptions:
        """The options the RAYTP_* variables in `environ` ask for (see the module docstring); defaults elsewhere:
        a switch that is on by default goes off only at "0", one that is off goes on only at "1"."""
        def value(f) -> bool:
            given = environ.get(env_name(f.name))
            return given != "0" if f.default else given == "1"

        return cls(**{f.name: value(f) for f in fields(cls)})

    def flags(self) -> list[str]:
        """The CLI flags that give these options whatever the environment says (for reproducible commands)."""
        return [FLAGS[f.name][0] for f in fields(self) if getattr(self, f.name) != f.default]


def env_name(field: str) -> str:
    """The RAYTP_* variable that gives a RuntimeOptions field its default: RAYTP_ and the field's name."""
    return "RAYTP_" + field.upper()


# Each field's CLI flag, which sets it to the opposite of its default, and the flag's help.
FLAGS = {
    "triton": ("--no-triton", "run the torch version of every kernel, also on GPUs (debugging, comparing the two)"),
    "triton_fp8_kv": ("--no-triton-fp8-kv", "write and read the FP8 KV cache (--kv-dtype fp8) with torch code "
                      "instead of the Triton kernels (those run on GPUs of compute capability 8.9+)"),
    "triton_prefill_dequant": ("--no-triton-prefill-dequant", "prefill with quantized weights dequantizes each "
                               "matrix with torch ops instead of one Triton kernel (several times slower)"),
    "routed_quantized_experts": ("--routed-quantized-experts", "decode quantized experts (GPTQ, AWQ, int4/int8, "
                                 "FP8) with one routed GEMV that reads only the selected experts, also in CUDA "
                                 "graphs (off: per-expert GEMVs; a CUDA graph then runs every expert)"),
    "weight_only_act_quant": ("--weight-only-act-quant", "run FP8_DYNAMIC and W8A8 checkpoints weight-only (on "
                              "GPUs the packed GEMV), activations left unquantized (off: quantized per token, as "
                              "their config says)"),
    "fused_moe": ("--fused-moe", "route a mixture of experts' tokens (softmax, top-k) and sum their choices' "
                  "outputs with one Triton kernel each, and decode one token's experts as GEMVs over its choices "
                  "(off: torch ops, and the experts' tiled kernels)"),
    "grouped_mm_experts": ("--grouped-mm-experts", "prefill a mixture of experts in bfloat16 with torch's grouped "
                           "GEMM on GPUs of compute capability 9.0+ (off: one matmul per selected expert)"),
    "cuda_graphs": ("--no-cuda-graphs", "decode eagerly on GPUs instead of replaying CUDA graphs"),
    "gpu_hoststaged": ("--no-gpu-hoststaged", "GPU ranks drive the host-staged all-reduce from the CPU, not a kernel"),
    "check_identical": ("--check-identical", "check after every all-reduce that all ranks hold identical bits "
                        "(slow: for tests)"),
}
