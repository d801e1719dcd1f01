"""One rank's slice of a Gated DeltaNet layer (Qwen3.5's linear attention) and its per-sequence state.

The split follows key heads as attention's follows KV groups: a rank holds a contiguous range of key heads, each
with its query head and the `value_heads / key_heads` value heads it serves, so no head's recurrence ever crosses
ranks. Any range may be empty: that rank adds zeros to the out_proj all-reduce.

    in_proj     column-parallel, one matmul: rows of in_proj_qkv (its q, k and v rows of the rank's heads),
                in_proj_z (the output gate, per value channel), in_proj_b (beta) and in_proj_a (decay), per value head
    conv1d      depthwise causal convolution over the q/k/v channels, kernel `conv_kernel`, then SiLU
    delta rule  raytp.kernels.gated_delta_rule, with beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)
    norm        RMSNorm of each value head's output (weight `norm`, value dim, held whole), times SiLU(z)
    out_proj    row-parallel: partial (batch, seq, hidden) sums              -> the layer's all-reduce

Each sequence slot keeps, per layer, the last conv_kernel - 1 inputs of the convolution (model dtype) and the
recurrent state (value heads, key dim, value dim) in float32: `LinearAttentionState`, whose bytes the planner
counts per key head (`state_bytes`). A forward whose first position is 0 starts its sequences from zero state, so a
slot needs no reset when it passes to a new request. The math follows transformers' Qwen3_5GatedDeltaNet.

A verify step (speculative decoding) runs its positions token by token from the slots' state and writes none of
them: only once the ranks know how many positions each row keeps does the state take those in
(`LinearAttentionState.keep`, through `ShardedLlama.keep_verified`), as plain decoding would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.gated_delta_rule import CHUNK, chunk_gated_delta_rule, recurrent_gated_delta_rule
from raytp.model.config_fields import LinearAttentionDims
from raytp.model.formats import WeightReader
from raytp.model.layers import ColumnParallelLinear, RowParallelLinear
from raytp.model.slice import Slice, linear, whole
from raytp.model.kinds import LinearBytes
from raytp.model.quant.base import QuantConfig
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import PREFILL_CHUNK, Piece, PlanShape, Span

# The piece a linear-attention layer splits, and the value heads that follow it (value_heads / key_heads a unit)
LINEAR_KEY_HEADS, LINEAR_VALUE_HEADS = "linear_key_heads", "linear_value_heads"


@dataclass(frozen=True)
class LinearAttentionLayout:
    """A rank's tensors of one Gated DeltaNet: slices of the key-head range `key_heads`."""

    key_heads: range
    in_proj: tuple[Slice, ...]  # fused in this order: q, k, v rows of in_proj_qkv, then in_proj_z, _b, _a rows
    conv: tuple[Slice, ...]  # conv1d.weight rows (channels, 1, kernel) of the same q, k, v channels
    A_log: Slice  # (value heads,), the rank's value heads
    dt_bias: Slice
    norm: Slice  # (value dim,), whole on every rank
    out_proj: Slice  # input columns of the rank's value channels

    def slices(self) -> Iterator[Slice]:
        yield from (*self.in_proj, *self.conv, self.A_log, self.dt_bias, self.norm, self.out_proj)


