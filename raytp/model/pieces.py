"""What a Llama-family model can split, and what every rank holds whole: its declaration to the planner.

`ModelPieces(config)` is the `raytp.parallel.plan.Splittable` of a model config. Its pieces, with the ranges of
`raytp.model.layout` they set (the layout's `Slice.split`):

    KV groups    KV_HEADS (and Q_HEADS, q_per_kv per group): q/k/v rows (and biases) of the group's heads and
                 o_proj input columns of its query heads (column- and row-parallel), plus their KV cache
    MLP columns  MLP_COLS: gate/up output rows, down_proj input columns; in blocks of whole quantization groups of
                 down_proj
    expert cols  EXPERT_COLS, in a mixture of experts instead of MLP columns: the same columns of every expert's
                 gate/up/down. A rank holds them for all experts, but a batch-1 decode step reads only the top-k
                 experts the token selects: the memory split counts all experts' bytes, the speed split and the
                 roofline the expected reads, top_k of num_experts
    vocab rows   VOCAB_ROWS: embedding and lm_head rows (one table when tied); a decode step reads all of lm_head
                 but one embedding row per token, so the embedding is not counted as read

Replicated: every tensor the layout gives each rank whole (norms, Qwen3's q/k norms, the experts' routers),
quantization data a split leaves whole (`quant_replicated_bytes`) and the working buffers. The bytes of each weight
format (the model dtype's too) come from its object in `raytp.model.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from raytp.model.config import ModelConfig
from raytp.model.kv_cache import kv_row_bytes
from raytp.model.layout import EXPERT_COLS, KV_HEADS, MLP_COLS, Q_HEADS, VOCAB_ROWS, model_layout, whole_model
from raytp.model.formats import weight_format
from raytp.parallel.plan import (DTYPE_BYTES, PREFILL_CHUNK, Piece, PlanShape, ShardPlan, Span, plan_shards)

DEFAULT_BLOCK = 64  # MLP columns and vocab rows move between ranks in blocks of this many (the last may be partial)
# Expert columns move in smaller blocks: one column of every expert weighs num_experts MLP columns (64 columns of
# Qwen3-30B-A3B's 128 experts are 4.8 GB in bf16), and 16 is still a whole tensor-core tile of the routed kernels.
EXPERT_BLOCK = 16


def replicated_tensor_bytes(config: ModelConfig, dtype: str) -> int:
    """The tensors every rank holds whole, as the layout lists them (norms), in `dtype`."""
    layout = model_layout(config, whole_model(config))
    return sum(math.prod(s.shape) for s in layout.slices() if s.split is None) * DTYPE_BYTES[dtype]


def quant_replicated_bytes(config: ModelConfig, dtype: str) -> int:
    """Quantization data every rank holding a share of the layers keeps whole, whatever its share.

    Row-parallel layers (o_proj, down_proj) with one scale per output row hold all of them on every rank; act-order
    checkpoints keep the column groups of q/k/v and gate/up (their input is every column) and, for o_proj, whose
    columns stay in head order, scales for up to every group; and an o_proj split at head boundaries that are not
    group boundaries shares one group's scales between two ranks. A mixture of experts has a gate/up and a
    down_proj per expert. (Every decoder Linear is counted as quantized.)
    """
    q, nbytes, h, L = config.quant, DTYPE_BYTES[dtype], config.hidden_size, config.num_layers
    mlps = config.moe.num_experts if config.moe else 1
    fmt = weight_format(q)
    if q is None or q.group_size is None:  # one scale per row (or tensor), or none
        return L * (1 + mlps) * fmt.row_scale_bytes(h, nbytes)
    entry = fmt.group_entry_bytes(nbytes)
    o_cols = config.num_heads * config.head_dim
    if q.act_order:
        return L * ((1 + mlps) * h * 4 + h * -(-o_cols // q.group_size) * entry)
    return L * h * entry if (config.q_per_kv * config.head_dim) % q.group_size else 0


def replicated_overhead_bytes(config: ModelConfig, *, max_context: int, max_batch: int, dtype: str) -> int:
    """What every rank holds whatever its share: the layout's whole tensors plus working buffers.

    Quantized models add what `quant_replicated_bytes` lists. The buffers are one layer's activations for a prefill
    chunk of max_batch * min(max_context, PREFILL_CHUNK) tokens at full width (residual, normed input, attention and
    MLP outputs, q/k/v, gate and up), an upper bound of the local slices so that the overhead does not depend on the
    split it feeds, plus the gathered float32 logits of one step. Attention scores are not counted: torch's fused
    SDPA kernels never materialise them.
    """
    nbytes = DTYPE_BYTES[dtype]
    tokens = max_batch * min(max_context, PREFILL_CHUNK)
    width = 4 * config.hidden_size + (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    mlp = 2 * config.intermediate_size * nbytes
    if config.moe is not None:  # one expert's gate/up at a time, at most every token; the float32 sum of the experts
        mlp = 2 * config.moe.expert_size * nbytes + 4 * config.hidden_size
    return (replicated_tensor_bytes(config, dtype) + quant_replicated_bytes(config, dtype)
            + tokens * (width * nbytes + mlp) + max_batch * config.vocab_size * 4)


@dataclass(frozen=True)
class ModelPieces:
    """A model config as the planner sees it (`raytp.parallel.plan.Splittable`)."""

    config: ModelConfig

    @property
    def quant(self) -> str | None:
        return self.config.quant.describe() if self.config.quant else None

    def describe(self, shape: PlanShape) -> str:
        return f"{shape.dtype}, {self.quant}" if self.quant else shape.dtype

    def replicated_bytes(self, shape: PlanShape) -> int:
        return replicated_overhead_bytes(self.config, max_context=shape.max_context, max_batch=shape.max_batch,
                                         dtype=shape.dtype)

    def pieces(self, shape: PlanShape) -> Sequence[Piece]:
        c, nbytes = self.config, DTYPE_BYTES[shape.dtype]
        h, d, q, layers = c.hidden_size, c.head_dim, c.q_per_kv, c.num_layers
        bias = (q + 2) * d * c.qkv_bias * nbytes
        cache = 2 * layers * shape.max_batch * shape.max_context * kv_row_bytes(d, nbytes, shape.kv_dtype)
        quant, group, group_bytes = c.quant, 1, 0
        mlp_block = shape.block(MLP_COLS, DEFAULT_BLOCK) if c.moe is None else shape.block(EXPERT_COLS, EXPERT_BLOCK)
        # One KV group: q and o_proj slices of its q query heads, its k and v rows (+ q/k/v biases), its cache; one
        # MLP column: gate, up and down (of each expert); in the bytes of the format the Linear layers are held in
        fmt = weight_format(quant)
        row = fmt.row_bytes(h, nbytes)  # a q/k/v or gate/up row
        col = fmt.column_bytes(h, nbytes)  # an o_proj or down_proj column's values
        o_cols, o_scales, col_extra = q * d, 0, 0  # per-row scales of o_proj and down_proj are replicated
        if quant is not None and quant.group_size:
            entry = fmt.group_entry_bytes(nbytes)
            if quant.act_order:
                col_extra = 4  # o_proj keeps each column's group (int32); its scales are replicated
            else:
                o_scales = -(-o_cols // quant.group_size) * h * entry
            group, group_bytes = quant.group_size, layers * h * entry  # down_proj's scales (of each expert)
            mlp_block = math.lcm(mlp_block, quant.group_size)  # whole groups of down_proj
        kv_group = layers * ((q + 2) * d * row + o_cols * (col + col_extra) + o_scales + bias)
        mlp = layers * (2 * row + col)
        vocab = (1 if c.tie_word_embeddings else 2) * h * nbytes
        if c.moe is None:
            mlp_piece = Piece((Span(MLP_COLS, "MLP columns"),), c.intermediate_size, mlp_block, mlp, mlp, group=group,
                              group_bytes=group_bytes, unit="MLP block")
        else:  # a column of every expert held, of the top-k read
            E, k = c.moe.num_experts, c.moe.top_k
            mlp_piece = Piece((Span(EXPERT_COLS, "expert columns"),), c.moe.expert_size, mlp_block, E * mlp, k * mlp,
                              group=group, group_bytes=E * group_bytes, group_read_bytes=k * group_bytes,
                              unit="expert block")
        return (
            Piece((Span(KV_HEADS, "KV heads"), Span(Q_HEADS, "query heads", q)), c.num_kv_heads, 1, kv_group,
                  kv_group, cache, unit="KV group"),
            mlp_piece,
            Piece((Span(VOCAB_ROWS, "vocab rows"),), c.vocab_size, shape.block(VOCAB_ROWS, DEFAULT_BLOCK), vocab,
                  h * nbytes, unit="vocab block"),
        )


def plan_model(config: ModelConfig, budgets: Sequence[tuple[str, int]], **kwargs) -> ShardPlan:
    """`plan_shards` of a model config (keyword arguments as there)."""
    return plan_shards(ModelPieces(config), budgets, **kwargs)
