"""The routed experts of `raytp.kernels.moe_gemv` over integer-quantized experts (GPTQ, AWQ, compressed-tensors
int4/int8): the same two launches over (column block, expert, tile of 16 tokens), each program returning at once
when no token of its tile chose its expert, so a decode step reads only the selected experts; each weight tile is
dequantized in registers as it is loaded.

The experts are stacked as they are stored (the IntWeight layout of `raytp.kernels.dequant_matmul`, one more
leading dimension): `packed` int32 (experts, rows, inputs // per), `scales` (experts, rows, groups) in the model
dtype, `zeros` likewise or None (symmetric: 2**(bits - 1)), `g_idx` int32 (experts, inputs) or None (contiguous
groups: input j in group j // group_size). Each weight is (q - zero) * scale rounded once to the model dtype, as
`dequantize` makes it, and each projection's output is rounded to the model dtype as F.linear's is, so the result
is `grouped_experts` over the dequantized weights up to the order of the float32 sums.

Unlike the dense kernels this one has not yet been measured on a GPU: it runs where RuntimeOptions
.triton_routed_int_experts asks for it (`dispatch.use_triton_routed_int_experts`); otherwise each expert is repacked
for `raytp.kernels.packed_gemv` and applied to the tokens that chose it (in a CUDA graph: to every token, weighted
zero where not chosen, since the graph cannot wait for the routing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raytp.kernels.dispatch import triton
from raytp.kernels.moe_gemv import _TILE, DOWN_LAUNCH, GATE_UP_LAUNCH, Launch


@dataclass
class StackedInt:
    """One projection of every expert, stacked (see the module docstring)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int

    @classmethod
    def stack(cls, weights: Sequence) -> StackedInt | None:
        """IntWeights of one projection, one per expert, stacked; None unless all share one format and shape."""
        def form(w) -> tuple | None:  # what must agree; None: not an IntWeight the kernels read
            if not hasattr(w, "bits") or w.group_start or w.bias is not None:
                return None
            return w.bits, w.group_size, w.packed.shape, w.scales.shape, w.zeros is None, w.g_idx is None

        first = weights[0]
        if form(first) is None or any(form(w) != form(first) for w in weights):
            return None
        stacked = lambda name: torch.stack([getattr(w, name) for w in weights]).contiguous()  # noqa: E731
        return cls(stacked("packed"), stacked("scales"), None if first.zeros is None else stacked("zeros"),
                   None if first.g_idx is None else stacked("g_idx").to(torch.int32), first.bits, first.group_size)

    def experts(self, weights: Sequence) -> list:
        """`weights` (those stacked) as views of the stacks, so that nothing is held twice."""
        view = lambda t, e: None if t is None else t[e]  # noqa: E731
        return [dataclasses.replace(w, packed=self.packed[e], scales=self.scales[e], zeros=view(self.zeros, e),
                                    g_idx=view(self.g_idx, e)) for e, w in enumerate(weights)]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales, self.zeros, self.g_idx) if t is not None]


