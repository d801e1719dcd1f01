"""What GPTQ and AWQ checkpoints share: AutoGPTQ's tensors, which AutoAWQ kept, stored transposed (rows of inputs
or groups, columns of outputs).

    qweight  packed integers: each method packs them its own way (gptq.py, awq.py)
    scales   (groups, out)
    qzeros   (groups, out / per) int32, packed along the outputs, `per` = 32 / bits to a word (AWQ: per = 8)
    g_idx    (in,) each input column's group, with act-order (GPTQ's desc_act)

A method fills in its qweight's shape and blocks and how its zero-point words unpack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.int_packed import Blocks, IntFormat, IntWeight, read_packed, stored_blocks
from raytp.model.quant.base import QuantConfig, StoredTensor
from raytp.model.slice import Slice


@dataclass(frozen=True)
class AutoGPTQLayout(QuantConfig):
    """A `PackedLayout` (`raytp.model.formats.int_packed`) for AutoGPTQ's tensors, but for qweight's."""

    def qweight_shape(self, out: int, inp: int) -> tuple[int, int]:
        """The stored shape of the packed integers of an (out, inp) matrix."""
        raise NotImplementedError

    def unpack_zero_words(self, words: torch.Tensor) -> torch.Tensor:
        """Stored zero-point words (groups, n) -> the zero points (n * per, groups) of those n words' output rows."""
        raise NotImplementedError

    @property
    def format(self) -> WeightFormat:
        return IntFormat(self)

    def stored_tensors(self, name: str, shape: tuple[int, int]) -> dict[str, StoredTensor]:
        (out, inp), base = shape, name.removesuffix("weight")
        per, groups = 32 // self.bits, -(-inp // self.group_size) if self.group_size else 1
        stored = {base + "qweight": StoredTensor(self.qweight_shape(out, inp), torch.int32),
                  base + "scales": StoredTensor((groups, out), torch.float32)}
        if not self.symmetric:
            stored[base + "qzeros"] = StoredTensor((groups, -(-out // per)), torch.int32)
        if self.act_order:
            stored[base + "g_idx"] = StoredTensor((inp,), torch.int32)
        return stored

    def read(self, reader: WeightReader, s: Slice) -> IntWeight:
        return read_packed(self, reader, s)

    def scale_blocks(self, reader: WeightReader, module: str, out: int, groups: int) -> Blocks:
        return stored_blocks(reader, f"{module}.scales", (out, groups), transposed=True, stored=False)

    def zero_points(self, reader: WeightReader, module: str, out: int, inp: int, words: range) -> torch.Tensor:
        name = f"{module}.qzeros"
        shape = self.stored_tensors(f"{module}.weight", (out, inp))[name].shape
        return self.unpack_zero_words(reader.read(Slice(name, shape, range(shape[0]), words), stored=True))

    def g_idx_name(self, module: str) -> str:
        return f"{module}.g_idx"
