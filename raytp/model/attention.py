"""Grouped-query attention, full or over a sliding window: two layer kinds (`raytp.model.kinds`) and their forward.

    full_attention     every position up to max_context in a KVCache
    sliding_attention  a query at t sees positions (t - window, t]: a WindowCache of `window` positions, whatever the
                       context (Gemma 3's local layers, config.json's sliding_window)

Parallel layout (Megatron-style, widths from the ShardPlan): q/k/v column-parallel by KV group (rank r computes its
q_heads and kv_heads only), o_proj row-parallel, one all-reduce of partial (batch, seq, hidden) sums. A rank with no
heads joins the all-reduce with zeros. Optional per family: q/k/v biases (Qwen2), per-head q/k RMSNorm before RoPE
(Qwen3, Gemma 3), applied by the RoPE kernel (raytp.kernels.rope_cache) so that they cost no kernel of their own,
and a score scale other than head_dim ** -0.5 (Gemma 3's query_pre_attn_scalar).

Declared to the planner: KV groups, one block each; a group costs a rank its query heads' q and o_proj slices, its
k and v rows (and biases), in the format the weights are held in, and the K and V rows of its cache (max_context
positions, or the window).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from raytp.model.kinds import LinearBytes
from raytp.model.kv_cache import KVCache, QKNorm, WindowCache, WindowView, kv_row_bytes
from raytp.model.layers import ColumnParallelLinear, RowParallelLinear
from raytp.model.slice import Slice, linear, whole
from raytp.parallel.plan import PREFILL_CHUNK, Piece, PlanShape, Span

# The ranges of a RankShard attention follows: query heads follow the KV heads, q_per_kv to a KV group
KV_HEADS, Q_HEADS = "kv_heads", "q_heads"


@dataclass(frozen=True)
class AttentionLayout:
    qkv: tuple[Slice, ...]  # fused in this order: q rows, k rows, v rows of this rank's heads
    qkv_bias: tuple[Slice, ...]  # empty unless the config has attention bias (Qwen2)
    qk_norm: tuple[Slice, ...]  # q_norm, k_norm (head_dim,) shared by every head; empty unless the config has them
    o_proj: Slice  # input columns of this rank's query heads
    o_bias: Slice | None = None  # (hidden,) whole, where the config has one (gpt-oss)
    sinks: Slice | None = None  # (num_heads,): this rank's query heads' sink logits, where the config has them

    def slices(self) -> Iterator[Slice]:
        yield from (*self.qkv, *self.qkv_bias, *self.qk_norm, self.o_proj)
        yield from (s for s in (self.o_bias, self.sinks) if s is not None)


@dataclass(frozen=True)
class FullView:
    """What every full-attention layer reads of a step, computed once per step."""

    lengths: torch.Tensor  # (batch,) each sequence's length after this step: the Triton decode attention reads it
    limits: torch.Tensor  # (batch, seq) the positions each query sees (its own + 1): the Triton verify attention's
    span: int  # cache positions the torch attention reads: the furthest position + 1, or max_context in a graph
    visible: torch.Tensor  # (batch, 1, seq, span) which of those positions each query may see


def head_dims(head_dim: int, rotary_fraction: float) -> torch.Tensor:
    """The order of a query or key head's dims that turns RoPE on its first `rotary_fraction` into the RoPE kernel's
    rotate-half over the whole head (raytp.model.rope gives the other dims angle 0): the rotated dims' halves at
    the starts of the head's halves, the others after them. q . k is the same in any order of the dims both share."""
    rotary = int(head_dim * rotary_fraction)
    half, rest = rotary // 2, head_dim // 2 - rotary // 2
    return torch.cat([torch.arange(half), torch.arange(rotary, rotary + rest), torch.arange(half, rotary),
                      torch.arange(rotary + rest, head_dim)])


