"""Qwen3.5's Gated DeltaNet split by key heads (raytp.model.linear_attention) against transformers' own module, and
the delta-rule kernels (raytp.kernels.gated_delta_rule) against transformers' token-by-token reference."""

import pytest
import torch
from transformers.models.qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet, torch_recurrent_gated_delta_rule

from raytp.kernels.gated_delta_rule import CHUNK, chunk_gated_delta_rule, recurrent_gated_delta_rule
from raytp.model.config_fields import LinearAttentionDims
from raytp.model.linear_attention import (GatedDeltaNet, LinearAttentionState,
                                          linear_attention_layout)
from raytp.model.slice import Slice
from raytp.parallel.comm import InProcessGroup

HIDDEN, MAX_BATCH = 48, 4
DIMS = LinearAttentionDims(key_heads=3, value_heads=9, key_dim=8, value_dim=4, conv_kernel=4)
# Key-head ranges per rank: whole, uneven, and uneven with a rank holding none
SPLITS = {1: [range(0, 3)], 2: [range(0, 1), range(1, 3)], 3: [range(0, 2), range(2, 2), range(2, 3)]}
PROMPT = 2 * CHUNK + 22  # over two chunks, the last one partial


class StateDictReader:
    """A WeightReader over a module's state dict, named as in a checkpoint under `prefix`."""

    dtype = torch.float32

    def __init__(self, module: torch.nn.Module, prefix: str):
        self.tensors = {prefix + k: v.detach() for k, v in module.state_dict().items()}

    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        t = self.tensors[s.name]
        assert tuple(t.shape) == s.shape, (s.name, t.shape, s.shape)
        t = t[s.rows.start:s.rows.stop]
        return t if s.cols is None else t[:, s.cols.start:s.cols.stop]


@pytest.fixture(scope="module")
def reference() -> Qwen3_5GatedDeltaNet:
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(hidden_size=HIDDEN, num_hidden_layers=1, layer_types=["linear_attention"],
                               linear_num_key_heads=DIMS.key_heads, linear_num_value_heads=DIMS.value_heads,
                               linear_key_head_dim=DIMS.key_dim, linear_value_head_dim=DIMS.value_dim,
                               linear_conv_kernel_dim=DIMS.conv_kernel, vocab_size=64)
    module = Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():  # weights transformers initializes to constants, made distinct per head
        module.dt_bias.normal_()
        module.norm.weight.uniform_(0.5, 1.5)
    return module


def sharded(reference, key_heads: list[range]) -> list[GatedDeltaNet]:
    """One layer per rank; each rank's all-reduce is its own (a group of one), so its output is its partial sum."""
    reader, prefix = StateDictReader(reference, "linear_attn."), "linear_attn."
    layers = []
    for heads in key_heads:
        layout = linear_attention_layout(prefix, DIMS, HIDDEN, heads)
        state = LinearAttentionState(DIMS, len(heads), MAX_BATCH, torch.float32, torch.device("cpu"))
        layers.append(GatedDeltaNet(layout, DIMS, InProcessGroup(1).communicator(0), reader, state, 1e-6, False))
    return layers


def run(layers, h: torch.Tensor, start: int, slots: torch.Tensor) -> torch.Tensor:
    B, T, _ = h.shape
    positions = torch.arange(start, start + T).repeat(B, 1)
    with torch.no_grad():
        return sum(layer(h, positions, slots) for layer in layers)


def expected(reference, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(h)


@pytest.mark.parametrize("ranks", sorted(SPLITS))
def test_partial_outputs_sum_to_transformers(reference, ranks):
    """A prompt over two chunks, two sequences in slots 3 and 1: the ranks' partial sums add up to transformers'
    output."""
    torch.manual_seed(1)
    h = torch.randn(2, PROMPT, HIDDEN)
    out = run(sharded(reference, SPLITS[ranks]), h, 0, torch.tensor([3, 1]))
    torch.testing.assert_close(out, expected(reference, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ranks", sorted(SPLITS))
def test_prefill_in_pieces_then_decode_equals_the_whole_sequence(reference, ranks):
    """A prompt prefilled in two pieces (the second continuing from the kept conv and recurrent state), then single
    tokens decoded: every output equals transformers' on the whole sequence at once."""
    torch.manual_seed(2)
    first, second, steps = CHUNK + 7, CHUNK - 3, 6
    h = torch.randn(1, first + second + steps, HIDDEN)
    layers, slots = sharded(reference, SPLITS[ranks]), torch.tensor([2])
    pieces = [run(layers, h[:, :first], 0, slots), run(layers, h[:, first:first + second], first, slots)]
    pieces += [run(layers, h[:, t:t + 1], t, slots) for t in range(first + second, h.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected(reference, h), rtol=1e-4, atol=1e-5)


def test_a_sequence_at_position_0_starts_from_zero_state(reference):
    """A slot reused by a new request: whatever the previous sequence left, position 0 starts afresh."""
    torch.manual_seed(3)
    old, new = torch.randn(1, 40, HIDDEN), torch.randn(1, 30, HIDDEN)
    layers, slots = sharded(reference, SPLITS[2]), torch.tensor([0])
    run(layers, old, 0, slots)
    torch.testing.assert_close(run(layers, new, 0, slots), expected(reference, new), rtol=1e-4, atol=1e-5)
    one = torch.randn(1, 1, HIDDEN)  # a one-token prompt takes the decode kernel, from zero state too
    torch.testing.assert_close(run(layers, one, 0, slots), expected(reference, one), rtol=1e-4, atol=1e-5)


def test_copy_slot_carries_a_prefilled_prompt(reference):
    """A prompt prefilled in slot 1 and copied to slot 2 decodes there as it would in slot 1."""
    torch.manual_seed(4)
    h = torch.randn(1, 20, HIDDEN)
    layers = sharded(reference, SPLITS[3])
    run(layers, h[:, :19], 0, torch.tensor([1]))
    for layer in layers:
        layer.state.copy_slot(1, 2)
    last = run(layers, h[:, 19:], 19, torch.tensor([2]))
    torch.testing.assert_close(last, expected(reference, h)[:, 19:], rtol=1e-4, atol=1e-5)


def test_state_holds_the_bytes_its_dims_declare():
    for heads in (0, 1, 3):
        state = LinearAttentionState(DIMS, heads, MAX_BATCH, torch.bfloat16, torch.device("cpu"))
        assert state.nbytes == MAX_BATCH * DIMS.state_bytes(heads, 2)
        state.recurrent.fill_(1)
        state.reset(1)
        assert not state.recurrent[1].any() and state.recurrent[0].all()


@pytest.mark.parametrize("kernel,length", [(chunk_gated_delta_rule, 3 * CHUNK - 5), (recurrent_gated_delta_rule, 5)])
def test_kernels_match_transformers_reference(kernel, length):
    """Grouped values (3 value heads per key head), a nonzero initial state, a prompt over several chunks."""
    torch.manual_seed(5)
    B, Hk, Hv, Dk, Dv = 2, 2, 6, 16, 8
    q, k, v = torch.randn(B, length, Hk, Dk), torch.randn(B, length, Hk, Dk), torch.randn(B, length, Hv, Dv)
    g, beta, state = -torch.rand(B, length, Hv), torch.rand(B, length, Hv), torch.randn(B, Hv, Dk, Dv)
    out, final = kernel(q, k, v, g, beta, state)
    ref_out, ref_final = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-4, atol=1e-5)
