"""AWQ checkpoints (AutoAWQ's GEMM layout) -> IntWeight, converting only the rank's slice at load time.

What a quantized Linear `PREFIX` stores, for in_features x out_features, 4 bits, n_groups = in / group_size:

    PREFIX.qweight  int32 (in, out / 8)        packed along the outputs, interleaved: nibble s of word w holds
                                               output 8 * w + AWQ_ORDER[s]
    PREFIX.qzeros   int32 (n_groups, out / 8)  zero points, packed the same way
    PREFIX.scales   float16 (n_groups, out)

W[o, i] = (q[i, o] - zero[i // group_size, o]) * scale[i // group_size, o]; no act-order, no offset on the zeros.
IntWeight packs along the inputs instead, so the rank's block is unpacked and packed again (once, at load time).
Only `version` "gemm" is read (GEMV and the Marlin/exllama variants store other layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.formats import IntWeight, unpack
from raytp.model.layout import Slice
from raytp.weights.gptq import RawReader

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble s of a word holds output AWQ_ORDER[s] of its 8
BITS = 4


@dataclass(frozen=True)
class AWQConfig:
    group_size: int

    @classmethod
    def from_dict(cls, q: dict) -> AWQConfig:
        """From config.json's `quantization_config` (quant_method "awq")."""
        bits, version = q.get("bits", q.get("w_bit", 4)), str(q.get("version", "gemm")).lower()
        if bits != BITS or version != "gemm" or not q.get("zero_point", True):
            raise ValueError(f"AWQ bits={bits} version={version!r} zero_point={q.get('zero_point', True)} is not "
                             f"supported: raytp reads 4-bit AWQ in the GEMM layout with zero points (version 'gemm')")
        return cls(group_size=q.get("group_size", q.get("q_group_size", 128)))


def unpack_awq_outputs(packed: torch.Tensor) -> torch.Tensor:
    """int32 (n, words) packed along the outputs in AWQ's order -> the values, int32 (n, 8 * words) in output
    order."""
    values = unpack(packed, BITS).view(packed.shape[0], -1, 8)  # [.., word, nibble]
    order = torch.tensor(AWQ_ORDER).argsort()  # output t of a word is in nibble argsort(AWQ_ORDER)[t]
    return values[:, :, order].reshape(packed.shape[0], -1)


def pack_inputs(values: torch.Tensor) -> torch.Tensor:
    """int (out, in) values of 4 bits -> int32 (out, in / 8), input j in bits 4 * (j % 8) of word j // 8."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (values.long().view(values.shape[0], -1, 8) << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).int()  # the same 32 bits, as int32


def read_awq(raw: RawReader, s: Slice, config: AWQConfig, dtype: torch.dtype, device: torch.device) -> IntWeight:
    """The IntWeight of slice `s` of the Linear weight `s.name` (rows = outputs, cols = inputs, as for a dense
    weight), reading only the words that cover that block."""
    prefix = s.name.removesuffix(".weight")
    out_features, in_features = s.shape
    cols = s.cols if s.cols is not None else range(in_features)
    if cols.start % 8 or cols.stop % 8:
        raise ValueError(f"{s.name}: input columns [{cols.start}, {cols.stop}) do not start and end on multiples of "
                         f"8, which IntWeight's packing needs")
    words = slice(s.rows.start // 8, -(-s.rows.stop // 8))
    offset, width = s.rows.start % 8, len(s.rows)
    q = unpack_awq_outputs(raw(f"{prefix}.qweight", slice(cols.start, cols.stop), words))[:, offset:offset + width]
    first, last = cols.start // config.group_size, (max(cols.stop, cols.start + 1) - 1) // config.group_size
    groups = slice(first, last + 1)
    scales = raw(f"{prefix}.scales", groups, slice(s.rows.start, s.rows.stop)).t()
    zeros = unpack_awq_outputs(raw(f"{prefix}.qzeros", groups, words))[:, offset:offset + width].t()
    to = dict(device=device)
    return IntWeight(pack_inputs(q.t()).to(**to), scales.to(dtype=dtype, **to).contiguous(),
                     zeros.to(dtype=dtype, **to).contiguous(), BITS, config.group_size,
                     group_start=cols.start - first * config.group_size)
