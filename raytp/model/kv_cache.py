"""One attention layer's cache of keys and values for its rank's KV heads: a `raytp.model.state.LayerState`.

    KVCache      every position up to max_context (full attention)
    WindowCache  the last `window` positions in a ring, position p in cell p % window (sliding-window attention):
                 its memory is the window, whatever the context

Either stores in the model dtype (`--kv-dtype auto`) or as float8 e4m3 with a float32 scale per row (`--kv-dtype
fp8`, raytp.kernels.kv_fp8). `attention` writes this step's keys and values (RoPE applied on the way, through
`raytp.kernels.rope_cache`) and attends over what each query may see (`raytp.kernels.attention`). `kv_row_bytes` is
the cost of one row, which the layer kinds declare to the planner (`raytp.model.attention`) and `tensors()`
allocates: the two agree.

A window cache in a decode step (one query per sequence) holds exactly the positions the query sees once this step's
key is in: the decode attention reads min(length, window) cells, in ring order (attention does not depend on the
order of its keys). A chunk of several positions per sequence (a prefill) would overwrite cells its own earlier
queries still need, so it attends over the ring as it was plus the chunk's own keys, then stores the chunk's last
`window` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels import kv_fp8
from raytp.kernels.attention import attention_with_sinks, cached_attention
from raytp.kernels.rope_cache import rope_and_cache


def kv_row_bytes(head_dim: int, nbytes: int, kv_dtype: str) -> int:
    """Bytes of one cached row, the keys (or the values) of one KV head at one position: head_dim elements in the
    model dtype (`nbytes` each), or with fp8 one byte each plus the row's float32 scale."""
    return head_dim + 4 if kv_dtype == "fp8" else head_dim * nbytes


@dataclass(frozen=True)
class Rope:
    """One step's RoPE angles for a layer: cos, sin (batch, seq, head_dim) in the model dtype."""

    cos: torch.Tensor
    sin: torch.Tensor


@dataclass(frozen=True)
class QKNorm:
    """Per-head RMSNorm of queries and keys before RoPE (q_norm, k_norm: (head_dim,)), applied by the RoPE kernel."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    eps: float = 0.0


class KVCache:
    """k and v (slots, local kv heads, positions, head_dim); with fp8 their float32 scales (slots, heads,
    positions)."""

    def __init__(self, kv_dtype: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        if kv_dtype not in ("auto", "fp8"):
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose auto or fp8")
        self.kv_dtype = kv_dtype
        if kv_dtype == "fp8":
            kv_fp8.check_supported()
            self.k, self.v = kv_fp8.zeros(shape, device), kv_fp8.zeros(shape, device)
            self.k_scale, self.v_scale = (torch.ones(shape[:-1], dtype=torch.float32, device=device) for _ in range(2))
        else:
            self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
            self.k_scale = self.v_scale = None

    @property
    def heads(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        for t in self.tensors():  # (slots, kv heads, positions, ...)
            t[dst, :, :length] = t[src, :, :length]

    def write(self, qkv: torch.Tensor, n_q: int, rope: Rope, cells: torch.Tensor, slots: torch.Tensor,
              norm: QKNorm) -> torch.Tensor:
        """RoPE on the q and k heads of the fused projection qkv (batch, seq, (n_q + 2 heads) * head_dim), each
        RMS-normalized first where `norm` has weights; k and v stored at (slots, cells); returns the rotated queries
        (batch, n_q, seq, head_dim)."""
        return rope_and_cache(qkv, n_q, self.heads, rope.cos, rope.sin, cells, slots, self.k, self.v, self.k_scale,
                              self.v_scale, norm.q, norm.k, norm.eps)

    def attention(self, qkv: torch.Tensor, n_q: int, rope: Rope, positions: torch.Tensor, slots: torch.Tensor,
                  step, norm: QKNorm, scale: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """This step's keys and values stored, causal attention of its queries over the positions `step` lets each
        see (`step.lengths`, `span`, `visible`) -> (batch, seq, n_q * head_dim); `sinks` (n_q,): each head's logit
        in its softmax's denominator (raytp.kernels.attention.attention_with_sinks), or None."""
        q = self.write(qkv, n_q, rope, positions, slots, norm)
        return cached_attention(q, self.k, self.v, slots, step, self.k_scale, self.v_scale, scale, sinks)

    def keep(self, kept: torch.Tensor) -> None:
        """Nothing to undo after a verify step: positions past a sequence's length are never read, and the step
        that reaches one writes it first."""

    def read(self, slots: torch.Tensor, span: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, heads, span, head_dim) of `slots`' first `span` cells, in `dtype`."""
        cells = (slots, slice(None), slice(None, span))
        if self.k_scale is None:
            return self.k[cells], self.v[cells]
        return kv_fp8.read(self.k, self.k_scale, cells, dtype), kv_fp8.read(self.v, self.v_scale, cells, dtype)


