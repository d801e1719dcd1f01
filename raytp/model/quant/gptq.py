"""GPTQ checkpoints (GPTQModel, AutoGPTQ; quant_method "gptq", checkpoint formats gptq and gptq_v2): every decoder
Linear as 4- or 8-bit integers, stored transposed (rows of inputs or groups, columns of outputs).

    qweight  (in / per, out) int32, `per` = 32 / bits inputs to a word in IntWeight's bit order
    scales   (groups, out)
    qzeros   (groups, out / per) int32, packed along the outputs; the "gptq" format stores zero - 1
    g_idx    (in,) each input column's group, with desc_act (act-order)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.dequant_matmul import unpack
from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.int_packed import Blocks, IntFormat, IntWeight, read_packed, stored_blocks
from raytp.model.quant.base import QuantConfig, StoredTensor
from raytp.model.slice import Slice


@dataclass(frozen=True)
class GPTQ(QuantConfig):
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

    @property
    def format(self) -> WeightFormat:
        return IntFormat(self)

    def describe(self) -> str:
        return self.describe_int() + ", GPTQ layout"

    def stored_tensors(self, name: str, shape: tuple[int, int]) -> dict[str, StoredTensor]:
        (out, inp), base = shape, name.removesuffix("weight")
        per, groups = 32 // self.bits, -(-inp // self.group_size) if self.group_size else 1
        stored = {base + "qweight": StoredTensor((-(-inp // per), out), torch.int32),
                  base + "scales": StoredTensor((groups, out), torch.float32)}
        if not self.symmetric:
            stored[base + "qzeros"] = StoredTensor((groups, -(-out // per)), torch.int32)
        if self.act_order:
            stored[base + "g_idx"] = StoredTensor((inp,), torch.int32)
        return stored

    def read(self, reader: WeightReader, s: Slice) -> IntWeight:
        return read_packed(self, reader, s)

    # Where the tensors lie (`raytp.model.formats.int_packed.PackedLayout`): transposed

    def packed_blocks(self, reader: WeightReader, module: str, out: int, inp: int) -> Blocks:
        shape = (out, -(-inp // (32 // self.bits)))
        return stored_blocks(reader, f"{module}.qweight", shape, transposed=True, stored=True)

    def scale_blocks(self, reader: WeightReader, module: str, out: int, groups: int) -> Blocks:
        return stored_blocks(reader, f"{module}.scales", (out, groups), transposed=True, stored=False)

    def zero_points(self, reader: WeightReader, module: str, out: int, inp: int, words: range) -> torch.Tensor:
        name = f"{module}.qzeros"
        shape = self.stored_tensors(f"{module}.weight", (out, inp))[name].shape
        raw = reader.read(Slice(name, shape, range(shape[0]), words), stored=True)  # (groups, row words)
        return unpack(raw, self.bits).t() + self.zero_offset

    def g_idx_name(self, module: str) -> str:
        return f"{module}.g_idx"
