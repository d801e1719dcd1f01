"""The contract every checkpoint method fulfils (vLLM's `QuantizationConfig`): parse and refuse its part of
config.json, name the tensors it stores for a Linear matrix, read a rank's slice of them into a weight object, and
say which weight format (`raytp.model.formats`) holds them in memory, what the planner counts.

A method is a frozen dataclass: two configs are equal when their method and every field are, which is how a
checkpoint's quantization is recognised as one of the synthetic presets (`raytp.model.config.QUANT_PRESETS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import torch


class StoredTensor(NamedTuple):
    """One tensor a checkpoint stores for a quantized matrix: its global shape and what its values are, the dtype
    it is read in (`torch.int32`: packed words, zero points or group indices, every value equally likely to a
    synthetic draw; `torch.int8` / `torch.float8_e4m3fn`: unpacked values; `torch.float32`: scales; `torch.uint8`:
    bytes of packed values, every value equally likely; `torch.float8_e8m0fnu`: power-of-two scales, read as their
    bytes)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class QuantConfig:
    """How the decoder's Linear layers are stored, from config.json's `quantization_config`; one subclass per
    checkpoint method, registered by its `quant_method` in `raytp.model.quant.registry`.

    The fields say what a rank holds once a slice is read (shared by every method); a method adds what only its
    tensors need. Embeddings, norms and the (tied or separate) lm_head stay dense; so does any Linear named in
    `ignore`.
    """

    kind: str  # "int": integers (packed 32 // bits to an int32 word, or int8 with dynamic activations); "fp8": e4m3
    bits: int  # 4 or 8 ("int"); 8 ("fp8")
    group_size: int | None  # input columns sharing one scale; None: one scale per output row (or per tensor)
    per_tensor: bool = False  # fp8 only: one scale for the whole matrix
    symmetric: bool = True  # False: an integer zero point per scale
    act_order: bool = False  # the checkpoint gives every input column its group (weight_g_idx, GPTQ's g_idx)
    ignore: tuple[str, ...] = ()  # Linear module names (or "re:" patterns) left dense
    # Activations quantized at run time too, per token, to the weights' 8-bit type (FP8_DYNAMIC: e4m3; W8A8: int8),
    # with channel scales
    dynamic_activations: bool = False

    quant_method: ClassVar[str]  # config.json's quantization_config.quant_method
    # The decoder's Linear layers are stored this way (less `ignore`); False: only what the method names itself
    # (MXFP4: gpt-oss's stacked experts)
    linears: ClassVar[bool] = True
    supported: ClassVar[str]  # what the method reads, said in every refusal

    @classmethod
    def from_config(cls, q: dict) -> QuantConfig:
        """The config of `quantization_config` `q` (whose quant_method is this method's); raises
        UnsupportedModelError naming the first setting raytp does not read."""
        raise NotImplementedError

    def stored_tensors(self, name: str, shape: tuple[int, int]) -> dict[str, StoredTensor]:
        """The tensors a checkpoint stores for the matrix `name` ("...weight") of global `shape`, by name."""
        raise NotImplementedError

    def read(self, reader, s):
        """Rank slice `s` (a `raytp.model.slice.Slice`, which holds this config: not imported here) of the matrix,
        read through `reader` (a `raytp.model.formats.WeightReader`) as a weight object, touching only the stored
        rows and columns of the slice (a chunk of whole rows at a time where columns must be gathered)."""
        raise NotImplementedError

    @property
    def format(self):
        """The weight format (`raytp.model.formats`) the slices are held in: what they weigh in memory, how a
        synthetic model draws their scales."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def drawable(self) -> QuantConfig:
        """This quantization as a synthetic model draws it: random group indices would not be a valid act-order
        permutation, so groups stay in order."""
        return replace(self, act_order=False)

    def quantizes(self, module: str) -> bool:
        """Whether the Linear `module` ("model.layers.0.mlp.down_proj") is stored quantized."""
        return not any(re.fullmatch(p[3:], module) if p.startswith("re:") else p == module for p in self.ignore)

    def describe_int(self) -> str:
        """Packed integers in words: what every integer method holds."""
        scales = f"groups of {self.group_size}" if self.group_size else "per-channel scales"
        return (f"w{self.bits}a16 int, {scales}, {'symmetric' if self.symmetric else 'zero points'}"
                + (", act-order" if self.act_order else ""))


def modules_matching(names) -> tuple[str, ...]:
    """`ignore` patterns for AutoAWQ's and transformers' `modules_to_not_convert`: every module whose name contains
    one of `names`."""
    return tuple(f"re:.*{re.escape(m)}.*" for m in names or ())
