"""The gated delta rule (Gated DeltaNet, arXiv 2412.06464): the recurrence of Qwen3.5's linear-attention layers.

Per value head, with a state S of (key dim, value dim), q and k L2-normalized and each key head serving
value_heads / key_heads consecutive value heads:

    S_t = exp(g_t) S_{t-1} + k_t d_t^T,    d_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)    (the delta rule)
    o_t = S_t^T q_t / sqrt(key dim)

    chunk_gated_delta_rule       a prompt: CHUNK tokens at a time in matmuls (the WY form below), one state
                                 update per chunk
    recurrent_gated_delta_rule   decode: token by token, one state update each

Both take q, k (batch, seq, key heads, key dim), v (batch, seq, value heads, value dim), g and beta (batch, seq,
value heads) and the state (batch, value heads, key dim, value dim) in float32, and return the output (batch, seq,
value heads, value dim) in v's dtype with the state after the last token, in float32. On CUDA they are the Triton
kernels of fla-core (flash-linear-attention, the `fla` extra) when it is installed: its recurrent kernel launches
without a host sync, so a decode step holding it is captured in a CUDA graph; elsewhere (CPUs, or without fla-core)
the torch versions here run, in float32 throughout.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from raytp.kernels import dispatch

CHUNK = 64  # tokens per chunk of the torch prefill: (CHUNK x CHUNK) triangular solves per head, fla-core's size too
L2_EPS = 1e-6  # inside the L2 norm's square root, as fla-core and transformers put it


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a prompt (chunk) from `state`, and the state after its last token (module docstring)."""
    fla = _fla(q)
    if fla is not None:
        return fla.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    return _torch_chunk(q, k, v, g, beta, state)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a few tokens (a decode step) from `state`, token by token, and the state after the last."""
    fla = _fla(q)
    if fla is not None:
        return fla.fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    return _torch_recurrent(q, k, v, g, beta, state)


def _fla(t: torch.Tensor):
    """fla-core's gated delta rule module where its kernels run for tensors like t, else None."""
    return _fla_module() if dispatch.use_triton(t) else None


@cache  # one import attempt per process
def _fla_module():
    try:
        from fla.ops import gated_delta_rule
    except ImportError:
        return None
    return gated_delta_rule


def _heads_first(q, k, v, g, beta):
    """float32, L2-normalized and scaled q, L2-normalized k, both repeated for their value heads, everything
    (batch, value heads, seq, ...)."""
    repeat = v.shape[2] // k.shape[2]
    q, k = (x.float() * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + L2_EPS) for x in (q, k))
    q = q * q.shape[-1] ** -0.5
    q, k = (x.repeat_interleave(repeat, dim=2) for x in (q, k))
    return [x.float().transpose(1, 2) for x in (q, k, v, g, beta)]


def _torch_recurrent(q, k, v, g, beta, state):
    out_dtype = v.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)  # (batch, heads, seq, ...)
    S = state.float()  # (batch, heads, key dim, value dim)
    out = torch.empty_like(v)
    for t in range(v.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]  # (batch, heads, key dim)
        delta = beta[:, :, t, None] * (v[:, :, t] - (S * kt[..., None]).sum(-2))  # (batch, heads, value dim)
        S = S + kt[..., None] * delta[..., None, :]
        out[:, :, t] = (S * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2).to(out_dtype), S


def _torch_chunk(q, k, v, g, beta, state):
    """Within a chunk of C tokens starting from state S0, with G the cumulative log decay from the chunk's start:
    the deltas solve (I + A) d = beta v - (beta k exp(G)) S0, A[i, j] = beta_i (k_i . k_j) exp(G_i - G_j) for
    j < i; then o = (q exp(G)) S0 + ((q k^T) * exp(G_i - G_j), j <= i) d and the chunk's last state is
    exp(G_C) S0 + (k exp(G_C - G))^T d. Padding tokens at the end have k = 0 and g = 0: they change nothing."""
    out_dtype, T = v.dtype, v.shape[1]
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    pad = -T % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    B, H, n = v.shape[0], v.shape[1], v.shape[2] // CHUNK
    q, k, v = (x.view(B, H, n, CHUNK, x.shape[-1]) for x in (q, k, v))  # (batch, heads, chunks, C, dim)
    G = g.view(B, H, n, CHUNK).cumsum(-1)  # (batch, heads, chunks, C)
    seen = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=v.device).tril()  # j <= i
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~seen, float("-inf")).exp()  # (..., C, C)
    k_beta = k * beta.view(B, H, n, CHUNK, 1)
    system = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1) + torch.eye(CHUNK, device=v.device)
    u = torch.linalg.solve_triangular(system, v * beta.view(B, H, n, CHUNK, 1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # within the chunk, (..., C, C)
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    S = state.float()
    out = torch.empty_like(v)
    for c in range(n):
        delta = u[:, :, c] - w[:, :, c] @ S  # (batch, heads, C, value dim)
        out[:, :, c] = q_decayed[:, :, c] @ S + attn[:, :, c] @ delta
        S = S * G[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ delta
    out = out.view(B, H, n * CHUNK, -1)[:, :, :T]
    return out.transpose(1, 2).to(out_dtype), S
