"""The FP8 KV cache (`--kv-dtype fp8`): keys and values stored as float8 e4m3 with one float32 scale per row, a row
being the head_dim values of one (slot, KV head, position). The model dtype goes in and comes back out:

    write  s = amax(|x|) / 448 (e4m3's largest finite value; 1 for an all-zero row), q = e4m3(x / s)
    read   x' = q * s in float32, then rounded to the model dtype

One scale per row, not per tensor: a row is written once, when its token is computed, so its
scale needs no pass over other rows and nothing is re-quantized as the cache fills; and each token's keys keep
their own range (an outlier token does not flatten the others). The cost is 1 + 4/head_dim bytes per element
(1.0625 at head_dim 64) instead of 2 in bfloat16, so about twice the tokens fit; the accuracy cost is e4m3's three
mantissa bits: an element rounds to within 1/16 of itself, down to 1/28672 (2**-6 / 448) of its row's largest
(coarser below, where e4m3 is subnormal).

The torch versions here serve every device: raytp.kernels.rope_cache's torch version writes the cache and
raytp.kernels.attention's reads it, dequantizing the span it gathers (prefill always). On GPUs that convert e4m3 in
hardware (compute capability 8.9+) the Triton RoPE kernel writes the rows by the same arithmetic (bit for bit) and
the Triton decode attention reads the e4m3 bytes in place, applying each row's scale to its scores and probabilities.
The cache is indexed through a uint8 view of the same bytes: torch's advanced indexing does not take float8 tensors
on every device and version, and the Triton kernels read and write bytes.
"""

from __future__ import annotations

import torch

FP8 = getattr(torch, "float8_e4m3fn", None)  # None before torch 2.1
FP8_MAX = 448.0


def check_supported() -> None:
    """Refuse, in words the CLI prints as they are, a torch that has no float8 e4m3."""
    if FP8 is None:
        raise ValueError(f"--kv-dtype fp8 needs torch.float8_e4m3fn (torch 2.1 or later), this torch is "
                         f"{torch.__version__}: upgrade torch or use --kv-dtype auto")


def zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An e4m3 cache of zeros (made as bytes: not every torch fills float8 tensors on every device)."""
    return torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> (e4m3 values (..., head_dim), float32 scales (...))."""
    x = x.float()
    amax = x.abs().amax(-1)
    # Divided by a tensor, not by the number: CUDA torch turns a division by a Python number into a multiplication by
    # its reciprocal, which rounds differently from the division done on CPUs and by the Triton write.
    scale = amax / torch.full_like(amax, FP8_MAX)
    # An all-zero row has no range: any scale stores its zeros exactly. (1 also guards a row so small that its scale
    # underflows to 0; the clamp below keeps x / s finite whatever the scale's rounding did.)
    scale = torch.where(scale > 0, scale, 1.0)
    return (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def write(cache: torch.Tensor, scales: torch.Tensor, index: tuple, x: torch.Tensor) -> None:
    """Store rows x at cache[index] (e4m3) and their scales at scales[index]."""
    values, scale = quantize(x)
    cache.view(torch.uint8)[index] = values.view(torch.uint8)
    scales[index] = scale


def read(cache: torch.Tensor, scales: torch.Tensor, index: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The rows cache[index] as `dtype`: e4m3 times their scale in float32, then rounded."""
    x = cache.view(torch.uint8)[index].view(FP8).float()
    return x.mul_(scales[index].unsqueeze(-1)).to(dtype)
