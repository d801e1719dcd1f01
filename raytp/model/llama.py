"""One rank's shard of a decoder: the forward every family shares (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM;
Qwen3-MoE, Mixtral; Gemma 3), named for the Llama block it grew from.

Parallel layout (Megatron-style, widths from the ShardPlan, never `size // world_size`; the slices are named in
`raytp.model.layout`, and the layers of `raytp.model.layers` hold them and own their collectives):

    embedding   vocab-parallel: rank r holds rows vocab_rows[r]; a token outside them looks up zeros,
                and the all-reduce puts the one real row in place (adding zeros is exact)
    mixer       each layer's kind (raytp.model.attention: full or sliding-window attention): its heads on this
                rank, its own state (a KV cache, a window cache)       -> all-reduce #1 of the layer
    MLP         a dense MLP (raytp.model.mlp) or a mixture of experts (raytp.model.moe): this rank's columns
                                                                       -> all-reduce #2 of the layer
    lm_head     vocab-parallel: rank r returns logits of vocab_rows[r] only (the sampler gathers
                candidates, never full logits)

A layer is pre-norm residual: x += mixer(norm(x)), x += mlp(norm(x)), each residual add fused with the next norm;
a family with norms on the sublayer outputs too (Gemma's sandwich norms) normalizes each output before its add. A
rank with zero heads or zero columns still joins every all-reduce, contributing zeros. The math follows Hugging
Face's classes step for step (float32 RMSNorm, rotate-half RoPE) so that float32 logits match them closely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from raytp.kernels import dispatch
from raytp.kernels.norm import add_rms_norm, rms_norm
from raytp.model.config import ModelConfig
from raytp.model.formats.act_quant import runs_weight_only
from raytp.model.kv_cache import Rope
from raytp.model.layers import ParallelLMHead, VocabParallelEmbedding, WeightReader
from raytp.model.formats import read_linear
from raytp.model.layout import LayerLayout, MtpLayout, layer_count, layer_kinds, model_layout
from raytp.model.rope import RopeTables
from raytp.model.state import LayerState
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import RankShard


@dataclass(frozen=True)
class StepInputs:
    """What the layers of one step share, computed once per step, not once per layer: each mixer kind's RoPE
    angles and view of the step (`raytp.model.kinds`), by kind name."""

    rope: Mapping[str, Rope]
    views: Mapping[str, Any]
    verify: bool = False  # a verify step (speculative decoding): a state that cannot drop positions waits for them


class DecoderLayer:
    """One block's slice: this rank's share of its mixer and its MLP, its norms, its mixer's state."""

    def __init__(self, config: ModelConfig, index: int, layout: LayerLayout, comm: Communicator,
                 reader: WeightReader, state: LayerState | None, act_quant_weight_only: bool):
        def norm(s):  # (hidden,), as the forward multiplies by it
            return None if s is None else config.norm(reader.read(s))

        mixer, mlp = layer_kinds(config, index)
        self.attn_norm, self.attn_out_norm = norm(layout.attn_norm), norm(layout.attn_out_norm)
        self.mlp_norm, self.mlp_out_norm = norm(layout.mlp_norm), norm(layout.mlp_out_norm)
        self.attention = mixer.load(config, layout.attention, comm, reader, state, act_quant_weight_only)
        self.mlp = mlp.load(config, layout.mlp, comm, reader, None, act_quant_weight_only)

    def weights(self) -> list[torch.Tensor]:
        norms = (self.attn_norm, self.attn_out_norm, self.mlp_norm, self.mlp_out_norm)
        return [t for t in norms if t is not None] + self.attention.tensors() + self.mlp.tensors()


