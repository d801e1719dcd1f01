"""Which Hugging Face tensors a rank holds, and which of their rows and columns: written here once.

The layers load these slices (`raytp.model.layers`), the model check compares them with a checkpoint's headers
(`raytp.weights.source`), the synthetic weights draw them (`raytp.weights.synthetic`), the planner's bytes count
them (`raytp.model.pieces`: what is replicated is what the layout gives every rank whole) and the transformers
peer turns a one-rank weight set back into a state dict (`raytp.bench.hf_peer`); none of them spells a tensor name
or a fused order itself. Each slice names the piece whose range it follows (`Slice.split`, None: held whole).

A quantized Linear keeps its logical slice here (rows and columns of the dense matrix, named `...weight`) with the
`QuantConfig` it is stored in; that checkpoint method (`raytp.model.quant`) maps it onto the stored tensors
(weight_packed, weight_scale, ... or GPTQ's qweight, scales, ...). With act-order, a rank's MLP columns are
positions in the order that sorts down_proj's group index (`order`), so that each rank's down_proj columns are
whole contiguous groups: see `model_layout`. `Slice` itself is in `raytp.model.slice`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from raytp.model.config import ModelConfig
from raytp.model.slice import Slice, whole
from raytp.parallel.plan import RankShard

# The pieces a Llama-family model splits (`raytp.model.pieces` declares their bytes): the names of their ranges on
# a RankShard. Query heads follow the KV heads, q_per_kv to a KV group. A mixture of experts splits the columns of
# every expert (the same range of each) where a dense model splits its MLP columns.
KV_HEADS, Q_HEADS, MLP_COLS, VOCAB_ROWS = "kv_heads", "q_heads", "mlp_cols", "vocab_rows"
EXPERT_COLS = "expert_cols"


@dataclass(frozen=True)
class ExpertsLayout:
    """A mixture-of-experts block in place of the dense MLP (`raytp.model.moe`)."""

    router: Slice  # (experts, hidden), whole on every rank
    experts: tuple[tuple[Slice, Slice, Slice], ...]  # per expert: gate rows, up rows, down input columns of the
    # rank's expert columns

    def slices(self) -> Iterator[Slice]:
        yield self.router
        for expert in self.experts:
            yield from expert


@dataclass(frozen=True)
class LayerLayout:
    attn_norm: Slice
    qkv: tuple[Slice, ...]  # fused in this order: q rows, k rows, v rows of this rank's heads
    qkv_bias: tuple[Slice, ...]  # empty unless the config has attention bias (Qwen2)
    qk_norm: tuple[Slice, ...]  # q_norm, k_norm (head_dim,) shared by every head; empty unless declared (Qwen3)
    o_proj: Slice  # input columns of this rank's query heads
    mlp_norm: Slice
    gate_up: tuple[Slice, ...]  # fused in this order: gate rows, up rows of this rank's MLP columns; empty with experts
    down: Slice | None  # input columns of this rank's MLP columns; None with experts
    experts: ExpertsLayout | None = None  # the mixture of experts, for an architecture that declares one

    def slices(self) -> Iterator[Slice]:
        yield from (self.attn_norm, *self.qkv, *self.qkv_bias, *self.qk_norm, self.o_proj, self.mlp_norm,
                    *self.gate_up)
        yield from (self.down,) if self.experts is None else self.experts.slices()


@dataclass(frozen=True)
class ModelLayout:
    embed: Slice  # rows of this rank's vocabulary
    layers: tuple[LayerLayout, ...]
    final_norm: Slice
    lm_head: Slice  # rows of this rank's vocabulary
    tied: bool  # lm_head is the embedding tensor: a checkpoint need not (and HF's does not) store it

    def slices(self) -> Iterator[Slice]:
        """Every tensor the checkpoint must hold for this rank (a tied lm_head is read as the embedding)."""
        yield self.embed
        for layer in self.layers:
            yield from layer.slices()
        yield self.final_norm
        if not self.tied:
            yield self.lm_head


def whole_model(config: ModelConfig) -> RankShard:
    """One rank holding all of the model: the layout of a whole checkpoint (its byte counts are not planned)."""
    spans = {KV_HEADS: config.num_kv_heads, Q_HEADS: config.num_heads, MLP_COLS: config.intermediate_size,
             EXPERT_COLS: config.moe.expert_size if config.moe else 0, VOCAB_ROWS: config.vocab_size}
    return RankShard(rank=0, device="whole", budget_bytes=0, spans={k: range(n) for k, n in spans.items()},
                     weight_bytes=0, kv_cache_bytes=0, overhead_bytes=0, read_bytes=0)


def param_count(config: ModelConfig) -> int:
    """Parameters of the whole model, counted from its layout (a tied embedding once)."""
    layout = model_layout(config, whole_model(config))
    return sum(math.prod(s.shape) for s in layout.slices())


def model_layout(config: ModelConfig, shard: RankShard) -> ModelLayout:
    """Rank `shard`'s slices. With act-order quantization the MLP is permuted at load time (TP-aware
    dequantization, arXiv 2402.04925): down_proj's input columns, and the gate/up output rows feeding them, are
    taken in the order that sorts down_proj's group index, so each rank's down_proj columns are whole contiguous
    groups (the planner splits the MLP in whole groups) and no activation is ever gathered. The permutation of the
    intermediate dimension changes nothing else: swiglu is elementwise and down_proj sums over it."""
    c, D, H = config, config.head_dim, config.hidden_size
    q_rows = range(shard.q_heads.start * D, shard.q_heads.stop * D)
    kv_rows = range(shard.kv_heads.start * D, shard.kv_heads.stop * D)
    nq, nkv, I = c.num_heads * D, c.num_kv_heads * D, c.intermediate_size

    def linear(name: str, shape: tuple[int, int], rows: range, cols: range | None = None, order: str | None = None,
               split: str | None = None):
        quant = c.quant if c.quant is not None and c.quant.quantizes(name) else None
        return Slice(name + ".weight", shape, rows, cols, quant, order, split)

    def permuted(down: str) -> str | None:
        """The order of an MLP's (or expert's) columns: sorting `down`'s group index with act-order, else stored."""
        return down if c.quant is not None and c.quant.act_order and c.quant.quantizes(down) else None

    def experts(i: int) -> ExpertsLayout:
        names, E, C = c.architecture.experts, c.moe.num_experts, c.moe.expert_size
        m, cols = f"model.layers.{i}.{names.module}.", shard.expert_cols

        def expert(e: int) -> tuple[Slice, Slice, Slice]:
            p, down = f"{m}experts.{e}.", f"{m}experts.{e}.{names.down}"
            order = permuted(down)  # each expert's columns in its own down_proj's group order
            return (linear(p + names.gate, (C, H), cols, order=order, split=EXPERT_COLS),
                    linear(p + names.up, (C, H), cols, order=order, split=EXPERT_COLS),
                    linear(down, (H, C), range(H), cols, order, EXPERT_COLS))

        return ExpertsLayout(router=whole(m + "gate.weight", (E, H)), experts=tuple(expert(e) for e in range(E)))

    def layer(i: int) -> LayerLayout:
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        heads = (("q_proj", nq, q_rows), ("k_proj", nkv, kv_rows), ("v_proj", nkv, kv_rows))
        down = m + "down_proj"
        order = permuted(down)
        moe = c.moe is not None
        return LayerLayout(
            attn_norm=whole(p + "input_layernorm.weight", (H,)),
            qkv=tuple(linear(a + n, (size, H), rows, split=KV_HEADS) for n, size, rows in heads),
            qkv_bias=tuple(Slice(f"{a}{n}.bias", (size,), rows, split=KV_HEADS) for n, size, rows in heads)
            if c.qkv_bias else (),
            qk_norm=tuple(whole(f"{a}{n}.weight", (D,)) for n in ("q_norm", "k_norm"))
            if c.architecture.qk_norm else (),
            o_proj=linear(a + "o_proj", (H, nq), range(H), q_rows, split=KV_HEADS),
            mlp_norm=whole(p + "post_attention_layernorm.weight", (H,)),
            gate_up=() if moe else tuple(linear(m + n, (I, H), shard.mlp_cols, order=order, split=MLP_COLS)
                                         for n in ("gate_proj", "up_proj")),
            down=None if moe else linear(down, (H, I), range(H), shard.mlp_cols, order, MLP_COLS),
            experts=experts(i) if moe else None,
        )

    vocab = (c.vocab_size, H)
    return ModelLayout(embed=Slice("model.embed_tokens.weight", vocab, shard.vocab_rows, split=VOCAB_ROWS),
                       layers=tuple(layer(i) for i in range(c.num_layers)),
                       final_norm=whole("model.norm.weight", (H,)),
                       lm_head=Slice("lm_head.weight", vocab, shard.vocab_rows, split=VOCAB_ROWS),
                       tied=c.tie_word_embeddings)
