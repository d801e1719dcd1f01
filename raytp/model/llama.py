"""One rank's shard of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM).

Parallel layout (Megatron-style, widths from the ShardPlan, never `size // world_size`):

    embedding   vocab-parallel: rank r holds rows vocab_rows[r]; a token outside them looks up zeros,
                and the all-reduce puts the one real row in place (adding zeros is exact)
    q/k/v       column-parallel by KV group: rank r computes its q_heads and kv_heads only
    o_proj      row-parallel: partial (batch, seq, hidden) sums          -> all-reduce #1 of the layer
    gate/up     column-parallel: rank r computes mlp_cols[r]
    down_proj   row-parallel: partial sums                               -> all-reduce #2 of the layer
    lm_head     vocab-parallel: rank r returns logits of vocab_rows[r] only (the sampler gathers
                candidates, never full logits)

A rank with zero heads or zero columns still joins every all-reduce, contributing zeros.
The math follows Hugging Face's LlamaForCausalLM step for step (float32 RMSNorm, rotate-half RoPE) so
that float32 logits match it closely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raytp.parallel.comm import Communicator
from raytp.model.config import ModelConfig
from raytp.kernels.attention import cached_attention
from raytp.kernels.norm import add_rms_norm, rms_norm, swiglu
from raytp.kernels.rope_cache import rope_and_cache
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


class ShardedLlama:
    """Holds one rank's weights and KV cache; `forward` runs the layers with the group's collectives.

    Local weight names (what `raytp.weights.checkpoint` and the synthetic initializer produce):
      embed (vocab_local, hidden), lm_head (vocab_local, hidden; the same tensor when tied), final_norm,
      layers.{i}.attn_norm / mlp_norm (hidden,), layers.{i}.wqkv ((q+2kv)*head_dim, hidden),
      layers.{i}.bqkv (optional), layers.{i}.wo (hidden, q*head_dim),
      layers.{i}.w_gate_up (2*cols, hidden), layers.{i}.w_down (hidden, cols).
    """

    def __init__(self, config: ModelConfig, shard: RankShard, comm: Communicator, weights: dict[str, torch.Tensor],
                 *, max_batch: int, max_context: int):
        self.config, self.shard, self.comm = config, shard, comm
        self.w = weights
        self.n_q, self.n_kv = len(shard.q_heads), len(shard.kv_heads)
        self.n_cols = len(shard.mlp_cols)
        self.vocab_start, self.n_vocab = shard.vocab_rows.start, len(shard.vocab_rows)
        ref = weights["final_norm"]
        self.dtype, self.device = ref.dtype, ref.device
        self.max_batch, self.max_context = max_batch, max_context
        # KV cache: (layers, batch slots, local kv heads, positions, head_dim), filled per slot
        shape = (config.num_layers, max_batch, self.n_kv, max_context, config.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        inv_freq = rope_inv_freq(config).to(self.device)
        angles = torch.outer(torch.arange(max_context, dtype=torch.float32, device=self.device), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (positions, head_dim), rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < self.n_vocab)
        if self.n_vocab:
            x = F.embedding(local.clamp(0, self.n_vocab - 1), self.w["embed"]) * mine.unsqueeze(-1).to(self.dtype)
        else:
            x = torch.zeros((*tokens.shape, self.config.hidden_size), dtype=self.dtype, device=self.device)
        return self.comm.all_reduce(x)

    def step_inputs(self, positions: torch.Tensor, dtype: torch.dtype, span: int | None = None) -> dict:
        """What every layer's attention shares in one step, computed once (not once per layer): RoPE
        cos/sin at each position, each sequence's length after this step, the span of keys the torch
        attention reads and which of them each query may see. By default the span ends at the furthest
        position (one GPU sync); a CUDA graph passes max_context."""
        span = span or int(positions.max()) + 1
        visible = torch.arange(span, device=positions.device).view(1, 1, span) <= positions.unsqueeze(-1)
        return {"cos": self.cos[positions].to(dtype), "sin": self.sin[positions].to(dtype),  # (batch, seq, head_dim)
                "lengths": positions[:, -1] + 1,
                "span": span, "visible": visible.unsqueeze(1)}  # (batch, 1, seq, span)

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  step: dict) -> torch.Tensor:
        """Partial o_proj output (batch, seq, hidden) of this rank's heads; zeros when it has none."""
        if self.n_q == 0:
            return torch.zeros_like(x)
        qkv = F.linear(x, self.w[f"layers.{i}.wqkv"], self.w.get(f"layers.{i}.bqkv"))
        q = rope_and_cache(qkv, self.n_q, self.n_kv, step["cos"], step["sin"], positions, slots,
                           self.k_cache[i], self.v_cache[i])  # (batch, q_heads, seq, head_dim)
        out = cached_attention(q, self.k_cache[i], self.v_cache[i], slots, step)
        return F.linear(out, self.w[f"layers.{i}.wo"])

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.n_cols == 0:
            return torch.zeros_like(x)
        return F.linear(swiglu(F.linear(x, self.w[f"layers.{i}.w_gate_up"])), self.w[f"layers.{i}.w_down"])

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                last: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor:
        """Run tokens (batch, seq) at positions (batch, seq) of cache slots (batch,).

        Returns this rank's logits slice (batch, vocab_local) at index `last` (batch,) of each row
        (default: the last column), in float32.
        """
        eps = self.config.rms_norm_eps
        x = self.embed(tokens)
        step = self.step_inputs(positions, x.dtype, span)
        h = rms_norm(x, self.w["layers.0.attn_norm"], eps)
        for i in range(self.config.num_layers):
            # residual add fused with the next norm: x is the residual stream, h the next sublayer's input
            x, h = add_rms_norm(x, self.comm.all_reduce(self.attention(i, h, positions, slots, step)),
                                self.w[f"layers.{i}.mlp_norm"], eps)
            following = f"layers.{i + 1}.attn_norm" if i + 1 < self.config.num_layers else "final_norm"
            x, h = add_rms_norm(x, self.comm.all_reduce(self.mlp(i, h)), self.w[following], eps)
        rows = torch.arange(h.shape[0], device=h.device)
        x = h[rows, last if last is not None else -1]  # (batch, hidden), after the final norm
        if self.n_vocab == 0:
            return torch.zeros((x.shape[0], 0), dtype=torch.float32, device=self.device)
        return F.linear(x, self.w["lm_head"]).float()
