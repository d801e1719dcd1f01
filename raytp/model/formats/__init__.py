"""Weight formats: how one rank's slice of a Linear matrix is stored, counted, read and applied. One object (and
one file) per format, each with the same interface (`base.WeightFormat`); a weight it reads has an `apply` that
calls the format's kernel in `raytp.kernels` (Triton or CUDA on GPUs, dequantize then F.linear elsewhere).

    dense.py       DenseFormat / DenseWeight: the model dtype, applied with F.linear
    int_packed.py  IntFormat / IntWeight: 4- or 8-bit integers packed into int32 words (compressed-tensors
                   `pack-quantized`, GPTQ, AWQ), group or channel scales, optional zero points and act-order groups
    fp8.py         FP8Format / FP8Weight: float8 e4m3 with per-channel or per-tensor float32 scales, or per block
                   (transformers' fine-grained FP8)
    act_quant.py   ActQuantFormat / ActQuantWeight: float8 e4m3 or int8 with per-channel float32 scales, applied to
                   activations quantized per token at run time (FP8_DYNAMIC, W8A8)
    fused.py       ConcatWeight (parts that cannot share a matrix), PackedWeight (repacked for the GPU decode GEMV),
                   `fuse` and `for_device`

`weight_format` picks a matrix's format from its `QuantConfig` (how config.json's quantization_config is parsed
lives in `raytp.model.config`); `read_linear` reads a `Slice` in it, touching only the stored rows and columns of
the slice (a chunk of whole rows at a time where columns must be gathered), so no rank holds a whole quantized
matrix it does not own.
"""

from __future__ import annotations

from raytp.model.config import QuantConfig
from raytp.model.formats.act_quant import ActQuantFormat, ActQuantWeight
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.dense import DenseFormat, DenseWeight
from raytp.model.formats.fp8 import FP8Format, FP8Weight
from raytp.model.formats.fused import ConcatWeight, PackedWeight, Weight, for_device, fuse
from raytp.model.formats.int_packed import IntFormat, IntWeight, pack
from raytp.model.layout import Slice

__all__ = ["ActQuantWeight", "ConcatWeight", "DenseWeight", "FP8Weight", "IntWeight", "PackedWeight", "Weight",
           "WeightFormat", "WeightReader", "for_device", "fuse", "pack", "read_linear", "stored_shapes",
           "weight_format"]


def weight_format(quant: QuantConfig | None) -> WeightFormat:
    """The format a matrix stored with `quant` (None: dense) is read and held in."""
    if quant is None:
        return DenseFormat()
    if quant.dynamic_activations:
        return ActQuantFormat(quant)
    return FP8Format(quant) if quant.kind == "fp8" else IntFormat(quant)


def stored_shapes(s: Slice) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint stores for the matrix of `s` (its global shapes), by name."""
    return weight_format(s.quant).stored_shapes(s.name, s.shape)


def read_linear(reader: WeightReader, s: Slice) -> DenseWeight | IntWeight | FP8Weight | ActQuantWeight:
    """Rank slice `s` of a Linear matrix in the format it is stored in."""
    return weight_format(s.quant).read(reader, s)