def linear_attention_layout(prefix: str, dims: LinearAttentionDims, hidden: int, key_heads: range,
                            quant: QuantConfig | None = None) -> LinearAttentionLayout:
    """The slices of `key_heads` of the Gated DeltaNet whose tensors are `<prefix>in_proj_qkv.weight`, ...; its
    Linear layers stored quantized where `quant` quantizes them."""
    d = dims
    K, V, r = d.key_dim, d.value_dim, d.values_per_key
    key_all, value_all = d.key_heads * K, d.value_heads * V
    conv_all = 2 * key_all + value_all
    q = range(key_heads.start * K, key_heads.stop * K)
    v = range(key_heads.start * r * V, key_heads.stop * r * V)
    heads = range(key_heads.start * r, key_heads.stop * r)  # the value heads
    qkv = (q, range(key_all + q.start, key_all + q.stop), range(2 * key_all + v.start, 2 * key_all + v.stop))
    split = LINEAR_KEY_HEADS
    return LinearAttentionLayout(
        key_heads=key_heads,
        in_proj=(*(linear(quant, prefix + "in_proj_qkv", (conv_all, hidden), rows, split=split) for rows in qkv),
                 linear(quant, prefix + "in_proj_z", (value_all, hidden), v, split=split),
                 linear(quant, prefix + "in_proj_b", (d.value_heads, hidden), heads, split=split),
                 linear(quant, prefix + "in_proj_a", (d.value_heads, hidden), heads, split=split)),
        conv=tuple(Slice(prefix + "conv1d.weight", (conv_all, 1, d.conv_kernel), rows, split=split) for rows in qkv),
        A_log=Slice(prefix + "A_log", (d.value_heads,), heads, split=split),
        dt_bias=Slice(prefix + "dt_bias", (d.value_heads,), heads, split=split),
        norm=whole(prefix + "norm.weight", (V,)),
        out_proj=linear(quant, prefix + "out_proj", (hidden, value_all), range(hidden), v, split=split),
    )


class LinearAttentionState:
    """Every sequence slot's state of one layer's key heads on this rank: `conv` (slots, channels, conv_kernel - 1)
    in the model dtype, `recurrent` (slots, value heads, key dim, value dim) in float32."""

    def __init__(self, dims: LinearAttentionDims, key_heads: int, max_batch: int, dtype: torch.dtype,
                 device: torch.device):
        d = dims
        self.conv = torch.zeros((max_batch, d.conv_channels(key_heads), d.conv_kernel - 1), dtype=dtype,
                                device=device)
        self.recurrent = torch.zeros((max_batch, key_heads * d.values_per_key, d.key_dim, d.value_dim),
                                     dtype=torch.float32, device=device)
        self.held = None  # a verify step's inputs until `keep`

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.recurrent]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def copy_slot(self, src: int, dst: int, length: int = 0) -> None:
        """Slot `src`'s state into `dst`: a prompt prefilled once serves several samples. The state is that of
        every position `src` has run, `length` of them, whatever `length` is."""
        for t in self.tensors():
            t[dst] = t[src]

    def reset(self, slot: int) -> None:
        for t in self.tensors():
            t[slot].zero_()

    def hold(self, slots: torch.Tensor, convolved: torch.Tensor, rule_inputs: tuple) -> None:
        """A verify step's inputs (speculative decoding), left out of the state until `keep` knows how many of its
        positions each row keeps: `convolved` (batch, channels, kernel - 1 + seq), the slots' kept conv inputs then
        the step's; `rule_inputs` the delta rule's q, k, v, g, beta."""
        self.held = slots, convolved, rule_inputs

    def keep(self, kept: torch.Tensor) -> None:
        """After a verify step, each row's state after its first kept[b] + 1 positions; the rest were a rejected
        draft's. The recurrence runs again from the state before the step, token by token as decode steps run it,
        with beta = 0 and g = 0 (no update, no decay) at the positions not kept, so that a kept position's
        arithmetic is the one plain decoding does."""
        if self.held is None:  # this rank holds no key head of the layer
            return
        (slots, convolved, (q, k, v, g, beta)), self.held = self.held, None
        B, T = g.shape[:2]
        used = (torch.arange(T, device=g.device).view(1, T) <= kept.view(B, 1)).unsqueeze(-1)  # (batch, seq, 1)
        _, self.recurrent[slots] = recurrent_gated_delta_rule(q, k, v, g * used, beta * used, self.recurrent[slots])
        width = self.conv.shape[-1]  # the last kernel - 1 inputs up to the kept position
        columns = kept.view(B, 1, 1) + 1 + torch.arange(width, device=g.device).view(1, 1, width)
        self.conv[slots] = convolved.gather(2, columns.expand(B, convolved.shape[1], width))