def qkv_columns(n_q: int, n_kv: int, head_dim: int, dims: torch.Tensor, gated: bool,
                device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where the fused projection's columns go: (the columns in the order RoPE and the cache take them, q heads then
    k then v, each q and k head's dims in the order `dims`; each query head's gate columns), None where the
    projection is already in that order or has no gates. A gated q_proj gives each head its query then its gate."""
    D, q_width = head_dim, n_q * head_dim * (2 if gated else 1)
    q_starts = torch.arange(n_q) * D * (2 if gated else 1)
    q = (q_starts[:, None] + dims).flatten()
    k = (q_width + torch.arange(n_kv)[:, None] * D + dims).flatten()
    v = q_width + n_kv * D + torch.arange(n_kv * D)
    order = torch.cat([q, k, v])
    gates = (q_starts[:, None] + D + torch.arange(D)).flatten() if gated else None
    if not gated and torch.equal(order, torch.arange(len(order))):
        order = None
    return (None if order is None else order.to(device)), (None if gates is None else gates.to(device))


class Attention:
    """One layer's attention on one rank: (batch, seq, hidden) normed input -> output summed over ranks."""

    def __init__(self, kind: AttentionKind, config, layout: AttentionLayout, comm, reader, cache: KVCache,
                 act_quant_weight_only: bool):
        self.kind, self.cache = kind.name, cache
        self.qkv = ColumnParallelLinear(layout.qkv, layout.qkv_bias).load(reader, act_quant_weight_only)
        self.o_proj = RowParallelLinear(layout.o_proj, comm, layout.o_bias).load(reader, act_quant_weight_only)
        self.sinks = reader.read(layout.sinks) if layout.sinks is not None else None  # (local query heads,)
        self.n_q, self.scale = self.o_proj.width // config.head_dim, config.attention_scale
        n_kv = len(layout.qkv[1].rows) // config.head_dim
        dims = head_dims(config.head_dim, config.rotary_fraction)
        self.order, self.gates = qkv_columns(self.n_q, n_kv, config.head_dim, dims, config.attention_gate,
                                             self.o_proj.weight.tensors()[0].device)
        q_norm, k_norm = ((config.norm(reader.read(s))[dims] for s in layout.qk_norm) if layout.qk_norm
                          else (None, None))
        self.norm = QKNorm(q_norm, k_norm, config.rms_norm_eps)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, step) -> torch.Tensor:
        if not self.n_q:  # no heads here: o_proj adds zeros
            return self.o_proj(h[..., :0])
        qkv = self.qkv(h)  # (batch, seq, (n_q + 2 n_kv) * head_dim), and each query head's gate where gated
        gates = None if self.gates is None else qkv[..., self.gates]  # (batch, seq, n_q * head_dim)
        if self.order is not None:
            qkv = qkv[..., self.order]
        attended = self.cache.attention(qkv, self.n_q, step.rope[self.kind], positions, slots, step.views[self.kind],
                                        self.norm, self.scale, self.sinks)  # (batch, seq, n_q * head_dim)
        return self.o_proj(attended if gates is None else attended * torch.sigmoid(gates))

    def tensors(self) -> list[torch.Tensor]:
        own = [t for t in (self.norm.q, self.norm.k, self.sinks, self.o_proj.bias) if t is not None]
        return own + [t for x in (self.qkv, self.o_proj) for t in x.weight.tensors()]


KV_CACHE, WINDOW_CACHE = "KV cache", "window cache"  # the state names plans show


