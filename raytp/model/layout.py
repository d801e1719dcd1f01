"""Which Hugging Face tensors a rank holds, and which of their rows and columns: written here once.

The layers load these slices (`raytp.model.layers`), the model check compares them with a checkpoint's headers
(`raytp.weights.source`), the synthetic weights draw them (`raytp.weights.synthetic`), the planner's bytes count
them (`raytp.model.pieces`: what is replicated is what the layout gives every rank whole) and the transformers
peer turns a one-rank weight set back into a state dict (`raytp.bench.hf_peer`); none of them spells a tensor name
or a fused order itself. Each slice names the piece whose range it follows (`Slice.split`, None: held whole).

A model is its embedding, its layers, a final norm and lm_head. A layer is its norms (named by the family,
`raytp.model.families.LayerNames`), a token mixer of the kind config.layer_types lists (MIXERS) and a feed-forward
block (a dense MLP, or experts where the config has them); each kind lays out its own tensors.

A quantized Linear keeps its logical slice here (rows and columns of the dense matrix, named `...weight`) with the
`QuantConfig` it is stored in; that checkpoint method (`raytp.model.quant`) maps it onto the stored tensors
(weight_packed, weight_scale, ... or GPTQ's qweight, scales, ...). With act-order the MLP is permuted at load time
(TP-aware dequantization, arXiv 2402.04925): down_proj's input columns, and the gate/up output rows feeding them,
are taken in the order that sorts down_proj's group index (`Slice.order`), so each rank's down_proj columns are
whole contiguous groups (the planner splits the MLP in whole groups) and no activation is ever gathered. The
permutation of the intermediate dimension changes nothing else: the activation is elementwise and down_proj sums
over it. `Slice` itself is in `raytp.model.slice`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raytp.model.attention import FULL_ATTENTION, SLIDING_ATTENTION
from raytp.model.config import ModelConfig
from raytp.model.errors import UnsupportedModelError
from raytp.model.kinds import LayerKind
from raytp.model.layers import VOCAB_ROWS, vocab_piece
from raytp.model.linear_attention import LINEAR_ATTENTION
from raytp.model.mlp import DENSE_MLP
from raytp.model.moe import EXPERTS
from raytp.model.stacked_moe import STACKED_EXPERTS
from raytp.model.slice import Slice, linear, whole
from raytp.parallel.plan import PlanShape, RankShard

# config.json's layer_types -> the token mixer of such a layer
MIXERS: dict[str, LayerKind] = {k.name: k for k in (FULL_ATTENTION, SLIDING_ATTENTION, LINEAR_ATTENTION)}
# MoeConfig.kind -> the mixture of experts that is each layer's feed-forward block
MIXTURES: dict[str, LayerKind] = {k.name: k for k in (EXPERTS, STACKED_EXPERTS)}


def layer_count(config: ModelConfig) -> int:
    """The decoder's layers and the multi-token-prediction layers after them (config.mtp_layers): every layer a rank
    holds a share of."""
    return config.num_layers + config.mtp_layers


def layer_kinds(config: ModelConfig, i: int) -> tuple[LayerKind, LayerKind]:
    """Layer i's token mixer and feed-forward block; past the decoder's layers, an MTP layer's: full attention."""
    mixer = config.mixers[i] if i < config.num_layers else FULL_ATTENTION.name
    if mixer not in MIXERS:
        raise UnsupportedModelError(f"layer_types[{i}] is {mixer!r}; raytp runs layers of {', '.join(MIXERS)}")
    return MIXERS[mixer], MIXTURES[config.moe.kind] if config.moe is not None else DENSE_MLP


@dataclass(frozen=True)
class LayerLayout:
    mixer: str  # the token mixer's kind, a key of MIXERS
    attn_norm: Slice  # before the mixer
    attention: Any  # the mixer's layout (raytp.model.attention.AttentionLayout, ...)
    attn_out_norm: Slice | None  # on the mixer's output (Gemma), or None
    mlp_norm: Slice  # before the feed-forward block
    mlp: Any  # raytp.model.mlp.MLPLayout or raytp.model.experts.ExpertsLayout
    mlp_out_norm: Slice | None  # on the feed-forward block's output (Gemma), or None

    def slices(self) -> Iterator[Slice]:
        yield self.attn_norm
        yield from self.attention.slices()
        yield from (s for s in (self.attn_out_norm, self.mlp_norm) if s is not None)
        yield from self.mlp.slices()
        if self.mlp_out_norm is not None:
            yield self.mlp_out_norm


