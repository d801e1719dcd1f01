"""The contract of a layer kind: a shared building block of decoders, declared to the planner next to its forward.

A decoder layer is a token mixer (full attention, sliding-window attention; a linear attention) followed by a
feed-forward block (a dense MLP, a mixture of experts). Each kind lives in one file with its forward
(`raytp.model.attention`, `raytp.model.mlp`, `raytp.model.moe`) and says, for one layer of a config:

    layout      which tensors and which of their rows and columns a rank holds, under the family's tensor prefix
    pieces      the dimensions it splits (`raytp.parallel.plan.Piece`): unit, block, the bytes a unit costs a rank in
                the weight format the layer is held in, the per-sequence state a unit keeps (`cache`, named), what a
                decode step reads; a piece another kind also splits (the KV groups of full and sliding layers) is
                added up by name (`raytp.parallel.plan.sum_pieces`)
    replicated_bytes   quantization data it keeps whole on every rank, whatever the split
    buffer_bytes       its working activations for one step of the plan's shape (an upper bound of any rank's)
    state       the per-layer state it allocates for a rank (`raytp.model.state.LayerState`), or None
    view        (a token mixer) what its layers read of a step, computed once per step for all of them
    load        its forward for a rank, reading its slices; a mixer is called (normed input, positions, slots,
                step) and finds its RoPE angles in step.rope[name] and its view in step.views[name], a feed-forward
                block is called (normed input); both return their output summed over the ranks

The planner sums the declarations of the layers a config lists (`raytp.model.pieces`); it has no formula of any
model. Adding a kind is its file and one line in `raytp.model.layout.MIXERS` (or the feed-forward choice there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raytp.model.formats import weight_format
from raytp.parallel.plan import DTYPE_BYTES, Piece, PlanShape


class LayerKind(Protocol):
    name: str

    def layout(self, config, shard, prefix: str) -> Any: ...

    def pieces(self, config, shape: PlanShape) -> Sequence[Piece]: ...

    def replicated_bytes(self, config, shape: PlanShape) -> int: ...

    def buffer_bytes(self, config, shape: PlanShape) -> int: ...

    def state(self, config, shard, *, max_batch: int, max_context: int, kv_dtype: str, dtype, device): ...

    def view(self, config, positions, span: int, max_context: int) -> Any: ...

    def load(self, config, layout, comm, reader, state, act_quant_weight_only: bool): ...


def linear_quant(config):
    """The checkpoint method the config's Linear layers are stored in, or None (the model dtype)."""
    return config.quant if config.quant is not None and config.quant.linears else None


@dataclass(frozen=True)
class LinearBytes:
    """What the Linear layers of a config cost per row and column in the format they are held in (every decoder
    Linear counts as quantized when the config's method quantizes Linear layers): the arithmetic the kinds'
    declarations share."""

    row: int  # one output row of a column-parallel matrix (q/k/v, gate/up) of input width `hidden`
    column: int  # one input column's values of a row-parallel matrix (o_proj, down_proj) of `hidden` rows
    group: int | None  # input columns per scale group of a row-parallel matrix (None: per-row scales or none)
    group_entry: int  # one group's scale (and zero point) bytes for one row
    act_order: bool
    nbytes: int  # the model dtype's element

    @classmethod
    def of(cls, config, shape: PlanShape, hidden: int | None = None) -> LinearBytes:
        q, nbytes = linear_quant(config), DTYPE_BYTES[shape.dtype]
        fmt, h = weight_format(q), hidden or config.hidden_size
        grouped = q is not None and q.group_size is not None
        return cls(fmt.row_bytes(h, nbytes), fmt.column_bytes(h, nbytes), q.group_size if grouped else None,
                   fmt.group_entry_bytes(nbytes) if grouped else 0, grouped and q.act_order, nbytes)

    def head_columns(self, cols: int, hidden: int) -> int:
        """A head's `cols` input columns of a row-parallel matrix of `hidden` rows whose columns follow heads (o_proj,
        out_proj): their values, and with act-order each column's group index (int32; the scales are then
        replicated, `head_columns_replicated`), else the scales of the groups they start."""
        if self.group is None:
            return cols * self.column
        if self.act_order:
            return cols * (self.column + 4)
        return cols * self.column + -(-cols // self.group) * hidden * self.group_entry

    def head_columns_replicated(self, config, shape: PlanShape, cols: int, all_cols: int) -> int:
        """What every rank keeps whole of such a matrix of `all_cols` columns, `cols` a head's, and of the
        column-parallel matrices before it: per-row scales; with act-order the group index of those matrices' input
        columns (int32) and the scales of all this matrix's column groups (its columns stay in head order); else a
        group that two ranks' head ranges share, where head boundaries are not group boundaries."""
        h = config.hidden_size
        if self.group is None:
            return self.row_scales(config, shape)
        if self.act_order:
            return h * 4 + h * -(-all_cols // self.group) * self.group_entry
        return h * self.group_entry if cols % self.group else 0

    def row_scales(self, config, shape: PlanShape) -> int:
        """One row-parallel matrix's per-row scales (or none): replicated, as every rank computes every row."""
        return weight_format(linear_quant(config)).row_scale_bytes(config.hidden_size, DTYPE_BYTES[shape.dtype])
