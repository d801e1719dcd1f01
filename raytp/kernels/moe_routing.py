"""The two ends of a mixture-of-experts block around its expert GEMVs: routing (each token's top-k experts and their
weights, from the router's logits) and combining (each token's output, the weighted sum of its choices' outputs).

    route     weights, ids = top-k of softmax(logits) over the experts, in float32; renormalized to sum to 1 where
              the model says so
    combine   out[t] = sum over j of weights[t, j] * y[t, j], in float32, rounded once to the model dtype

torch spends four kernels on routing (softmax, topk, sum, divide) and up to four on combining (cast, multiply, sum,
cast); inside a CUDA graph each still costs ~2 us of GPU time plus a gap, 48 layers a step in Qwen3-30B-A3B. The
Triton kernels, which run wherever Triton does, do each end in one launch, one program per token (routing) or per
token and block of the hidden size (combining): on one H100 they cut a Qwen3-30B-A3B decode step's small kernels
from 1.31 to 0.53 ms.

Top-k as transformers does it (torch.topk of the float32 probabilities): the kernel takes the largest probability k
times, the lowest expert id first among equal ones. Equal probabilities are the one case where its choice may differ
from torch.topk's (whose order among ties is unspecified); every rank runs the same code on the same all-reduced
input, so the ranks still agree with each other. The exponentials and the sums may differ from torch's in the last
bit of a float32 weight (~6e-8 relative), and the combined sum in the order of its additions, far below the model
dtype's rounding of the block's output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raytp.kernels.dispatch import triton, use_triton


def top_k_routing_torch(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, experts) -> weights (tokens, top_k) float32, expert ids (tokens, top_k) int64; transformers'
    Qwen3MoeTopKRouter and MixtralTopKRouter step for step."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), ids


def by_expert(x: torch.Tensor, ids: torch.Tensor, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    """`run(rows, experts)` over the (token, choice) pairs grouped by expert (rows: each pair's token's row of x,
    experts: each pair's expert id, ascending), its per-pair outputs put back in (token, choice) order: (pairs, n).
    On the GPU throughout: no host sync."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    by = run(x[order // ids.shape[1]].contiguous(), flat[order].contiguous())
    out = torch.empty_like(by)
    out[order] = by
    return out


def combine_choices_torch(y: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y (tokens, k, hidden) any dtype, weights (tokens, k) float32 or None (y already weighted) -> (tokens, hidden)
    in `dtype`: the choices summed in float32, in the order torch's sum over a dimension picks (one kernel; CPUs and
    GPUs add in different orders, the Triton kernel in choice order)."""
    y = y.float()
    if weights is not None:
        y = y * weights.float().unsqueeze(-1)
    return y.sum(dim=1).to(dtype)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _top_k_routing_kernel(logits_ptr, weights_ptr, ids_ptr, E, K: tl.constexpr, KP: tl.constexpr,
                              NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, BLOCK_E)
        logit = tl.load(logits_ptr + row * E + experts, mask=experts < E, other=-float("inf")).to(tl.float32)
        p = tl.exp(logit - tl.max(logit, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(experts < E, p, -1.0)  # padding is never chosen: every probability is >= 0
        choices = tl.arange(0, KP)
        weights = tl.zeros((KP,), tl.float32)
        ids = tl.zeros((KP,), tl.int64)
        total = 0.0
        for j in tl.static_range(K):
            best = tl.max(p, axis=0)
            pick = tl.min(tl.where(p == best, experts, BLOCK_E), axis=0)  # the lowest id among equal ones
            weights = tl.where(choices == j, best, weights)
            ids = tl.where(choices == j, pick.to(tl.int64), ids)
            total += best  # in choice order, as torch sums k values
            p = tl.where(experts == pick, -1.0, p)
        if NORMALIZE:
            weights = weights / total
        tl.store(weights_ptr + row * K + choices, weights, mask=choices < K)
        tl.store(ids_ptr + row * K + choices, ids, mask=choices < K)

    @triton.jit
    def _combine_choices_kernel(y_ptr, weights_ptr, out_ptr, H, K: tl.constexpr, WEIGHTED: tl.constexpr,
                                BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for j in tl.static_range(K):
            y = tl.load(y_ptr + (token * K + j) * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            if WEIGHTED:
                y = y * tl.load(weights_ptr + token * K + j)
            acc += y
        tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


_COMBINE_BLOCK = 1024  # hidden columns per program: Qwen3-30B-A3B's 2048 in two, 8 warps' 16-byte loads of float32


def top_k_routing(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k_routing_torch`'s result, from one Triton launch where it runs (see the module docstring)."""
    if not use_triton(logits):
        return top_k_routing_torch(logits, top_k, normalize)
    tokens, experts = logits.shape
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    _top_k_routing_kernel[(tokens,)](logits.contiguous(), weights, ids, experts, K=top_k,
                                     KP=triton.next_power_of_2(top_k), NORMALIZE=normalize,
                                     BLOCK_E=triton.next_power_of_2(experts))
    return weights, ids


def combine_choices(y: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`combine_choices_torch`'s result, from one Triton launch where it runs."""
    if not use_triton(y):
        return combine_choices_torch(y, weights, dtype)
    tokens, k, hidden = y.shape
    out = torch.empty((tokens, hidden), dtype=dtype, device=y.device)
    w = weights.float().contiguous() if weights is not None else out  # not read unless weighted
    _combine_choices_kernel[(tokens, triton.cdiv(hidden, _COMBINE_BLOCK))](
        y.contiguous(), w, out, hidden, K=k, WEIGHTED=weights is not None, BLOCK=_COMBINE_BLOCK, num_warps=8)
    return out
