"""compressed-tensors checkpoints (llmcompressor, quant_method "compressed-tensors"): one config group quantizing the
Linear layers.

    pack-quantized    int4/int8 packed along the inputs in int32 words (`weight_packed` (out, in / per)), scales
                      `weight_scale` (out, groups) per group or channel, symmetric or with `weight_zero_point`
                      (out / per, groups) packed along the outputs, act-order `weight_g_idx` (in,): W4A16, W8A16
    float-quantized   float8 e4m3 `weight` (out, in) with float32 `weight_scale` (out, 1) per channel or (1,) per
                      tensor: FP8
    dynamic           float8 e4m3 (float-quantized) or int8 (int-quantized) `weight` (out, in) with channel scales
                      and activations quantized per token at run time: FP8_DYNAMIC, W8A8

Every tensor is stored in IntWeight's and FP8Weight's own orientation (rows are outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.dequant_matmul import unpack
from raytp.model.errors import UnsupportedModelError
from raytp.model.formats.act_quant import ActQuantFormat, ActQuantWeight
from raytp.model.formats.base import WeightFormat, WeightReader
from raytp.model.formats.fp8 import FP8Format, FP8Weight
from raytp.model.formats.int_packed import Blocks, IntFormat, IntWeight, read_packed, stored_blocks
from raytp.model.quant.base import QuantConfig, StoredTensor
from raytp.model.slice import Slice

ACT_ORDERS = (None, "static", "weight", "group", "dynamic")  # the actorder values raytp reads
GROUP_ORDERS = ("group", "dynamic")  # those that give each input column its group (weight_g_idx)


@dataclass(frozen=True)
class CompressedTensors(QuantConfig):
    quant_method = "compressed-tensors"
    supported = ("compressed-tensors checkpoints (llmcompressor) quantizing the Linear layers, weight-only: "
                 "pack-quantized int4/int8 with group or channel scales, symmetric or with zero points, act-order "
                 "group or none (W4A16, W8A16), or float8 e4m3 weights with channel or tensor scales (FP8); or with "
                 "activations quantized per token at run time (dynamic, symmetric, 8 bits: FP8_DYNAMIC and W8A8), "
                 "float8 e4m3 weights or int8 weights (int-quantized) with channel scales")

    @classmethod
    def from_config(cls, q: dict) -> CompressedTensors:
        groups = q.get("config_groups") or {}

        def refuse(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(f"unsupported compressed-tensors quantization: {what}")

        if len(groups) != 1:
            raise refuse(f"{len(groups)} config_groups (raytp reads exactly one)")
        group = next(iter(groups.values()))
        w = group.get("weights") or {}
        if group.get("targets") != ["Linear"]:
            raise refuse(f"targets={group.get('targets')} (raytp reads ['Linear'])")
        if group.get("output_activations"):
            raise refuse("output_activations are quantized (raytp quantizes weights, and activations only at the "
                         "inputs of the Linear layers)")
        dynamic = _dynamic_activations(group.get("input_activations"), w, refuse)
        for what in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if q.get(what):
                raise refuse(f"{what}={q[what]}")
        fmt = group.get("format") or q.get("format")
        kind, bits, strategy, actorder = w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("actorder")
        ignore = tuple(q.get("ignore") or ())
        if dynamic:
            if not ((kind, fmt) in (("float", "float-quantized"), ("int", "int-quantized")) and bits == 8
                    and strategy == "channel" and w.get("symmetric", True)):
                raise refuse(f"format={fmt!r} with {kind} {bits}-bit weights, strategy={strategy!r}, and quantized "
                             f"activations (raytp reads them with float-quantized or int-quantized 8-bit symmetric "
                             f"weights, strategy channel)")
            config = cls("fp8" if kind == "float" else "int", 8, None, ignore=ignore, dynamic_activations=True)
        elif kind == "int" and fmt == "pack-quantized" and bits in (4, 8) and strategy in ("group", "channel"):
            if actorder not in ACT_ORDERS:
                raise refuse(f"actorder={actorder!r}")
            config = cls("int", bits, w.get("group_size") if strategy == "group" else None,
                         symmetric=bool(w.get("symmetric", True)), act_order=actorder in GROUP_ORDERS,
                         ignore=ignore)
            if strategy == "group" and not (isinstance(config.group_size, int) and config.group_size > 0):
                raise refuse(f"group strategy with group_size={w.get('group_size')!r}")
        elif (kind == "float" and fmt in ("float-quantized", "naive-quantized") and bits == 8
              and strategy in ("channel", "tensor") and w.get("symmetric", True)):
            config = cls("fp8", 8, None, per_tensor=strategy == "tensor", ignore=ignore)
        else:
            raise refuse(f"format={fmt!r} with {kind} {bits}-bit weights, strategy={strategy!r}")
        if config.quantizes("lm_head"):
            raise refuse("lm_head is quantized (raytp keeps it dense: add it to ignore)")
        return config

    @property
    def packed(self) -> bool:
        """Integers packed into words (pack-quantized), not 8-bit values one to a byte."""
        return self.kind == "int" and not self.dynamic_activations

    @property
    def format(self) -> WeightFormat:
        if self.dynamic_activations:
            return ActQuantFormat(self)
        return IntFormat(self) if self.packed else FP8Format(self)

    def describe(self) -> str:
        if self.dynamic_activations:
            name, kind = ("fp8-dynamic", "fp8 e4m3") if self.kind == "fp8" else ("w8a8", "int8")
            return f"{name}: {kind} weights, per-channel scales, activations quantized to {kind} per token at run time"
        if self.packed:
            return self.describe_int()
        return f"fp8 e4m3 weights, {'per-tensor' if self.per_tensor else 'per-channel'} scales"

    def stored_tensors(self, name: str, shape: tuple[int, int]) -> dict[str, StoredTensor]:
        (out, inp), base = shape, name.removesuffix("weight")
        if not self.packed:
            values = torch.int8 if self.kind == "int" else torch.float8_e4m3fn
            return {base + "weight": StoredTensor(shape, values),
                    base + "weight_scale": StoredTensor((1,) if self.per_tensor else (out, 1), torch.float32)}
        per, groups = 32 // self.bits, -(-inp // self.group_size) if self.group_size else 1
        stored = {base + "weight_packed": StoredTensor((out, -(-inp // per)), torch.int32),
                  base + "weight_scale": StoredTensor((out, groups), torch.float32),
                  base + "weight_shape": StoredTensor((2,), torch.int64)}
        if not self.symmetric:
            stored[base + "weight_zero_point"] = StoredTensor((-(-out // per), groups), torch.int32)
        if self.act_order:
            stored[base + "weight_g_idx"] = StoredTensor((inp,), torch.int32)
        return stored

    def read(self, reader: WeightReader, s: Slice) -> IntWeight | FP8Weight | ActQuantWeight:
        if self.packed:
            return read_packed(self, reader, s)
        base = s.name.removesuffix("weight")
        weight = reader.read(Slice(base + "weight", s.shape, s.rows, s.cols), stored=True)
        want = torch.int8 if self.kind == "int" else torch.float8_e4m3fn
        if weight.dtype != want:
            raise ValueError(f"{s.name} is stored as {weight.dtype}; config.json's quantization_config implies {want} "
                             f"weights: the weights and config.json do not belong together")
        scale_name = base + "weight_scale"
        if self.per_tensor:
            scale = reader.read(Slice(scale_name, (1,), range(1)), stored=True).reshape(())
        else:
            scale = reader.read(Slice(scale_name, (s.shape[0], 1), s.rows), stored=True)
        if self.dynamic_activations:
            return ActQuantWeight(weight.contiguous(), scale.float().contiguous())
        return FP8Weight(weight, scale.float())

    # Where pack-quantized tensors lie (`raytp.model.formats.int_packed.PackedLayout`): as IntWeight holds them

    def packed_blocks(self, reader: WeightReader, module: str, out: int, inp: int) -> Blocks:
        shape = (out, -(-inp // (32 // self.bits)))
        return stored_blocks(reader, f"{module}.weight_packed", shape, transposed=False, stored=True)

    def scale_blocks(self, reader: WeightReader, module: str, out: int, groups: int) -> Blocks:
        return stored_blocks(reader, f"{module}.weight_scale", (out, groups), transposed=False, stored=False)

    def zero_points(self, reader: WeightReader, module: str, out: int, inp: int, words: range) -> torch.Tensor:
        name = f"{module}.weight_zero_point"
        raw = reader.read(Slice(name, self.stored_tensors(f"{module}.weight", (out, inp))[name].shape, words),
                          stored=True)  # (row words, groups)
        return unpack(raw.t().contiguous(), self.bits).t()

    def g_idx_name(self, module: str) -> str:
        return f"{module}.weight_g_idx"


def _dynamic_activations(a: dict | None, w: dict, refuse) -> bool:
    """Whether `input_activations` are quantized at run time in the one way raytp runs: per token, symmetric, 8 bits
    of the weights' type (what llmcompressor's FP8_DYNAMIC and W8A8 write)."""
    if not a:
        return False
    what = {"dynamic": True, "strategy": "token", "symmetric": True, "num_bits": 8, "type": w.get("type")}
    defaults = {"symmetric": True, "num_bits": 8, "type": "int"}  # compressed-tensors' QuantizationArgs'
    given = {k: a.get(k, defaults.get(k)) for k in what}
    wrong = {k: v for k, v in given.items() if v != what[k]}
    if wrong:
        raise refuse(f"input_activations with {', '.join(f'{k}={v!r}' for k, v in wrong.items())} (raytp quantizes "
                     f"activations dynamically per token, symmetric, 8 bits of the weights' type; static or "
                     f"calibrated activation scales are not read)")
    return True
