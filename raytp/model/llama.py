"""One rank's shard of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM; Qwen3-MoE, Mixtral).

Parallel layout (Megatron-style, widths from the ShardPlan, never `size // world_size`; the slices are named in
`raytp.model.layout`, and the layers of `raytp.model.layers` hold them and own their collectives):

    embedding   vocab-parallel: rank r holds rows vocab_rows[r]; a token outside them looks up zeros,
                and the all-reduce puts the one real row in place (adding zeros is exact)
    q/k/v       column-parallel by KV group: rank r computes its q_heads and kv_heads only
    o_proj      row-parallel: partial (batch, seq, hidden) sums          -> all-reduce #1 of the layer
    gate/up     column-parallel: rank r computes mlp_cols[r]
    down_proj   row-parallel: partial sums                               -> all-reduce #2 of the layer
    experts     in place of gate/up/down in a mixture of experts (raytp.model.moe): the router replicated,
                columns expert_cols[r] of every expert, partial sums     -> all-reduce #2 of the layer
    lm_head     vocab-parallel: rank r returns logits of vocab_rows[r] only (the sampler gathers
                candidates, never full logits)

A rank with zero heads or zero columns still joins every all-reduce, contributing zeros. Qwen3's q_norm and
k_norm (one head_dim weight each, every rank holds them whole) normalize each query and key head before RoPE, in
the RoPE kernel (raytp.kernels.rope_cache).
The math follows Hugging Face's LlamaForCausalLM step for step (float32 RMSNorm, rotate-half RoPE) so
that float32 logits match it closely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raytp.kernels import dispatch
from raytp.kernels.norm import add_rms_norm, rms_norm, swiglu
from raytp.model.config import ModelConfig
from raytp.model.formats.act_quant import runs_weight_only
from raytp.model.kv_cache import LayerCache, make_kv_cache
from raytp.model.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                                WeightReader)
from raytp.model.layout import LayerLayout, model_layout
from raytp.model.moe import SparseMoeBlock
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import RankShard


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim/2,), with llama3 long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class StepInputs:
    """What every layer's attention shares in one step, computed once per step, not once per layer."""

    cos: torch.Tensor  # (batch, seq, head_dim) RoPE at each position, in the model dtype
    sin: torch.Tensor
    lengths: torch.Tensor  # (batch,) each sequence's length after this step: the Triton decode attention reads it
    span: int  # cache positions the torch attention reads: the furthest position + 1, or max_context in a graph
    visible: torch.Tensor  # (batch, 1, seq, span) which of those positions each query may see


