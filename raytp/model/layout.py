"""Which Hugging Face tensors a rank holds, and which of their rows and columns: written here once.

The layers load these slices (`raytp.model.layers`), the model check compares them with a checkpoint's headers
(`raytp.weights.source`) and the transformers peer turns a one-rank weight set back into a state dict
(`raytp.bench.hf_peer`); none of them spells a tensor name or a fused order itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from raytp.model.config import ModelConfig
from raytp.parallel.plan import RankShard


@dataclass(frozen=True)
class Slice:
    """Rows `rows` (and columns `cols`, None = all of them) of the global tensor `name` of shape `shape`."""

    name: str
    shape: tuple[int, ...]
    rows: range
    cols: range | None = None


def whole(name: str, shape: tuple[int, ...]) -> Slice:
    return Slice(name, shape, range(shape[0]))


@dataclass(frozen=True)
class LayerLayout:
    attn_norm: Slice
    qkv: tuple[Slice, ...]  # fused in this order: q rows, k rows, v rows of this rank's heads
    qkv_bias: tuple[Slice, ...]  # empty unless the config has attention bias (Qwen2)
    o_proj: Slice  # input columns of this rank's query heads
    mlp_norm: Slice
    gate_up: tuple[Slice, ...]  # fused in this order: gate rows, up rows of this rank's MLP columns
    down: Slice  # input columns of this rank's MLP columns

    def slices(self) -> Iterator[Slice]:
        yield from (self.attn_norm, *self.qkv, *self.qkv_bias, self.o_proj, self.mlp_norm, *self.gate_up, self.down)


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
    return RankShard(rank=0, device="whole", budget_bytes=0, kv_heads=range(config.num_kv_heads),
                     q_heads=range(config.num_heads), mlp_cols=range(config.intermediate_size),
                     vocab_rows=range(config.vocab_size), weight_bytes=0, kv_cache_bytes=0, overhead_bytes=0,
                     read_bytes=0)


def model_layout(config: ModelConfig, shard: RankShard) -> ModelLayout:
    c, D, H = config, config.head_dim, config.hidden_size
    q_rows = range(shard.q_heads.start * D, shard.q_heads.stop * D)
    kv_rows = range(shard.kv_heads.start * D, shard.kv_heads.stop * D)
    nq, nkv, I = c.num_heads * D, c.num_kv_heads * D, c.intermediate_size

    def layer(i: int) -> LayerLayout:
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        heads = (("q_proj", nq, q_rows), ("k_proj", nkv, kv_rows), ("v_proj", nkv, kv_rows))
        return LayerLayout(
            attn_norm=whole(p + "input_layernorm.weight", (H,)),
            qkv=tuple(Slice(f"{a}{n}.weight", (size, H), rows) for n, size, rows in heads),
            qkv_bias=tuple(Slice(f"{a}{n}.bias", (size,), rows) for n, size, rows in heads) if c.attention_bias
            else (),
            o_proj=Slice(a + "o_proj.weight", (H, nq), range(H), q_rows),
            mlp_norm=whole(p + "post_attention_layernorm.weight", (H,)),
            gate_up=tuple(Slice(f"{m}{n}.weight", (I, H), shard.mlp_cols) for n in ("gate_proj", "up_proj")),
            down=Slice(m + "down_proj.weight", (H, I), range(H), shard.mlp_cols),
        )

    return ModelLayout(embed=Slice("model.embed_tokens.weight", (c.vocab_size, H), shard.vocab_rows),
                       layers=tuple(layer(i) for i in range(c.num_layers)),
                       final_norm=whole("model.norm.weight", (H,)),
                       lm_head=Slice("lm_head.weight", (c.vocab_size, H), shard.vocab_rows),
                       tied=c.tie_word_embeddings)
