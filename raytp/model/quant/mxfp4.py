"""MXFP4 checkpoints (gpt-oss; transformers' quant_method "mxfp4"): every expert's gate_up_proj and down_proj as
4-bit e2m1 values with one e8m0 scale per 32 input columns, each projection of every expert in one tensor.

    <experts>.gate_up_proj_blocks  (experts, 2 * expert width, hidden / 32, 16) uint8, two values to a byte
    <experts>.gate_up_proj_scales  (experts, 2 * expert width, hidden / 32) uint8
    <experts>.down_proj_blocks     (experts, hidden, expert width / 32, 16) uint8
    <experts>.down_proj_scales     (experts, hidden, expert width / 32) uint8

Rows are outputs, as transformers' `convert_moe_packed_tensors` reads them (it transposes to (experts, in, out)
after dequantizing). The layout names a projection by its dense tensor, "<experts>.gate_up_proj", of shape
(experts, out, in), with `Slice.stacked`. Everything else (attention, router, embeddings, lm_head) is stored in the
model dtype: transformers converts the experts only, less `modules_to_not_convert`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from raytp.kernels.mxfp4 import GROUP
from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.mxfp4 import MXFP4Format, MXFP4Weight
from raytp.model.quant.base import QuantConfig, StoredTensor
from raytp.model.slice import Slice

BYTES_PER_GROUP = GROUP // 2
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")  # the tensors of an experts module that MXFP4 stores


@dataclass(frozen=True)
class MXFP4(QuantConfig):
    quant_method = "mxfp4"
    supported = "MXFP4 checkpoints (gpt-oss): experts in e2m1 with e8m0 scales per 32 values"
    linears = False  # attention, routers and embeddings stay in the model dtype

    @classmethod
    def from_config(cls, q: dict) -> MXFP4:
        unknown = sorted(set(q) - {"quant_method", "modules_to_not_convert"})
        if unknown:
            raise UnsupportedModelError(f"unsupported mxfp4 quantization: {', '.join(unknown)} (raytp reads "
                                        f"modules_to_not_convert)")
        return cls("mxfp4", 4, GROUP, ignore=tuple(q.get("modules_to_not_convert") or ()))

    @property
    def format(self) -> WeightFormat:
        return MXFP4Format(self)

    def describe(self) -> str:
        return "mxfp4 experts: e2m1 values, e8m0 scales per 32"

    def quantizes(self, module: str) -> bool:
        """An experts projection ("model.layers.0.mlp.experts.down_proj") whose experts module is not in
        modules_to_not_convert, matched as transformers' `should_convert_module` does: from the start to a module
        boundary, as a regular expression, or as a suffix."""
        experts, _, projection = module.rpartition(".")
        if projection not in EXPERT_PROJECTIONS or not experts.endswith(".experts"):
            return False
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{key}){boundary}", experts) or experts.endswith(key) for key in self.ignore)

    def stored_tensors(self, name: str, shape: tuple[int, ...]) -> dict[str, StoredTensor]:
        """`name` a projection of every expert ("...experts.down_proj"), `shape` (experts, out, in)."""
        experts, out, inp = shape
        if inp % GROUP:
            raise UnsupportedModelError(f"{name}: {inp} input columns are not whole groups of {GROUP}, as MXFP4 "
                                        f"stores them")
        groups = inp // GROUP
        # the scales are e8m0 values, stored (and read) as their bytes
        return {name + "_blocks": StoredTensor((experts, out, groups, BYTES_PER_GROUP), torch.uint8),
                name + "_scales": StoredTensor((experts, out, groups), torch.float8_e8m0fnu)}

    def read(self, reader: WeightReader, s: Slice) -> MXFP4Weight:
        """Rows `s.rows` and input columns `s.cols` of every expert, the columns in whole groups of 32: only their
        bytes are read."""
        inp = s.shape[2]
        cols = s.cols if s.cols is not None else range(inp)
        if cols.start % GROUP or (cols.stop % GROUP and cols.stop != inp):
            raise ValueError(f"{s.name}: a rank's input columns {cols.start}..{cols.stop} are not whole groups of "
                             f"{GROUP} values; MXFP4 experts split their columns in multiples of {GROUP}")
        groups = range(cols.start // GROUP, -(-cols.stop // GROUP))
        stored = self.stored_tensors(s.name, s.shape)
        blocks_name, scales_name = s.name + "_blocks", s.name + "_scales"
        blocks = reader.read(Slice(blocks_name, stored[blocks_name].shape, s.rows, groups, stacked=True),
                             stored=True)
        scales = reader.read(Slice(scales_name, stored[scales_name].shape, s.rows, groups, stacked=True),
                             stored=True)
        for name, t in ((blocks_name, blocks), (scales_name, scales)):
            if t.dtype != torch.uint8:
                raise ValueError(f"{name} is stored as {t.dtype}; MXFP4 stores uint8: the weights and config.json "
                                 f"do not belong together")
        return MXFP4Weight(blocks.flatten(-2).contiguous(), scales.contiguous())  # (experts, rows, bytes)
