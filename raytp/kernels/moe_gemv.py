"""The routed experts of a mixture-of-experts block: each token's selected experts, weighted, over this rank's columns.

    out[t] = sum_j weights[t, j] * down[e] @ swiglu(gate_up[e] @ x[t]),   e = ids[t, j]

`gate_up` (experts, 2 * cols, hidden) holds each expert's gate rows then its up rows, `down` (experts, hidden, cols)
the matching input columns: the rank's column slice of every expert, so `out` is a partial sum the caller
all-reduces. An MoE decode step must read only the selected experts' weights (8 of 128 in Qwen3-30B-A3B): a dense
formulation would stream 16 times the bytes.

    Triton (`routed_experts`: decode, every step inside a CUDA graph, prefill before Hopper): two launches over a
        grid of (column block, expert, tile of 16 tokens); a program whose expert no token of its tile selected
        returns at once, so only the selected experts' slices are read, each once per tile however many tokens
        share it.
        The first computes gate and up of its columns for the tile's tokens and applies SwiGLU; the second
        multiplies by down and the routing weights, one float32 row per (token, choice), summed over the choices
        in a fixed order afterwards (no atomics: the same inputs give the same bits).
    torch._grouped_mm (`grouped_mm_experts`: prefill in bfloat16 on GPUs of compute capability 9.0+): the (token,
        choice) pairs sorted by expert on the GPU, gate/up and down each one grouped GEMM over every expert's rows,
        the pairs put back in order and summed over the choices; no host sync, so also inside a CUDA graph.
    torch (`routed_experts_torch`, `grouped_experts`: CPU, Triton off; the reference the kernels are tested
        against): tokens sorted by expert, one matmul per selected expert. Sorting needs the counts on the host,
        which a CUDA graph cannot wait for, so inside a capture (Triton off) every expert runs on every token, with
        weight zero where it was not chosen.

Which of them a rank runs is chosen at load (raytp.model.experts).

Both round where torch's step-by-step version does (each projection's output to the model dtype, silu before the
product) and accumulate the weighted expert outputs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton
from raytp.kernels.moe_routing import by_expert, combine_choices
from raytp.kernels.norm import swiglu, swiglu_torch

_TILE = 16  # tokens per program: the smallest M of a tensor-core tile


@dataclass(frozen=True)
class Launch:
    """One kernel's tile: output columns (gate/up) or rows (down) per program, inner-dimension step, warps."""

    block_n: int
    block_k: int
    warps: int


GATE_UP_LAUNCH, DOWN_LAUNCH = Launch(32, 128, 4), Launch(64, 128, 4)  # benchmarks/moe_gemv.py --sweep, H200


def routed_experts_torch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                         down: torch.Tensor) -> torch.Tensor:
    """x (tokens, hidden), ids (tokens, k) int64, weights (tokens, k) float32 -> (tokens, hidden) in x's dtype."""
    return grouped_experts(x, ids, weights, gate_up.shape[0], lambda e, t: F.linear(t, gate_up[e]),
                           lambda e, h: F.linear(h, down[e]))


def grouped_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                    gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                    down: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`routed_experts_torch` with each expert's projections given as functions (expert, input) -> output, for
    experts in any weight format (`raytp.model.experts.TorchExperts`)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert, tokens, w in expert_groups(ids, weights, num_experts):
        h = swiglu_torch(gate_up(expert, x[tokens]))  # (n, cols)
        out.index_add_(0, tokens, down(expert, h).float() * w[:, None])
    return out.to(x.dtype)


