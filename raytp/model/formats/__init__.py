"""Weight formats: how one rank's slice of a Linear matrix is held, counted and applied, whichever checkpoint method
(`raytp.model.quant`) stored it. One weight class (and one file) per format; a weight has an `apply` that calls the
format's kernel in `raytp.kernels` (Triton or CUDA on GPUs, dequantize then F.linear elsewhere), and says itself how
it fuses with others (`fused`), whether it is repacked for its device (`repacked`) and what `apply` takes
(`takes_amax`); its format object says what it weighs (`base.WeightFormat`).

    dense.py       DenseFormat / DenseWeight: the model dtype, applied with F.linear
    int_packed.py  IntFormat / IntWeight: 4- or 8-bit integers packed into int32 words, group or channel scales,
                   optional zero points and act-order groups; `read_packed`, the reading every packing method shares
    fp8.py         FP8Format / FP8Weight: float8 e4m3 with per-channel or per-tensor float32 scales, or per row and
                   group of columns
    act_quant.py   ActQuantFormat / ActQuantWeight: float8 e4m3 or int8 with per-channel float32 scales, applied to
                   activations quantized per token at run time (FP8_DYNAMIC, W8A8)
    mxfp4.py       MXFP4Format / MXFP4Weight: one projection of every expert (gpt-oss) as e2m1 values with e8m0
                   scales per 32 inputs, applied by the experts' kernels (raytp.kernels.mxfp4)
    fused.py       ConcatWeight (parts that cannot share a matrix), PackedWeight (repacked for the GPU decode GEMV),
                   `fuse` and `for_device`

`read_linear` reads a `Slice` through its checkpoint method, touching only the stored rows and columns of the slice,
so no rank holds a whole quantized matrix it does not own.
"""

from __future__ import annotations

from raytp.model.formats.act_quant import ActQuantWeight
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.dense import DenseFormat, DenseWeight
from raytp.model.formats.fp8 import FP8Weight
from raytp.model.formats.fused import ConcatWeight, PackedWeight, Weight, for_device, fuse
from raytp.model.formats.int_packed import IntWeight, pack
from raytp.model.quant.base import QuantConfig
from raytp.model.slice import Slice

__all__ = ["ActQuantWeight", "ConcatWeight", "DenseWeight", "FP8Weight", "IntWeight", "PackedWeight", "Weight",
           "WeightFormat", "WeightReader", "for_device", "fuse", "pack", "read_linear", "stored_shapes",
           "weight_format"]


def weight_format(quant: QuantConfig | None) -> WeightFormat:
    """The format a matrix stored with `quant` (None: dense) is held in."""
    return DenseFormat() if quant is None else quant.format


def stored_shapes(s: Slice) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint stores for the matrix of `s` (their global shapes), by name."""
    if s.quant is None:
        return {s.name: s.shape}
    return {name: t.shape for name, t in s.quant.stored_tensors(s.name, s.shape).items()}


def read_linear(reader: WeightReader, s: Slice) -> Weight:
    """Rank slice `s` of a Linear matrix in the format it is stored in."""
    return DenseWeight(reader.read(s)) if s.quant is None else s.quant.read(reader, s)
