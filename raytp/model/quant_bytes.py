"""What a Linear costs in each weight format, in one place: the tensors a checkpoint stores for it, and the bytes
a rank holds in memory once `raytp.model.formats` has read it (packed values, scales and zero points in the model
dtype, float8 values with float32 scales). The planner's bytes (`raytp.model.pieces`) and the model check
(`raytp.weights.source`) both count from here; torch is not needed to count.
"""

from __future__ import annotations

from raytp.model.config import QuantConfig

# The tensors an integer-quantized Linear stores, by layout: packed values, scales, zero points, group index.
# compressed-tensors stores them in IntWeight's orientation (output rows); GPTQ and AWQ store them transposed (rows
# of inputs or groups, columns of outputs): GPTQ's qweight packs along the inputs in IntWeight's bit order, AWQ's
# along the outputs in AWQ_ORDER; both pack their zero points along the outputs, as compressed-tensors does.
INT_TENSORS = {"compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
               "gptq": ("qweight", "scales", "qzeros", "g_idx"), "awq": ("qweight", "scales", "qzeros", None)}


def stored_shapes(name: str, shape: tuple[int, ...], quant: QuantConfig | None) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint stores for the matrix `name` ("...weight") of global `shape`, by name."""
    if quant is None:
        return {name: shape}
    q, (out, inp), base = quant, shape, name.removesuffix("weight")
    if q.kind == "fp8" or q.dynamic_activations:  # float-quantized, int-quantized: the 8-bit values unpacked
        return {base + "weight": (out, inp), base + "weight_scale": (1,) if q.per_tensor else (out, 1)}
    per, groups = 32 // q.bits, -(-inp // q.group_size) if q.group_size else 1
    packed, scale, zero, g_idx = (base + t if t else None for t in INT_TENSORS[q.layout])
    if q.layout == "compressed-tensors":
        shapes = {packed: (out, -(-inp // per)), scale: (out, groups), base + "weight_shape": (2,)}
        zeros = (-(-out // per), groups)
    else:
        shapes = {packed: (-(-inp // per), out) if q.layout == "gptq" else (inp, -(-out // per)), scale: (groups, out)}
        zeros = (groups, -(-out // per))
    if not q.symmetric:
        shapes[zero] = zeros
    if q.act_order:
        shapes[g_idx] = (inp,)
    return shapes


def group_entry_bytes(quant: QuantConfig, nbytes: int) -> int:
    """Bytes per output row and group of an integer-quantized matrix held in memory: its scale (and zero point),
    in the model dtype (`nbytes` each)."""
    return nbytes * (1 if quant.symmetric else 2)


def row_bytes(quant: QuantConfig, width: int, nbytes: int) -> int:
    """One output row of a quantized matrix holding all `width` of its input columns (column-parallel): packed
    values and the row's scales (float8, and int8 with dynamic activations: one byte per value unpacked, one float32
    scale per row; per-tensor scales become per-row when the q/k/v or gate/up parts fuse)."""
    if quant.kind == "fp8" or quant.dynamic_activations:
        return width + 4
    groups = -(-width // quant.group_size) if quant.group_size else 1
    return -(-width * quant.bits // 32) * 4 + groups * group_entry_bytes(quant, nbytes)


def column_bytes(quant: QuantConfig, height: int) -> int:
    """The values of one input column of a quantized matrix of `height` output rows (row-parallel: o_proj,
    down_proj), without its scales: packed integers, or one byte each for 8-bit weights."""
    return height if quant.kind == "fp8" else height * quant.bits // 8


def row_scale_bytes(quant: QuantConfig, height: int, nbytes: int) -> int:
    """The scales of a quantized matrix of `height` output rows with one scale per row (or per tensor), which a
    row-parallel split leaves whole on every rank."""
    if quant.kind == "fp8" or quant.dynamic_activations:
        return 4 if quant.per_tensor else 4 * height
    return height * group_entry_bytes(quant, nbytes)