class MtpLayer:
    """A multi-token-prediction layer on this rank (`raytp.model.layout.MtpLayout`): its norms and fc whole, its
    full-attention layer's share and KV cache, held for speculative decoding, whose drafter runs it."""

    def __init__(self, config: ModelConfig, index: int, layout: MtpLayout, comm: Communicator, reader: WeightReader,
                 state: LayerState, act_quant_weight_only: bool):
        norms = (layout.embed_norm, layout.hidden_norm, layout.norm)
        self.embed_norm, self.hidden_norm, self.norm = (config.norm(reader.read(s)) for s in norms)
        self.fc = read_linear(reader, layout.fc)  # (hidden, 2 hidden): [normed embedding | normed hidden state]
        self.layer = DecoderLayer(config, index, layout.layer, comm, reader, state, act_quant_weight_only)

    def tensors(self) -> list[torch.Tensor]:
        return [self.embed_norm, self.hidden_norm, self.norm] + self.fc.tensors() + self.layer.weights()

    def __call__(self, embedded: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 step: StepInputs, eps: float) -> torch.Tensor:
        """The next position's hidden state (batch, seq, hidden), normed for the lm_head, from the embeddings of
        tokens (batch, seq, hidden) and the hidden states, as the lm_head reads them, of the positions before them
        (the decoder's, or this layer's own output when it drafts on). fc is whole: no collective; the attention
        and MLP join theirs."""
        x = self.fc.apply(torch.cat([rms_norm(embedded, self.embed_norm, eps), rms_norm(hidden, self.hidden_norm, eps)],
                                    dim=-1))
        layer = self.layer
        out = layer.attention(rms_norm(x, layer.attn_norm, eps), positions, slots, step)
        x, h = add_rms_norm(x, out, layer.mlp_norm, eps)
        return add_rms_norm(x, layer.mlp(h), self.norm, eps)[1]