class GatedDeltaNet:
    """One rank's key heads of a Gated DeltaNet layer (module docstring), reading and updating `state`."""

    def __init__(self, layout: LinearAttentionLayout, dims: LinearAttentionDims, comm: Communicator,
                 reader: WeightReader, state: LinearAttentionState, eps: float, act_quant_weight_only: bool):
        n = len(layout.key_heads)
        self.dims, self.state, self.eps = dims, state, eps
        self.n_key, self.n_value = n, n * dims.values_per_key
        self.in_proj = ColumnParallelLinear(layout.in_proj).load(reader, act_quant_weight_only)
        self.out_proj = RowParallelLinear(layout.out_proj, comm).load(reader, act_quant_weight_only)
        conv = torch.cat([reader.read(s) for s in layout.conv])  # (channels, 1, kernel)
        self.conv_weight = conv.view(conv.shape[0], dims.conv_kernel)  # (channels, kernel)
        self.A_log, self.dt_bias = reader.read(layout.A_log), reader.read(layout.dt_bias)  # (value heads,)
        self.norm = reader.read(layout.norm)  # (value dim,)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, step=None) -> torch.Tensor:
        """(batch, seq, hidden) normed input at positions (batch, seq) of slots (batch,) -> the layer's output
        (batch, seq, hidden), summed over ranks. Of the step the attention layers share it reads only whether it
        verifies a draft (`step.verify`): then its positions' state waits for `LinearAttentionState.keep`."""
        if not self.n_key:  # no heads here: out_proj adds zeros
            return self.out_proj(h[..., :0])
        d, (B, T, _) = self.dims, h.shape
        K, V, nk, nv = d.key_dim, d.value_dim, self.n_key, self.n_value
        channels = self.conv_weight.shape[0]
        mixed, z, b, a = self.in_proj(h).split([channels, nv * V, nv, nv], dim=-1)
        kept = (positions[:, 0] != 0).view(B, 1, 1)  # a sequence starting at position 0 starts from zero state
        verify = step is not None and step.verify  # the state is written by `LinearAttentionState.keep`
        mixed, convolved = self._convolve(mixed, slots, kept, write=not verify)  # (batch, seq, channels)
        q, k, v = mixed.split([nk * K, nk * K, nv * V], dim=-1)
        q, k, v = q.reshape(B, T, nk, K), k.reshape(B, T, nk, K), v.reshape(B, T, nv, V)
        beta = b.sigmoid()  # (batch, seq, value heads)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        state = self.state.recurrent[slots] * kept.unsqueeze(-1)  # (batch, value heads, key dim, value dim)
        rule = recurrent_gated_delta_rule if T == 1 or verify else chunk_gated_delta_rule
        out, state = rule(q, k, v, g, beta, state)  # out: (batch, seq, value heads, value dim)
        if verify:
            self.state.hold(slots, convolved, (q, k, v, g, beta))
        else:
            self.state.recurrent[slots] = state
        return self.out_proj(self._gated_norm(out, z.reshape(B, T, nv, V)).reshape(B, T, nv * V))

    def _convolve(self, x: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor,
                  write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise convolution of x (batch, seq, channels) after each slot's kept inputs, then SiLU, and
        the inputs it ran over (batch, channels, kernel - 1 + seq); with `write` the slot keeps the last kernel - 1."""
        channels, kernel = self.conv_weight.shape
        history = self.state.conv[slots] * kept  # (batch, channels, kernel - 1)
        full = torch.cat([history, x.transpose(1, 2).to(history.dtype)], dim=-1)  # (batch, channels, kernel-1+seq)
        if write:
            self.state.conv[slots] = full[..., full.shape[-1] - (kernel - 1):]
        out = F.conv1d(full, self.conv_weight.unsqueeze(1), groups=channels)  # (batch, channels, seq)
        return F.silu(out).transpose(1, 2), full

    def _gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each head's output (float32 statistics, weight in the model dtype), times SiLU(gate)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (self.norm * x.to(dtype) * F.silu(gate.float())).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return ([self.conv_weight, self.A_log, self.dt_bias, self.norm] + self.in_proj.weight.tensors()
                + self.out_proj.weight.tensors())


@dataclass(frozen=True)
class LinearAttentionKind:
    """The Gated DeltaNet as a layer kind (`raytp.model.kinds`), for config.json's "linear_attention" layers.

    Declared to the planner: key heads, one block each. A key head costs a rank its q and k rows and its value heads'
    v, z, b and a rows of in_proj (column-parallel), its value channels' out_proj columns (row-parallel), their conv
    taps, A_log and dt_bias, and per sequence slot its state; a decode step reads its weights and reads and writes
    one sequence's state."""

    name: str = "linear_attention"

    def layout(self, config, shard, prefix: str) -> LinearAttentionLayout:
        return linear_attention_layout(prefix, config.linear_attention, config.hidden_size, shard.linear_key_heads,
                                       config.quant)

    def pieces(self, config, shape: PlanShape) -> tuple[Piece, ...]:
        d, b = config.linear_attention, LinearBytes.of(config, shape)
        r, K, V = d.values_per_key, d.key_dim, d.value_dim
        rows = 2 * K + 2 * r * V + 2 * r  # q, k, v, z, b, a
        small = (d.conv_channels(1) * d.conv_kernel + 2 * r) * b.nbytes  # conv taps, A_log, dt_bias
        weights = rows * b.row + b.head_columns(r * V, config.hidden_size) + small
        state = d.state_bytes(1, b.nbytes)
        spans = (Span(LINEAR_KEY_HEADS, "linear key heads"), Span(LINEAR_VALUE_HEADS, "linear value heads", r))
        return (Piece(spans, d.key_heads, 1, weights, weights + 2 * state,
                      (("conv + recurrent state", shape.max_batch * state),), unit="linear key head"),)

    def replicated_bytes(self, config, shape: PlanShape) -> int:
        """out_proj's quantization data kept whole (`LinearBytes.head_columns_replicated`)."""
        d = config.linear_attention
        return LinearBytes.of(config, shape).head_columns_replicated(config, shape, d.values_per_key * d.value_dim,
                                                                     d.value_heads * d.value_dim)

    def buffer_bytes(self, config, shape: PlanShape) -> int:
        """in_proj's output of a prefill chunk at full width, and the torch delta rule's float32 work: per value head
        and token its q, k, v, deltas and decayed keys, and per chunk its (CHUNK, CHUNK) matrices."""
        d = config.linear_attention
        tokens = shape.max_batch * min(shape.max_context, PREFILL_CHUNK)
        width = d.conv_channels(d.key_heads) + d.value_heads * (d.value_dim + 2)
        work = tokens * d.value_heads * (6 * max(d.key_dim, d.value_dim) + 3 * CHUNK) * 4
        return tokens * width * LinearBytes.of(config, shape).nbytes + work

    def state(self, config, shard, *, max_batch: int, dtype: torch.dtype, device: torch.device,
              **_) -> LinearAttentionState:
        return LinearAttentionState(config.linear_attention, len(shard.linear_key_heads), max_batch, dtype, device)

    def view(self, config, positions, span: int, max_context: int) -> None:
        return None

    def load(self, config, layout: LinearAttentionLayout, comm, reader, state: LinearAttentionState,
             act_quant_weight_only: bool) -> GatedDeltaNet:
        return GatedDeltaNet(layout, config.linear_attention, comm, reader, state, config.rms_norm_eps,
                             act_quant_weight_only)


LINEAR_ATTENTION = LinearAttentionKind()
