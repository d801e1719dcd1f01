"""Checkpoint methods: how a checkpoint stores its quantized Linear layers. One file per method (vLLM's
`quantization/`), each a `QuantConfig` (`base.py` fixes the contract) that parses and refuses its config.json
`quantization_config`, names the tensors it stores for a matrix and reads a rank's slice of them into a weight
object of `raytp.model.formats`:

    compressed_tensors.py  llmcompressor's W4A16, W8A16, FP8, FP8_DYNAMIC, W8A8
    gptq.py                GPTQModel / AutoGPTQ
    awq.py                 AutoAWQ (GEMM)
    fp8_blocks.py          transformers' fine-grained FP8 (block scales)

A new method is one more file and one more entry in METHODS.
"""

from __future__ import annotations

from raytp.model.errors import UnsupportedModelError
from raytp.model.quant.awq import AWQ
from raytp.model.quant.base import QuantConfig, StoredTensor
from raytp.model.quant.compressed_tensors import CompressedTensors
from raytp.model.quant.fp8_blocks import FP8Blocks
from raytp.model.quant.gptq import GPTQ

__all__ = ["AWQ", "GPTQ", "METHODS", "SUPPORTED_QUANTIZATION", "CompressedTensors", "FP8Blocks", "QuantConfig",
           "StoredTensor", "quant_config"]

METHODS: dict[str, type[QuantConfig]] = {m.quant_method: m for m in (CompressedTensors, GPTQ, AWQ, FP8Blocks)}
# What raytp reads, said in every refusal
SUPPORTED_QUANTIZATION = "; ".join(m.supported for m in METHODS.values())


def quant_config(q: dict) -> QuantConfig:
    """The method config of config.json's `quantization_config` `q`; an UnsupportedModelError naming what raytp
    does not read, and what it reads, otherwise."""
    method = METHODS.get(q.get("quant_method"))
    if method is None:
        raise UnsupportedModelError(f"unsupported quantization quant_method={q.get('quant_method')!r}; raytp reads "
                                    f"{SUPPORTED_QUANTIZATION}")
    try:
        return method.from_config(q)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{e}; raytp reads {SUPPORTED_QUANTIZATION}") from None