def routed_int_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: StackedInt,
                       down: StackedInt, gate_up_launch: Launch = GATE_UP_LAUNCH,
                       down_launch: Launch = DOWN_LAUNCH) -> torch.Tensor:
    """x (tokens, hidden), ids (tokens, k) int64, weights (tokens, k) float32 -> (tokens, hidden) in x's dtype."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    (T, H), k = x.shape, ids.shape[1]
    E, C = down.packed.shape[0], gate_up.packed.shape[1] // 2
    h = torch.empty((T, k, C), dtype=x.dtype, device=x.device)  # every (token, choice) row is written once
    y = torch.empty((T, k, H), dtype=torch.float32, device=x.device)
    tiles, kp = triton.cdiv(T, _TILE), triton.next_power_of_2(k)
    shape = dict(K=k, KP=kp, TILE=_TILE)
    for stacked, launch, grid, args in (
            (gate_up, gate_up_launch, (triton.cdiv(C, gate_up_launch.block_n), E, tiles), (x, ids, h, T, H, C)),
            (down, down_launch, (triton.cdiv(H, down_launch.block_n), E, tiles), (h, ids, weights, y, T, H, C))):
        quant = (stacked.packed, stacked.scales, stacked.zeros if stacked.zeros is not None else stacked.scales,
                 stacked.g_idx if stacked.g_idx is not None else stacked.packed, stacked.scales.shape[-1])
        flags = dict(BITS=stacked.bits, GROUP=stacked.group_size, HAS_ZEROS=stacked.zeros is not None,
                     HAS_GIDX=stacked.g_idx is not None, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k)
        kernel = _routed_int_gate_up if stacked is gate_up else _routed_int_down
        kernel[grid](*args, *quant, **shape, **flags, num_warps=launch.warps)
    return y.sum(dim=1).to(x.dtype)  # the choices in order, in float32


if triton is not None:
    import triton.language as tl

    from raytp.kernels.moe_gemv import _tile_choices

    @triton.jit
    def _dequantized(packed_ptr, scales_ptr, zeros_ptr, gidx_ptr, expert, rows, row_ok, ks, k_ok, R, KIN, G,
                     dtype: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     HAS_GIDX: tl.constexpr):
        """Rows `rows` x inputs `ks` of expert `expert`'s weight, (q - zero) * scale rounded to `dtype`."""
        PER: tl.constexpr = 32 // BITS
        ok = row_ok[:, None] & k_ok[None, :]
        words = tl.load(packed_ptr + (expert * R + rows[:, None]) * (KIN // PER) + (ks // PER)[None, :], mask=ok,
                        other=0)
        q = (words >> ((ks % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
        if HAS_GIDX:
            g = tl.load(gidx_ptr + expert * KIN + ks, mask=k_ok, other=0)
        else:
            g = ks // GROUP
        at = (expert * R + rows[:, None]) * G + g[None, :]
        scale = tl.load(scales_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + at, mask=ok, other=0.0).to(tl.float32)
        else:
            zero = (1 << (BITS - 1)) * 1.0
        return ((q.to(tl.float32) - zero) * scale).to(dtype)  # exact in float32, then rounded once

    @triton.jit
    def _routed_int_gate_up(x_ptr, ids_ptr, h_ptr, T, H, C, packed_ptr, scales_ptr, zeros_ptr, gidx_ptr, G,
                            K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BITS: tl.constexpr,
                            GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[t, j, cols] = swiglu(gate_up[e] @ x[t]) for the tile's tokens t whose choice j is expert e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, j, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:  # nobody here chose this expert: read none of it
            return
        dtype = h_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        gate = tl.zeros((TILE, BLOCK_N), tl.float32)
        up = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            xt = tl.load(x_ptr + tok[:, None] * H + k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
            wg = _dequantized(packed_ptr, scales_ptr, zeros_ptr, gidx_ptr, expert, cols, cols < C, k, k_ok, 2 * C,
                              H, G, dtype, BITS, GROUP, HAS_ZEROS, HAS_GIDX)
            wu = _dequantized(packed_ptr, scales_ptr, zeros_ptr, gidx_ptr, expert, C + cols, cols < C, k, k_ok,
                              2 * C, H, G, dtype, BITS, GROUP, HAS_ZEROS, HAS_GIDX)
            gate = tl.dot(xt, tl.trans(wg), gate, input_precision="ieee")
            up = tl.dot(xt, tl.trans(wu), up, input_precision="ieee")
        g = gate.to(dtype).to(tl.float32)  # each projection rounded to the model dtype, as F.linear's output is
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)  # torch rounds silu's result before the product
        h = (silu.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(h_ptr + (tok * K + j)[:, None] * C + cols[None, :], h, mask=live[:, None] & (cols < C)[None, :])

    @triton.jit
    def _routed_int_down(h_ptr, ids_ptr, weights_ptr, y_ptr, T, H, C, packed_ptr, scales_ptr, zeros_ptr, gidx_ptr,
                         G, K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BITS: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[t, j, rows] = weights[t, j] * (down[e] @ h[t, j])[rows] in float32, for the tile's tokens choosing e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, j, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:
            return
        dtype = h_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        pair = tok * K + j  # the (token, choice) row of h, y and weights
        acc = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + ks
            k_ok = k < C
            ht = tl.load(h_ptr + pair[:, None] * C + k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
            w = _dequantized(packed_ptr, scales_ptr, zeros_ptr, gidx_ptr, expert, rows, rows < H, k, k_ok, H, C, G,
                             dtype, BITS, GROUP, HAS_ZEROS, HAS_GIDX)
            acc = tl.dot(ht, tl.trans(w), acc, input_precision="ieee")
        out = acc.to(dtype).to(tl.float32)  # down's output in the model dtype, then weighted
        w = tl.load(weights_ptr + pair, mask=live, other=0.0)
        tl.store(y_ptr + pair[:, None] * H + rows[None, :], out * w[:, None],
                 mask=live[:, None] & (rows < H)[None, :])
