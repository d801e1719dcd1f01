"""AWQ checkpoints (AutoAWQ, quant_method "awq", version "gemm"): 4-bit integers with zero points in AutoGPTQ's
tensors (autogptq.py), stored transposed and packed along the outputs.

    qweight  (in, out / 8) int32, 8 outputs to a word in AWQ_ORDER
    qzeros   packed like qweight

`modules_to_not_convert` names modules left dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.dequant_matmul import unpack
from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.base import WeightReader
from raytp.model.formats.int_packed import Blocks, pack
from raytp.model.quant.autogptq import AutoGPTQLayout
from raytp.model.quant.base import modules_matching
from raytp.model.slice import Slice

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble s of an AWQ word holds output AWQ_ORDER[s] of its 8


@dataclass(frozen=True)
class AWQ(AutoGPTQLayout):
    quant_method = "awq"
    supported = "AWQ checkpoints (AutoAWQ): 4 bits with zero points, version 'gemm'"

    @classmethod
    def from_config(cls, q: dict) -> AWQ:
        bits, version = q.get("bits", q.get("w_bit", 4)), str(q.get("version", "gemm")).lower()
        group_size = q.get("group_size", q.get("q_group_size", 128))
        if bits != 4 or version != "gemm" or not q.get("zero_point", True) or not (
                isinstance(group_size, int) and group_size > 0):
            raise UnsupportedModelError(f"unsupported AWQ quantization: bits={bits} version={version!r} "
                                        f"zero_point={q.get('zero_point', True)} group_size={group_size!r}")
        return cls("int", 4, group_size, symmetric=False, ignore=modules_matching(q.get("modules_to_not_convert")))

    def describe(self) -> str:
        return self.describe_int() + ", AWQ layout"

    def qweight_shape(self, out: int, inp: int) -> tuple[int, int]:
        return inp, -(-out // 8)

    def packed_blocks(self, reader: WeightReader, module: str, out: int, inp: int) -> Blocks:
        """Blocks of qweight (inp, out / 8) as IntWeight's words along the inputs."""
        name = f"{module}.qweight"

        def read(rows: range, words: range | None) -> torch.Tensor:
            words = words if words is not None else range(-(-inp // 8))
            lo = rows.start // 8
            inputs = range(8 * words.start, min(8 * words.stop, inp))
            raw = reader.read(Slice(name, self.qweight_shape(out, inp), inputs, range(lo, -(-rows.stop // 8))),
                              stored=True)
            if not rows or not words:
                return raw.new_empty((len(rows), len(words)))
            values = _unpack_outputs(raw)[:, rows.start - 8 * lo:rows.stop - 8 * lo]  # (inputs, rows)
            return pack(values.t().contiguous(), 4)

        return read

    def unpack_zero_words(self, words: torch.Tensor) -> torch.Tensor:
        return _unpack_outputs(words).t()


def _unpack_outputs(words: torch.Tensor) -> torch.Tensor:
    """Words packed along the outputs (n, words) -> the values (n, words * 8) in output order."""
    order = torch.tensor(AWQ_ORDER, device=words.device).argsort()  # output t of a word is in nibble order[t]
    return unpack(words, 4).view(len(words), -1, 8)[:, :, order].reshape(len(words), -1)
