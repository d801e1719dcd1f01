"""GPTQ checkpoints (GPTQModel, AutoGPTQ; quant_method "gptq", checkpoint formats gptq and gptq_v2): every decoder
Linear as 4- or 8-bit integers in AutoGPTQ's tensors (autogptq.py), stored transposed.

    qweight  (in / per, out) int32, `per` = 32 / bits inputs to a word in IntWeight's bit order
    qzeros   in IntWeight's bit order too; the "gptq" format stores zero - 1
    g_idx    with desc_act (act-order)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.dequant_matmul import unpack
from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.base import WeightReader
from raytp.model.formats.int_packed import Blocks, stored_blocks
from raytp.model.quant.autogptq import AutoGPTQLayout


@dataclass(frozen=True)
class GPTQ(AutoGPTQLayout):
    zero_offset: int = 0  # added to every stored zero point: 1 for AutoGPTQ's "gptq" format, which stores zero - 1

    quant_method = "gptq"
    supported = "GPTQ checkpoints (GPTQModel/AutoGPTQ, formats gptq and gptq_v2): 4 or 8 bits, desc_act true or false"

    @classmethod
    def from_config(cls, q: dict) -> GPTQ:
        """Every decoder Linear quantized (lm_head too where `lm_head` is true: refused)."""
        bits, group_size, fmt = q.get("bits", 4), q.get("group_size", 128), q.get("checkpoint_format", "gptq")
        what = None
        if bits not in (4, 8):
            what = f"bits={bits}"
        elif fmt not in ("gptq", "gptq_v2"):
            what = f"checkpoint_format={fmt!r} (re-save the model with GPTQModel as gptq or gptq_v2)"
        elif q.get("pack_dtype", "int32") != "int32":
            what = f"pack_dtype={q['pack_dtype']!r}"
        elif q.get("lm_head"):
            what = "a quantized lm_head"
        elif q.get("dynamic"):
            what = "per-module `dynamic` overrides"
        elif not (group_size == -1 or isinstance(group_size, int) and group_size > 0):
            what = f"group_size={group_size!r}"
        if what:
            raise UnsupportedModelError(f"unsupported GPTQ quantization: {what}")
        return cls("int", bits, None if group_size == -1 else group_size, symmetric=bool(q.get("sym", True)),
                   act_order=bool(q.get("desc_act", False)) and group_size != -1, zero_offset=int(fmt == "gptq"))

    def describe(self) -> str:
        return self.describe_int() + ", GPTQ layout"

    def qweight_shape(self, out: int, inp: int) -> tuple[int, int]:
        return -(-inp // (32 // self.bits)), out

    def packed_blocks(self, reader: WeightReader, module: str, out: int, inp: int) -> Blocks:
        shape = self.qweight_shape(out, inp)[::-1]
        return stored_blocks(reader, f"{module}.qweight", shape, transposed=True, stored=True)

    def unpack_zero_words(self, words: torch.Tensor) -> torch.Tensor:
        return unpack(words, self.bits).t() + self.zero_offset