class DecoderLayer:
    """One transformer block's slice: this rank's heads of attention and columns of the MLP."""

    def __init__(self, config: ModelConfig, layout: LayerLayout, comm: Communicator, reader: WeightReader,
                 cache: LayerCache, act_quant_weight_only: bool):
        self.attn_norm, self.mlp_norm = reader.read(layout.attn_norm), reader.read(layout.mlp_norm)  # (hidden,)
        self.qk_norm = tuple(reader.read(s) for s in layout.qk_norm)  # (head_dim,) for q and k, or none
        self.qkv = ColumnParallelLinear(layout.qkv, layout.qkv_bias).load(reader, act_quant_weight_only)
        self.o_proj = RowParallelLinear(layout.o_proj, comm).load(reader, act_quant_weight_only)
        if layout.experts is None:
            self.gate_up = ColumnParallelLinear(layout.gate_up).load(reader, act_quant_weight_only)
            self.down = RowParallelLinear(layout.down, comm).load(reader, act_quant_weight_only)
            self.moe = None
        else:
            self.moe = SparseMoeBlock.load(layout.experts, config.moe, reader, comm, act_quant_weight_only)
        self.n_q, self.eps = self.o_proj.width // config.head_dim, config.rms_norm_eps
        self.cache = cache

    def attention(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        """(batch, seq, hidden) normed input -> attention output (batch, seq, hidden), summed over ranks."""
        if not self.n_q:  # no heads here: o_proj adds zeros
            return self.o_proj(h[..., :0])
        qkv = self.qkv(h)  # (batch, seq, (n_q + 2 n_kv) * head_dim)
        q_norm, k_norm = self.qk_norm or (None, None)  # applied by the RoPE kernel, not by kernels of their own
        # q: (batch, n_q, seq, head_dim)
        q = self.cache.write(qkv, self.n_q, step.cos, step.sin, positions, slots, q_norm, k_norm, self.eps)
        return self.o_proj(self.cache.attend(q, slots, step))  # attended: (batch, seq, n_q * head_dim)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) normed input -> MLP output (batch, seq, hidden), summed over ranks."""
        if self.moe is not None:
            return self.moe(h)
        if not self.down.width:  # no columns here: down_proj adds zeros
            return self.down(h[..., :0])
        return self.down(swiglu(self.gate_up(h)))  # gate/up: (batch, seq, 2 * local cols)

    def weights(self) -> list[torch.Tensor]:
        linears = (self.qkv, self.o_proj) + ((self.gate_up, self.down) if self.moe is None else ())
        return ([self.attn_norm, self.mlp_norm, *self.qk_norm] + [t for x in linears for t in x.weight.tensors()]
                + (self.moe.tensors() if self.moe is not None else []))


class ShardedLlama:
    """One rank's layers and KV cache, read through `reader` in the slices `raytp.model.layout` gives `shard`;
    `forward` runs them with the group's collectives. `kv_dtype` picks the cache (raytp.model.kv_cache): "auto" in
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
        shape = (config.num_layers, max_batch, len(shard.kv_heads), max_context, config.head_dim)
        self.cache = make_kv_cache(kv_dtype, shape, self.dtype, self.device)
        self.embed = VocabParallelEmbedding(layout.embed, comm).load(reader)
        self.layers = [DecoderLayer(config, layer, comm, reader, self.cache.layer(i), act_quant_weight_only)
                       for i, layer in enumerate(layout.layers)]
        head = ParallelLMHead(layout.lm_head)
        self.lm_head = head.tie(self.embed) if layout.tied else head.load(reader)
        inv_freq = rope_inv_freq(config).to(self.device)
        angles = torch.outer(torch.arange(max_context, dtype=torch.float32, device=self.device), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (positions, head_dim), rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()

    def weights(self) -> list[torch.Tensor]:
        """Every weight tensor this rank holds (a tied lm_head is the embedding's tensor, listed twice)."""
        return ([self.embed.table, self.final_norm] + self.lm_head.weight.tensors()
                + [t for layer in self.layers for t in layer.weights()])

    def cache_tensors(self) -> list[torch.Tensor]:
        """The KV cache as allocated, FP8 scales included: what the plan's kv_cache_bytes counts."""
        return self.cache.tensors()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Cache positions [0, length) of slot `src` into slot `dst`: a prompt prefilled once serves several
        samples."""
        self.cache.copy_slot(src, dst, length)

    def step_inputs(self, positions: torch.Tensor, dtype: torch.dtype, span: int | None = None) -> StepInputs:
        """By default the span ends at the furthest position (one GPU sync); a CUDA graph passes max_context."""
        span = span or int(positions.max()) + 1
        visible = torch.arange(span, device=positions.device).view(1, 1, span) <= positions.unsqueeze(-1)
        return StepInputs(cos=self.cos[positions].to(dtype), sin=self.sin[positions].to(dtype),
                          lengths=positions[:, -1] + 1, span=span, visible=visible.unsqueeze(1))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                last: torch.Tensor | None = None, span: int | None = None, every: bool = False) -> torch.Tensor:
        """Run tokens (batch, seq) at positions (batch, seq) of cache slots (batch,).

        Returns this rank's logits slice (batch, vocab_local) at index `last` (batch,) of each row
        (default: the last column), in float32; with `every`, those of every position (batch, seq, vocab_local),
        for the log-probabilities of a prompt.
        """
        eps = self.config.rms_norm_eps
        x = self.embed(tokens)  # (batch, seq, hidden): the residual stream, the same on every rank
        step = self.step_inputs(positions, x.dtype, span)
        h = rms_norm(x, self.layers[0].attn_norm, eps)  # the next sublayer's input
        following = [layer.attn_norm for layer in self.layers[1:]] + [self.final_norm]
        for layer, next_norm in zip(self.layers, following):
            # residual add fused with the next norm
            x, h = add_rms_norm(x, layer.attention(h, positions, slots, step), layer.mlp_norm, eps)
            x, h = add_rms_norm(x, layer.mlp(h), next_norm, eps)
        if every:
            B, T, H = h.shape
            return self.lm_head(h.reshape(B * T, H)).view(B, T, self.lm_head.width)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.lm_head(h[rows, last if last is not None else -1])  # (batch, hidden) -> (batch, vocab_local)
