"""Fine-grained FP8 checkpoints (transformers' quant_method "fp8": Qwen3-*-FP8, DeepSeek-V3): float8 e4m3 weights
with one float32 scale per block of rows x columns.

    weight            (out, in) float8 e4m3
    weight_scale_inv  (ceil(out / block_rows), ceil(in / group_size)) float32, what the weight is multiplied by

Their config quantizes activations per token and group at run time ("dynamic"); raytp leaves them in the model
dtype, as transformers does where it dequantizes the weights (CPUs), a little more accurate. A rank holds the
scales of its slice one row of them per weight row (FP8Weight with groups), so that any split of the rows is exact.
`modules_to_not_convert` names modules left dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.fp8 import FP8Format, FP8Weight
from raytp.model.quant.base import QuantConfig, StoredTensor, modules_matching
from raytp.model.slice import Slice


@dataclass(frozen=True)
class FP8Blocks(QuantConfig):
    block_rows: int = 128  # output rows sharing one scale; `group_size` input columns share it too

    quant_method = "fp8"
    supported = ("fine-grained FP8 checkpoints (quant_method 'fp8', e4m3 weights with weight_block_size scales, as "
                 "Qwen and DeepSeek publish them), run weight-only")

    @classmethod
    def from_config(cls, q: dict) -> FP8Blocks:
        block, scheme, fmt = q.get("weight_block_size"), q.get("activation_scheme", "dynamic"), q.get("fmt", "e4m3")
        what = None
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            what = f"weight_block_size={block!r} (raytp reads two positive ints: rows, columns)"
        elif fmt != "e4m3":
            what = f"fmt={fmt!r}"
        elif scheme != "dynamic":
            what = f"activation_scheme={scheme!r} (static activation scales are not read)"
        if what:
            raise UnsupportedModelError(f"unsupported fp8 quantization: {what}")
        return cls("fp8", 8, block[1], block_rows=block[0], ignore=modules_matching(q.get("modules_to_not_convert")))

    @property
    def format(self) -> WeightFormat:
        return FP8Format(self)

    def describe(self) -> str:
        return f"fp8 e4m3 weights, {self.block_rows}x{self.group_size} block scales"

    def stored_tensors(self, name: str, shape: tuple[int, int]) -> dict[str, StoredTensor]:
        base, blocks = name.removesuffix("weight"), (-(-shape[0] // self.block_rows), -(-shape[1] // self.group_size))
        return {base + "weight": StoredTensor(shape, torch.float8_e4m3fn),
                base + "weight_scale_inv": StoredTensor(blocks, torch.float32)}

    def read(self, reader: WeightReader, s: Slice) -> FP8Weight:
        """The slice's weights and the block scales covering it, one row of them per weight row: only the slice's
        blocks are read."""
        base = s.name.removesuffix("weight")
        weight = reader.read(Slice(base + "weight", s.shape, s.rows, s.cols), stored=True)
        name = base + "weight_scale_inv"
        rows_per, group_size = self.block_rows, self.group_size
        cols = s.cols if s.cols is not None else range(s.shape[1])
        row_blocks = range(s.rows.start // rows_per, -(-s.rows.stop // rows_per)) if s.rows else range(0)
        groups = range(cols.start // group_size, -(-cols.stop // group_size)) if cols else range(0)
        blocks = reader.read(Slice(name, self.stored_tensors(s.name, s.shape)[name].shape, row_blocks, groups),
                             stored=True).float()
        local = torch.arange(s.rows.start, s.rows.stop) // rows_per - row_blocks.start
        scale = blocks[local.to(blocks.device)].contiguous()  # (rows, groups)
        return FP8Weight(weight, scale, group_size=group_size, group_start=cols.start - groups.start * group_size)
