"""Attention sinks (gpt-oss: a learned logit per head in the softmax's denominator) on CPU: raytp's attention over
its cache against transformers' eager_attention_forward of GptOss with its own sliding-window mask, grouped-query
heads, prefill and decode rows; the Triton decode kernels with sinks against the torch version under Triton's CPU
interpreter."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from raytp.kernels.attention import cached_attention_torch


def case(batch: int, n_q: int, n_kv: int, context: int, head_dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, n_kv, context, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, n_kv, context, head_dim, generator=g).to(dtype)
    q = torch.randn(batch, n_q, context, head_dim, generator=g).to(dtype)
    sinks = (torch.randn(n_q, generator=g) * 3).to(dtype)  # some heads' sinks outweigh their keys
    return q, k, v, sinks


def visible_rows(positions: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
    """positions (batch, seq) -> (batch, 1, seq, span): what each query sees of a cache holding every position."""
    p = torch.arange(span).view(1, 1, span)
    seen = p <= positions.unsqueeze(-1)
    if window is not None:
        seen &= p > positions.unsqueeze(-1) - window
    return seen.unsqueeze(1)


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_equal_transformers_eager_attention(window):
    """Every position of a 13-token prompt at once (a prefill), over a cache of exactly those positions."""
    from transformers import GptOssConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    batch, n_q, n_kv, T, D = 2, 6, 2, 13, 16
    q, k, v, sinks = case(batch, n_q, n_kv, T, D, seed=T)
    config = GptOssConfig(num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=D, hidden_size=n_q * D,
                          sliding_window=window or 128)
    config._attn_implementation = "eager"
    make = create_sliding_window_causal_mask if window else create_causal_mask
    mask = make(config=config, inputs_embeds=q.new_zeros(batch, T, n_q * D), attention_mask=None, cache=None)
    module = SimpleNamespace(num_key_value_groups=n_q // n_kv, sinks=sinks, training=False)
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)  # (batch, seq, n_q, head_dim)

    positions = torch.arange(T).expand(batch, T)
    visible = visible_rows(positions, T, window)
    assert torch.equal(visible, mask == 0)  # the same window as transformers'
    step = SimpleNamespace(span=T, visible=visible)
    got = cached_attention_torch(q, k, v, torch.arange(batch), step, sinks=sinks)
    torch.testing.assert_close(got, want.reshape(batch, T, n_q * D), rtol=1e-5, atol=1e-5)
    without = cached_attention_torch(q, k, v, torch.arange(batch), step)
    assert not torch.allclose(got, without, atol=1e-2)  # the sinks matter here


INTERPRETED = """
from types import SimpleNamespace

import torch

from raytp.kernels import attention
from tests.test_attention_sinks import case, visible_rows

attention.use_triton = lambda t: True  # the interpreter runs the kernels on CPU tensors
# one decode query per sequence, at lengths that leave some splits empty; grouped heads of 1 and 3 queries
for n_q, n_kv, lengths in ((4, 4, (1, 300, 777)), (6, 2, (513, 2, 1024))):
    batch, context, D = len(lengths), 1024, 32
    q, k, v, sinks = case(batch, n_q, n_kv, context, D, seed=n_q)
    q = q[:, :, :1]
    slots = torch.tensor([2, 0, 1])
    length = torch.tensor(lengths)
    step = SimpleNamespace(lengths=length, span=context,
                           visible=visible_rows((length - 1).view(batch, 1), context, None))
    for s in (sinks, None):
        got = attention.cached_attention(q, k[slots.argsort()].contiguous(), v[slots.argsort()].contiguous(), slots,
                                         step, sinks=s)
        want = attention.cached_attention_torch(q, k[slots.argsort()], v[slots.argsort()], slots, step, sinks=s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
# a verify step's queries (speculative decoding): a sequence's last token and its draft, a shorter draft padded
# with copies of its last position, each query seeing the positions up to its own
attention.TRITON_VERIFY = True
for n_q, n_kv, positions in ((4, 4, ((0, 1, 2), (299, 300, 300), (775, 776, 777))),
                             (6, 2, ((508, 509, 510, 511, 512), (1, 1, 1, 1, 1), (1019, 1020, 1021, 1022, 1023)))):
    batch, context, D = len(positions), 1024, 32
    q, k, v, sinks = case(batch, n_q, n_kv, context, D, seed=n_q)
    q = q[:, :, :len(positions[0])]
    slots = torch.tensor([2, 0, 1])
    positions = torch.tensor(positions)
    step = SimpleNamespace(lengths=positions[:, -1] + 1, limits=positions + 1, span=context,
                           visible=visible_rows(positions, context, None))
    for s in (sinks, None):
        got = attention.cached_attention(q, k[slots.argsort()].contiguous(), v[slots.argsort()].contiguous(), slots,
                                         step, sinks=s)
        want = attention.cached_attention_torch(q, k[slots.argsort()], v[slots.argsort()], slots, step, sinks=s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.triton_interpreter(INTERPRETED)
def test_decode_and_verify_kernels_with_sinks_equal_the_torch_version_in_the_interpreter(interpreted):
    printed, error = interpreted
    assert not error and printed.strip() == "equal", error[-3000:]