@dataclass(frozen=True)
class WindowView:
    """What every window cache of one window size needs of a step, computed once per step (`WindowCache.view`).

    decode (one query per sequence): `cells` where this step's positions go, `lengths` the cells each sequence reads,
    `span` the window, `visible` (batch, 1, 1, window) which cells hold a position. chunk: `visible` (batch, 1, seq,
    window + seq) which of the ring's cells (as they were before the chunk) and of the chunk's own positions each
    query sees."""

    cells: torch.Tensor
    lengths: torch.Tensor
    span: int
    visible: torch.Tensor
    decode: bool


class WindowCache(KVCache):
    """A KV cache of the last `window` positions of each slot: position p in cell p % window."""

    def __init__(self, kv_dtype: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        super().__init__(kv_dtype, shape, dtype, device)
        self.window = shape[2]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        super().copy_slot(src, dst, min(length, self.window))  # the first `length` positions fill cells in order

    @staticmethod
    def view(window: int, positions: torch.Tensor) -> WindowView:
        """positions (batch, seq), consecutive in each row: the step's view of a window of `window` positions
        (a query at t sees positions t - window < p <= t, as transformers' sliding_window_overlay)."""
        B, T = positions.shape
        if T == 1:
            lengths = torch.clamp(positions[:, -1] + 1, max=window)
            visible = torch.arange(window, device=positions.device).view(1, window) < lengths.view(B, 1)
            return WindowView(positions % window, lengths, window, visible.view(B, 1, 1, window), decode=True)
        # the position each ring cell holds before the chunk: the latest p < start with p % window == cell
        start = positions[:, :1]  # (batch, 1)
        ring = torch.arange(window, device=positions.device).view(1, window)
        held = start - 1 - torch.remainder(start - 1 - ring, window)  # (batch, window)
        held = torch.where(ring < start, held, -window - 1)  # a cell not yet written: too far back to be seen
        keys = torch.cat((held, positions), dim=1)  # (batch, window + seq): the position of every key
        seen = positions.unsqueeze(-1) - keys.unsqueeze(1)  # (batch, seq, window + seq): how far back each key is
        visible = (seen >= 0) & (seen < window)
        return WindowView(positions % window, positions[:, -1] + 1, window, visible.unsqueeze(1), decode=False)

    def attention(self, qkv: torch.Tensor, n_q: int, rope: Rope, positions: torch.Tensor, slots: torch.Tensor,
                  step: WindowView, norm: QKNorm, scale: float | None, sinks: torch.Tensor | None = None
                  ) -> torch.Tensor:
        if step.decode:
            q = self.write(qkv, n_q, rope, step.cells, slots, norm)
            return cached_attention(q, self.k, self.v, slots, step, self.k_scale, self.v_scale, scale, sinks)
        B, T, _ = qkv.shape
        D = self.k.shape[-1]
        chunk = KVCache(self.kv_dtype, (B, self.heads, T, D), qkv.dtype, qkv.device)  # this step's keys and values
        local = torch.arange(T, device=qkv.device).expand(B, T)
        q = chunk.write(qkv, n_q, rope, local, torch.arange(B, device=qkv.device), norm)
        ring_k, ring_v = self.read(slots, self.window, q.dtype)
        own_k, own_v = chunk.read(torch.arange(B, device=qkv.device), T, q.dtype)
        out = attention_with_sinks(q, torch.cat((ring_k, own_k), 2), torch.cat((ring_v, own_v), 2), step.visible,
                                   sinks, scale)
        kept = min(T, self.window)  # the chunk's last positions, each to its own cell
        cells = (slots.view(B, 1), slice(None), step.cells[:, T - kept:])
        for ring, own in zip(self.tensors(), chunk.tensors()):  # (batch, heads, seq, ...) -> (batch, seq, heads, ...)
            ring[cells] = own[:, :, T - kept:].transpose(1, 2)
        return out.transpose(1, 2).reshape(B, T, n_q * D)