def expert_groups(ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """(expert, its tokens, their routing weights) for every expert that some token selected."""
    tokens, k = ids.shape
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        # no host sync inside a capture: every expert on every token, weighted 0 where not selected
        dense = torch.zeros((tokens, num_experts), dtype=weights.dtype, device=ids.device).scatter_(1, ids, weights)
        every = torch.arange(tokens, device=ids.device)
        return [(e, every, dense[:, e]) for e in range(num_experts)]
    order = ids.flatten().argsort(stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(ids.flatten(), minlength=num_experts).tolist()
    grouped = zip(range(num_experts), (order // k).split(counts), weights.flatten()[order].split(counts))
    return [(e, t, w) for e, t, w in grouped if len(t)]


def grouped_mm_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """`routed_experts_torch`'s result from two torch._grouped_mm calls over the (token, choice) pairs sorted by
    expert, the choices then summed in order. Needs the hidden size and the columns in whole 16-byte vectors."""
    def grouped(rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))  # bincount syncs to size it
        ends = counts.cumsum(0, dtype=torch.int32)  # each expert's last pair + 1
        h = swiglu(torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=ends))  # (pairs, cols)
        return torch._grouped_mm(h, down.transpose(1, 2), offs=ends)  # (pairs, hidden)

    return combine_choices(by_expert(x, ids, grouped).view(*ids.shape, -1), weights, x.dtype)


def grouped_mm_reads(down: torch.Tensor) -> bool:
    """Whether the hidden size and the columns of experts like `down` (experts, hidden, cols) are whole 16-byte
    vectors, as torch._grouped_mm's kernels read them (any real model's are; a rank's uneven share of the columns may
    not be)."""
    return all(n * down.element_size() % 16 == 0 for n in down.shape[1:])


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tile_choices(ids_ptr, expert, T, K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr):
        """The tile's tokens, which of their k choices is `expert` (j), and whether they chose it at all (live)."""
        tok = tl.program_id(2) * TILE + tl.arange(0, TILE)
        choice = tl.arange(0, KP)
        chosen = tl.load(ids_ptr + tok[:, None] * K + choice[None, :],
                         mask=(tok[:, None] < T) & (choice[None, :] < K), other=-1) == expert
        j = tl.sum(tl.where(chosen, choice[None, :], 0), axis=1)  # top-k ids are distinct: at most one match
        return tok, j, tl.max(chosen.to(tl.int32), axis=1) > 0

    @triton.jit
    def _routed_gate_up_gemv(x_ptr, ids_ptr, w_ptr, h_ptr, T, H, C, K: tl.constexpr, KP: tl.constexpr,
                        TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[t, j, cols] = swiglu(gate_up[e] @ x[t]) for the tile's tokens t whose choice j is expert e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, j, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:  # nobody here chose this expert: read none of it
            return
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * H + ks[None, :]
        gate_ptrs = w_ptr + expert * 2 * C * H + cols[:, None] * H + ks[None, :]  # (BLOCK_N, BLOCK_K)
        gate = tl.zeros((TILE, BLOCK_N), tl.float32)
        up = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            in_k = (ks + k0 < H)[None, :]
            xt = tl.load(x_ptrs + k0, mask=live[:, None] & in_k, other=0.0)
            w_mask = (cols < C)[:, None] & in_k
            gate = tl.dot(xt, tl.trans(tl.load(gate_ptrs + k0, mask=w_mask, other=0.0)), gate,
                          input_precision="ieee")
            up = tl.dot(xt, tl.trans(tl.load(gate_ptrs + C * H + k0, mask=w_mask, other=0.0)), up,
                        input_precision="ieee")
        dtype = h_ptr.dtype.element_ty
        g = gate.to(dtype).to(tl.float32)  # each projection rounded to the model dtype, as F.linear's output is
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)  # torch rounds silu's result before the product
        h = (silu.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(h_ptr + (tok * K + j)[:, None] * C + cols[None, :], h, mask=live[:, None] & (cols < C)[None, :])

    @triton.jit
    def _routed_down_gemv(h_ptr, ids_ptr, weights_ptr, d_ptr, y_ptr, T, H, C, K: tl.constexpr, KP: tl.constexpr,
                     TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[t, j, rows] = weights[t, j] * (down[e] @ h[t, j])[rows] in float32, for the tile's tokens choosing e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, j, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:
            return
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        pair = tok * K + j  # the (token, choice) row of h, y and weights
        h_ptrs = h_ptr + pair[:, None] * C + ks[None, :]
        d_ptrs = d_ptr + expert * H * C + rows[:, None] * C + ks[None, :]  # (BLOCK_N, BLOCK_K)
        acc = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            in_k = (ks + k0 < C)[None, :]
            ht = tl.load(h_ptrs + k0, mask=live[:, None] & in_k, other=0.0)
            acc = tl.dot(ht, tl.trans(tl.load(d_ptrs + k0, mask=(rows < H)[:, None] & in_k, other=0.0)), acc,
                         input_precision="ieee")
        out = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # down's output in the model dtype, then weighted
        w = tl.load(weights_ptr + pair, mask=live, other=0.0)
        tl.store(y_ptr + pair[:, None] * H + rows[None, :], out * w[:, None],
                 mask=live[:, None] & (rows < H)[None, :])


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, gate_up_launch: Launch = GATE_UP_LAUNCH,
                   down_launch: Launch = DOWN_LAUNCH) -> torch.Tensor:
    """`routed_experts_torch`'s result from the Triton kernels (CUDA tensors, or the interpreter's CPU ones)."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    (T, H), k, (E, C) = x.shape, ids.shape[1], (down.shape[0], down.shape[2])
    h = torch.empty((T, k, C), dtype=x.dtype, device=x.device)  # every (token, choice) row is written once
    y = torch.empty((T, k, H), dtype=torch.float32, device=x.device)
    tiles, kp = triton.cdiv(T, _TILE), triton.next_power_of_2(k)
    a, b, shape = gate_up_launch, down_launch, dict(K=k, KP=kp, TILE=_TILE)
    _routed_gate_up_gemv[(triton.cdiv(C, a.block_n), E, tiles)](x, ids, gate_up, h, T, H, C, **shape, BLOCK_N=a.block_n,
                                                                BLOCK_K=a.block_k, num_warps=a.warps)
    _routed_down_gemv[(triton.cdiv(H, b.block_n), E, tiles)](h, ids, weights, down, y, T, H, C, **shape,
                                                             BLOCK_N=b.block_n, BLOCK_K=b.block_k, num_warps=b.warps)
    return combine_choices(y, None, x.dtype)  # the choices in order, in float32
