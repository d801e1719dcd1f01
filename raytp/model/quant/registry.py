"""The checkpoint methods raytp reads, by config.json's quantization_config.quant_method."""

from __future__ import annotations

from raytp.model.errors import UnsupportedModelError
from raytp.model.quant.awq import AWQ
from raytp.model.quant.base import QuantConfig
from raytp.model.quant.compressed_tensors import CompressedTensors
from raytp.model.quant.fp8_blocks import FP8Blocks
from raytp.model.quant.gptq import GPTQ
from raytp.model.quant.mxfp4 import MXFP4

METHODS: dict[str, type[QuantConfig]] = {m.quant_method: m for m in (CompressedTensors, GPTQ, AWQ, FP8Blocks, MXFP4)}
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
