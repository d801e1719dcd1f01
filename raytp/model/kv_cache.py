"""One rank's KV cache: the keys and values of its KV heads for every layer, batch slot and position.

    KVCache      in the model dtype (`--kv-dtype auto`)
    FP8KVCache   float8 e4m3 with a float32 scale per row (`--kv-dtype fp8`, raytp.kernels.kv_fp8)

`make_kv_cache` allocates the one `kv_dtype` names; `layer(i)` is what a decoder layer writes this step's keys and
values into (RoPE applied on the way, `LayerCache.write`) and attends over (`LayerCache.attend`), through the
kernels of `raytp.kernels.rope_cache` and `raytp.kernels.attention`. `kv_row_bytes` is the cost of one row, which
the planner counts (`raytp.model.pieces`) and `tensors()` allocates: the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels import kv_fp8
from raytp.kernels.attention import cached_attention
from raytp.kernels.rope_cache import rope_and_cache


def kv_row_bytes(head_dim: int, nbytes: int, kv_dtype: str) -> int:
    """Bytes of one cached row, the keys (or the values) of one KV head at one position: head_dim elements in the
    model dtype (`nbytes` each), or with fp8 one byte each plus the row's float32 scale."""
    return head_dim + 4 if kv_dtype == "fp8" else head_dim * nbytes


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache: k and v (slots, local kv heads, positions, head_dim), and for FP8 their float32 scales
    (slots, local kv heads, positions)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.k.shape[1]

    def write(self, qkv: torch.Tensor, n_q: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              slots: torch.Tensor, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
              eps: float = 0.0) -> torch.Tensor:
        """RoPE on the q and k heads of the fused projection qkv (batch, seq, (n_q + 2 heads) * head_dim), each
        RMS-normalized first by q_norm or k_norm (head_dim,) if given, k and v stored at (slots, positions); returns
        the rotated queries (batch, n_q, seq, head_dim)."""
        return rope_and_cache(qkv, n_q, self.heads, cos, sin, positions, slots, self.k, self.v, self.k_scale,
                              self.v_scale, q_norm, k_norm, eps)

    def attend(self, q: torch.Tensor, slots: torch.Tensor, step) -> torch.Tensor:
        """Causal attention of q over the cached positions `step` lets each query see -> (batch, seq, n_q *
        head_dim)."""
        return cached_attention(q, self.k, self.v, slots, step, self.k_scale, self.v_scale)


class KVCache:
    """Keys and values in the model dtype: (layers, batch slots, local kv heads, positions, head_dim) each."""

    kv_dtype = "auto"

    def __init__(self, shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i])

    def tensors(self) -> list[torch.Tensor]:
        """Everything allocated: what the plan's kv_cache_bytes counts."""
        return [self.k, self.v]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of slot `src` into slot `dst` (FP8 scales too): a prompt prefilled once serves
        several samples."""
        for t in self.tensors():  # (layers, slots, kv heads, positions, ...)
            t[:, dst, :, :length] = t[:, src, :, :length]


class FP8KVCache(KVCache):
    """Keys and values as float8 e4m3 with a float32 scale per (layer, slot, head, position) row."""

    kv_dtype = "fp8"

    def __init__(self, shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device):
        kv_fp8.check_supported()
        self.k, self.v = kv_fp8.zeros(shape, device), kv_fp8.zeros(shape, device)
        self.k_scale, self.v_scale = (torch.ones(shape[:-1], dtype=torch.float32, device=device) for _ in range(2))

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]


CACHES = {c.kv_dtype: c for c in (KVCache, FP8KVCache)}


def make_kv_cache(kv_dtype: str, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                  device: torch.device) -> KVCache:
    if kv_dtype not in CACHES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose {' or '.join(CACHES)}")
    return CACHES[kv_dtype](shape, dtype, device)
