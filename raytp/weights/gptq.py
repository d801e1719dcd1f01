"""GPTQ checkpoints (GPTQModel / AutoGPTQ layout) -> IntWeight, converting only the rank's slice at load time.

What a quantized Linear `PREFIX` stores, for in_features x out_features, per = 32 // bits, n_groups groups:

    PREFIX.qweight  int32 (in / per, out)        packed along the inputs: input i in bits bits * (i % per) of word
                                                 i // per, the same order as IntWeight's, so converting is a
                                                 transpose of the rank's block of words
    PREFIX.qzeros   int32 (n_groups, out / per)  zero points packed along the outputs, same bit order
    PREFIX.scales   float16 (n_groups, out)
    PREFIX.g_idx    int32 (in,)                  the group of each input; a permutation of i // group_size when the
                                                 checkpoint was quantized with desc_act (act-order)

`checkpoint_format` "gptq" (AutoGPTQ's v1, the default) stores every zero point minus one, because AutoGPTQ's
kernels add the one back: each unpacked field gets + 1 here (per field, so a stored 15 reads as 16, as those kernels
read it). "gptq_v2" (GPTQModel's own) stores them as they are. Only 4 and 8 bits are read; 2/3 bits and other
packings are refused by `GPTQConfig.from_dict` with the list of what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raytp.model.formats import IntWeight, unpack
from raytp.model.layout import Slice

# (tensor name, rows, cols) -> that block of the stored tensor, as stored: a safetensors get_slice in practice
RawReader = Callable[[str, slice, "slice | None"], torch.Tensor]

FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1 in the config (one group per row) is kept as -1 and means in_features
    desc_act: bool
    sym: bool
    checkpoint_format: str = "gptq"

    @classmethod
    def from_dict(cls, q: dict) -> GPTQConfig:
        """From config.json's `quantization_config` (quant_method "gptq")."""
        c = cls(bits=q.get("bits", 4), group_size=q.get("group_size", 128), desc_act=bool(q.get("desc_act", False)),
                sym=bool(q.get("sym", True)), checkpoint_format=q.get("checkpoint_format", "gptq"))
        if c.bits not in (4, 8):
            raise ValueError(f"GPTQ bits={c.bits} is not supported: raytp reads 4- and 8-bit GPTQ checkpoints")
        if c.checkpoint_format not in FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {c.checkpoint_format!r} is not supported: raytp reads "
                             f"{' and '.join(FORMATS)} (re-save the model with GPTQModel in one of them)")
        if q.get("pack_dtype", "int32") != "int32":
            raise ValueError(f"GPTQ pack_dtype {q['pack_dtype']!r} is not supported: raytp reads int32 packing")
        return c


def read_gptq(raw: RawReader, s: Slice, config: GPTQConfig, dtype: torch.dtype, device: torch.device) -> IntWeight:
    """The IntWeight of slice `s` of the Linear weight `s.name` (rows `s.rows` of its outputs, columns `s.cols` of
    its inputs, as for a dense weight), reading only that block of each GPTQ tensor."""
    prefix = s.name.removesuffix(".weight")
    out_features, in_features = s.shape
    per = 32 // config.bits
    rows = slice(s.rows.start, s.rows.stop)
    cols = s.cols if s.cols is not None else range(in_features)
    if cols.start % per or cols.stop % per:
        raise ValueError(f"{s.name}: input columns [{cols.start}, {cols.stop}) do not start and end on the "
                         f"{per}-column words of {config.bits}-bit GPTQ packing")
    group_size = config.group_size if config.group_size > 0 else in_features
    packed = raw(f"{prefix}.qweight", slice(cols.start // per, cols.stop // per), rows).t()
    g_idx = raw(f"{prefix}.g_idx", slice(cols.start, cols.stop), None).long() if config.desc_act else None
    if g_idx is not None and not cols:
        g_idx = None
    contiguous = torch.arange(cols.start, cols.stop) // group_size
    if g_idx is not None and torch.equal(g_idx, contiguous):
        g_idx = None  # desc_act was set but the order is the identity: plain contiguous groups
    if g_idx is None:
        first, last = cols.start // group_size, (max(cols.stop, cols.start + 1) - 1) // group_size
    else:
        first, last = int(g_idx.min()), int(g_idx.max())
    groups = slice(first, last + 1)
    scales = raw(f"{prefix}.scales", groups, rows).t()
    zeros = _zeros(raw(f"{prefix}.qzeros", groups, slice(s.rows.start // per, -(-s.rows.stop // per))),
                   config, s.rows.start % per, len(s.rows)).t()
    if config.sym and torch.all(zeros == 1 << (config.bits - 1)):
        zeros = None  # the symmetric midpoint IntWeight assumes: no zero points to store or read
    to = dict(device=device)
    return IntWeight(packed.contiguous().to(**to), scales.to(dtype=dtype, **to).contiguous(),
                     None if zeros is None else zeros.to(dtype=dtype, **to).contiguous(), config.bits, group_size,
                     group_start=cols.start - first * group_size if g_idx is None else 0,
                     g_idx=None if g_idx is None else (g_idx - first).int().to(**to))


def _zeros(qzeros: torch.Tensor, config: GPTQConfig, offset: int, width: int) -> torch.Tensor:
    """Packed zero points (groups, words covering the rows) -> integer zero points (groups, width)."""
    zeros = unpack(qzeros, config.bits)[:, offset:offset + width]
    return zeros + 1 if config.checkpoint_format == "gptq" else zeros