@dataclass(frozen=True)
class AttentionKind:
    name: str
    windowed: bool  # keeps config.sliding_window positions, not max_context

    def positions(self, config, max_context: int) -> int:
        """Cache positions a sequence keeps."""
        return min(config.sliding_window, max_context) if self.windowed else max_context

    @property
    def state_name(self) -> str:
        """What its state is called in plans."""
        return WINDOW_CACHE if self.windowed else KV_CACHE

    def view(self, config, positions: torch.Tensor, span: int, max_context: int) -> FullView | WindowView:
        """What this kind's caches read of a step at positions (batch, seq); `span`: see FullView."""
        if self.windowed:
            return WindowCache.view(self.positions(config, max_context), positions)
        visible = torch.arange(span, device=positions.device).view(1, 1, span) <= positions.unsqueeze(-1)
        limits = positions + 1
        return FullView(limits[:, -1], limits, span, visible.unsqueeze(1))

    def layout(self, config, shard, prefix: str) -> AttentionLayout:
        c, D, H = config, config.head_dim, config.hidden_size
        q_rows = range(shard.q_heads.start * D, shard.q_heads.stop * D)
        g = 2 if c.attention_gate else 1  # a gated q_proj's rows: each head's query, then its gate
        q_proj_rows = range(q_rows.start * g, q_rows.stop * g)
        kv_rows = range(shard.kv_heads.start * D, shard.kv_heads.stop * D)
        heads = (("q_proj", c.num_heads * D * g, q_proj_rows), ("k_proj", c.num_kv_heads * D, kv_rows),
                 ("v_proj", c.num_kv_heads * D, kv_rows))
        return AttentionLayout(
            qkv=tuple(linear(c.quant, prefix + n, (size, H), rows, split=KV_HEADS) for n, size, rows in heads),
            qkv_bias=tuple(Slice(f"{prefix}{n}.bias", (size,), rows, split=KV_HEADS) for n, size, rows in heads)
            if c.attention_bias else (),
            qk_norm=tuple(whole(f"{prefix}{n}.weight", (D,)) for n in ("q_norm", "k_norm")) if c.qk_norm else (),
            o_proj=linear(c.quant, prefix + "o_proj", (H, c.num_heads * D), range(H), q_rows, split=KV_HEADS),
            o_bias=whole(prefix + "o_proj.bias", (H,)) if c.o_proj_bias else None,
            sinks=Slice(prefix + "sinks", (c.num_heads,), shard.q_heads, split=KV_HEADS) if c.attention_sinks else None)

    def pieces(self, config, shape: PlanShape) -> tuple[Piece, ...]:
        """One KV group of one layer: q and o_proj slices of its q query heads, its k and v rows (+ q/k/v biases,
        its query heads' sinks), its cache rows."""
        c, b = config, LinearBytes.of(config, shape)
        d, q = c.head_dim, c.q_per_kv
        g = 2 if c.attention_gate else 1  # q_proj rows per query head
        bias = ((g * q + 2) * d * c.attention_bias + q * c.attention_sinks) * b.nbytes
        weights = (g * q + 2) * d * b.row + b.head_columns(q * d, c.hidden_size) + bias
        cache = 2 * shape.max_batch * self.positions(c, shape.max_context) * kv_row_bytes(d, b.nbytes, shape.kv_dtype)
        return (Piece((Span(KV_HEADS, "KV heads"), Span(Q_HEADS, "query heads", q)), c.num_kv_heads, 1, weights,
                      weights, ((self.state_name, cache),), unit="KV group"),)

    def replicated_bytes(self, config, shape: PlanShape) -> int:
        """o_proj's quantization data kept whole (`LinearBytes.head_columns_replicated`)."""
        c = config
        return LinearBytes.of(c, shape).head_columns_replicated(c, shape, c.q_per_kv * c.head_dim,
                                                                c.num_heads * c.head_dim)

    def buffer_bytes(self, config, shape: PlanShape) -> int:
        """q/k/v of a prefill chunk at full width; a window also gathers its ring's keys and values."""
        c, b = config, LinearBytes.of(config, shape)
        tokens = shape.max_batch * min(shape.max_context, PREFILL_CHUNK)
        ring = 2 * shape.max_batch * c.num_kv_heads * self.positions(c, shape.max_context) * c.head_dim * self.windowed
        q = c.num_heads * (2 if c.attention_gate else 1)
        return (tokens * (q + 2 * c.num_kv_heads) * c.head_dim + ring) * b.nbytes

    def state(self, config, shard, *, max_batch: int, max_context: int, kv_dtype: str, dtype: torch.dtype,
              device: torch.device) -> KVCache:
        shape = (max_batch, len(shard.kv_heads), self.positions(config, max_context), config.head_dim)
        return (WindowCache if self.windowed else KVCache)(kv_dtype, shape, dtype, device)

    def load(self, config, layout: AttentionLayout, comm, reader, state: KVCache,
             act_quant_weight_only: bool) -> Attention:
        return Attention(self, config, layout, comm, reader, state, act_quant_weight_only)


FULL_ATTENTION = AttentionKind("full_attention", windowed=False)
SLIDING_ATTENTION = AttentionKind("sliding_attention", windowed=True)