class ShardedLlama:
    """One rank's layers and their states, read through `reader` in the slices `raytp.model.layout` gives `shard`;
    `forward` runs them with the group's collectives. `kv_dtype` picks the caches (raytp.model.kv_cache): "auto" in
    the model dtype, "fp8" as float8 e4m3 with a float32 scale per (slot, head, position). `act_quant_weight_only`:
    whether the group runs activation-quantized weights weight-only, the same on every rank
    (raytp.model.formats.act_quant.runs_weight_only); by default as a group of this rank's device would."""

    def __init__(self, config: ModelConfig, shard: RankShard, comm: Communicator, reader: WeightReader, *,
                 max_batch: int, max_context: int, kv_dtype: str = "auto", act_quant_weight_only: bool | None = None):
        self.config, self.shard, self.comm = config, shard, comm
        self.max_batch, self.max_context = max_batch, max_context
        self.vocab_start = shard.vocab_rows.start  # the sampler's offset of local token ids
        layout = model_layout(config, shard)
        self.final_norm = reader.read(layout.final_norm)  # (hidden,)
        self.dtype, self.device = self.final_norm.dtype, self.final_norm.device
        if act_quant_weight_only is None:
            act_quant_weight_only = runs_weight_only([self.device.type], dispatch.use_triton(self.final_norm))
        self.final_norm = config.norm(self.final_norm)
        mixers = [layer_kinds(config, i)[0] for i in range(layer_count(config))]
        self.mixers = {kind.name: kind for kind in mixers}
        states = [kind.state(config, shard, max_batch=max_batch, max_context=max_context, kv_dtype=kv_dtype,
                             dtype=self.dtype, device=self.device) for kind in mixers]
        self.states = [s for s in states if s is not None]
        self.embed = VocabParallelEmbedding(layout.embed, comm).load(reader)
        scale = config.embed_scale
        self.embed_scale = None if scale is None else torch.tensor(scale, dtype=self.dtype, device=self.device)
        self.layers = [DecoderLayer(config, i, layer, comm, reader, states[i], act_quant_weight_only)
                       for i, layer in enumerate(layout.layers)]
        self.mtp = [MtpLayer(config, config.num_layers + j, mtp, comm, reader, states[config.num_layers + j],
                             act_quant_weight_only) for j, mtp in enumerate(layout.mtp)]
        head = ParallelLMHead(layout.lm_head)
        self.lm_head = head.tie(self.embed) if layout.tied else head.load(reader)
        self.rope = RopeTables(config, max_context, self.device)

    def weights(self) -> list[torch.Tensor]:
        """Every weight tensor this rank holds (a tied lm_head is the embedding's tensor, listed twice)."""
        return ([self.embed.table, self.final_norm] + self.lm_head.weight.tensors()
                + [t for layer in self.layers for t in layer.weights()] + [t for m in self.mtp for t in m.tensors()])

    def cache_tensors(self) -> list[torch.Tensor]:
        """Every layer's state as allocated (KV and window caches, FP8 scales included): what the plan's
        kv_cache_bytes counts."""
        return [t for state in self.states for t in state.tensors()]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s state after `length` positions into slot `dst`: a prompt prefilled once serves several
        samples."""
        for state in self.states:
            state.copy_slot(src, dst, length)

    def step_inputs(self, positions: torch.Tensor, dtype: torch.dtype, span: int | None = None,
                    verify: bool = False) -> StepInputs:
        """By default the span ends at the furthest position (one GPU sync); a CUDA graph passes max_context."""
        span = span or int(positions.max()) + 1
        return StepInputs(rope=self.rope.step(positions, dtype),
                          views={name: kind.view(self.config, positions, span, self.max_context)
                                 for name, kind in self.mixers.items()}, verify=verify)

    def keep_verified(self, kept: torch.Tensor) -> None:
        """After a verify step (`forward(verify=True)`): each row keeps its first kept[b] + 1 positions. A KV cache
        has nothing to do (no query reads past a sequence's length); a recurrent state takes those positions in."""
        for state in self.states:
            state.keep(kept)

    def _embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (batch, seq, hidden): the residual stream, the same on every rank
        return x if self.embed_scale is None else x * self.embed_scale

    def _logits(self, h: torch.Tensor, last: torch.Tensor | None, every: bool) -> torch.Tensor:
        if every:
            B, T, H = h.shape
            return self.lm_head(h.reshape(B * T, H)).view(B, T, self.lm_head.width)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.lm_head(h[rows, last if last is not None else -1])  # (batch, hidden) -> (batch, vocab_local)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                last: torch.Tensor | None = None, span: int | None = None, every: bool = False,
                verify: bool = False, hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run tokens (batch, seq) at positions (batch, seq) of cache slots (batch,).

        Returns this rank's logits slice (batch, vocab_local) at index `last` (batch,) of each row
        (default: the last column), in float32; with `every`, those of every position (batch, seq, vocab_local),
        for the log-probabilities of a prompt or a verify step; `verify`: a verify step, after which `keep_verified`
        must say what each row keeps. With `hidden`, (logits, the last layer's hidden states after the final norm,
        (batch, seq, hidden), whole on every rank): what an MTP layer reads (`mtp_forward`).
        """
        eps = self.config.rms_norm_eps
        x = self._embedded(tokens)
        step = self.step_inputs(positions, x.dtype, span, verify)
        h = rms_norm(x, self.layers[0].attn_norm, eps)  # the next sublayer's input
        following = [layer.attn_norm for layer in self.layers[1:]] + [self.final_norm]
        for layer, next_norm in zip(self.layers, following):
            out = layer.attention(h, positions, slots, step)
            if layer.attn_out_norm is not None:
                out = rms_norm(out, layer.attn_out_norm, eps)
            x, h = add_rms_norm(x, out, layer.mlp_norm, eps)  # residual add fused with the next norm
            out = layer.mlp(h)
            if layer.mlp_out_norm is not None:
                out = rms_norm(out, layer.mlp_out_norm, eps)
            x, h = add_rms_norm(x, out, next_norm, eps)
        logits = self._logits(h, last, every)
        return (logits, h) if hidden else logits

    @torch.inference_mode()
    def mtp_forward(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    slots: torch.Tensor, last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP layer over tokens (batch, seq), each paired with `hidden` (batch, seq, hidden): the hidden
        state, as `forward(hidden=True)` gives it, of the position before the token's, where the token was drawn;
        it runs at that position, `positions` (batch, seq), of cache slots (batch,) (vLLM's Qwen3.5 MTP does the
        same). Its output at a position guesses the decoder's hidden state at the next one, whose logits guess the
        token after the given one. Returns (this rank's logits slice at index `last` of each row, default the last,
        the layer's hidden states (batch, seq, hidden), to feed it again)."""
        x = self._embedded(tokens)
        step = self.step_inputs(positions, x.dtype)
        h = self.mtp[0](x, hidden, positions, slots, step, self.config.rms_norm_eps)
        return self._logits(h, last, False), h