@dataclass(frozen=True)
class MtpLayout:
    """A multi-token-prediction layer (`mtp.*`, Qwen3.5): the next token's embedding and the decoder's hidden state,
    each normed, concatenated and projected by fc, then a full-attention layer and a norm before the shared lm_head.
    fc and the norms are held whole, the layer split as the decoder's are."""

    embed_norm: Slice  # (hidden,)
    hidden_norm: Slice  # (hidden,)
    fc: Slice  # (hidden, 2 hidden)
    layer: LayerLayout
    norm: Slice  # (hidden,)

    def slices(self) -> Iterator[Slice]:
        yield from (self.embed_norm, self.hidden_norm, self.fc, *self.layer.slices(), self.norm)


@dataclass(frozen=True)
class ModelLayout:
    embed: Slice  # rows of this rank's vocabulary
    layers: tuple[LayerLayout, ...]
    final_norm: Slice
    lm_head: Slice  # rows of this rank's vocabulary
    tied: bool  # lm_head is the embedding tensor: a checkpoint need not (and HF's does not) store it
    mtp: tuple[MtpLayout, ...] = ()  # the multi-token-prediction layers, kept for speculative decoding

    def slices(self) -> Iterator[Slice]:
        """Every tensor the checkpoint must hold for this rank (a tied lm_head is read as the embedding)."""
        yield self.embed
        for layer in self.layers:
            yield from layer.slices()
        yield self.final_norm
        if not self.tied:
            yield self.lm_head
        for mtp in self.mtp:
            yield from mtp.slices()


def whole_model(config: ModelConfig) -> RankShard:
    """One rank holding all of the model: the layout of a whole checkpoint (its byte counts are not planned)."""
    shape = PlanShape(max_context=1, max_batch=1, dtype="float32")
    pieces = [p for i in range(config.num_layers) for kind in layer_kinds(config, i)
              for p in kind.pieces(config, shape)] + [vocab_piece(config, shape)]
    spans = {s.name: range(p.size * s.per_unit) for p in pieces for s in p.spans}
    return RankShard(rank=0, device="whole", budget_bytes=0, spans=spans, weight_bytes=0, state_bytes={},
                     overhead_bytes=0, read_bytes=0)


def param_count(config: ModelConfig) -> int:
    """Parameters of the whole model, counted from its layout (a tied embedding once)."""
    layout = model_layout(config, whole_model(config))
    shapes = {s.name: s.shape for s in layout.slices()}  # a tensor read in several slices (q, k, v rows) once
    return sum(math.prod(shape) for shape in shapes.values())


def model_layout(config: ModelConfig, shard: RankShard) -> ModelLayout:
    """Rank `shard`'s slices."""
    c, H, names = config, config.hidden_size, config.family.names

    def layer(i: int, p: str) -> LayerLayout:
        mixer, mlp = layer_kinds(c, i)
        norm = lambda name: whole(f"{p}{name}.weight", (H,)) if name else None  # noqa: E731
        return LayerLayout(mixer=mixer.name, attn_norm=norm(names.attn_norm),
                           attention=mixer.layout(c, shard, p + names.mixer(mixer.name)),
                           attn_out_norm=norm(names.attn_out_norm), mlp_norm=norm(names.mlp_norm),
                           mlp=mlp.layout(c, shard, p + (names.mlp if c.moe is None else c.moe.names.module + ".")),
                           mlp_out_norm=norm(names.mlp_out_norm))

    vocab = (c.vocab_size, H)
    embed = Slice(f"{c.text_prefix}embed_tokens.weight", vocab, shard.vocab_rows, split=VOCAB_ROWS)
    return ModelLayout(embed=embed,
                       layers=tuple(layer(i, f"{c.text_prefix}layers.{i}.") for i in range(c.num_layers)),
                       final_norm=whole(f"{c.text_prefix}norm.weight", (H,)),
                       lm_head=Slice("lm_head.weight", vocab, shard.vocab_rows, split=VOCAB_ROWS),
                       tied=c.tie_word_embeddings,
                       mtp=tuple(MtpLayout(embed_norm=whole("mtp.pre_fc_norm_embedding.weight", (H,)),
                                           hidden_norm=whole("mtp.pre_fc_norm_hidden.weight", (H,)),
                                           fc=linear(c.quant, "mtp.fc", (H, 2 * H), range(H)),
                                           layer=layer(c.num_layers + j, f"mtp.layers.{j}."),
                                           norm=whole("mtp.norm.weight", (H,)))
                                 for j in range(c.mtp_layers)))
