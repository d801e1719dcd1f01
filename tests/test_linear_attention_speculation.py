"""Speculative decoding over linear-attention layers (a tiny Qwen3.5 against transformers on the same weights): a
verify step's positions enter the recurrent and conv state only once the ranks know how many each row keeps, so
drafting gives the tokens of plain decoding - transformers' greedy ones - at 1 and 3 uneven ranks, and leaves the
state plain decoding leaves (to float32 rounding), after accepted and rejected drafts alike."""

import argparse

import torch

from raytp.cli.checks import _check_speculation_fits
from raytp.model.config import ModelConfig
from raytp.model.linear_attention import LinearAttentionState
from raytp.runtime.engine import Add, Request
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import RowSpeculation, draft_unsupported_reason
from tests.sharded import LocalGroup
from tests.test_decode_loop import run_loop, tokens_of
from tests.test_qwen3_5 import BLOCKS, PROMPT, SPLITS, greedy, tiny  # noqa: F401 (tiny: the module's fixture)

TOKENS = 24


def states(group: LocalGroup, slot: int) -> list[torch.Tensor]:
    """Every rank's conv and recurrent state of `slot` in the first linear-attention layer: its input, the
    embedding, carries no rounding of the layers below, whose sums over k + 1 rows may differ from those over one in
    the last bits (the tokens check the deeper layers, whose states carry that rounding, amplified)."""
    first = [next(s for s in m.states if isinstance(s, LinearAttentionState)) for m in group.models]
    return [t[slot].clone() for s in first for t in s.tensors()]


def test_drafts_give_transformers_tokens_and_leave_plain_decodings_state(tiny, monkeypatch):  # noqa: F811
    path, reference = tiny("dense")
    prompt = torch.randint(0, 300, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = greedy(reference, prompt, TOKENS)

    def draft(self, tokens, generated, room):
        """4 tokens of the greedy continuation, the third wrong where the draft starts at an odd multiple of 3
        (every rank drafts the same): accepted runs and rejections; the seeded request's drafts are mostly wrong,
        and shorter or longer than the greedy one's."""
        right = expected[generated : generated + min(room, 4)]
        wrong = generated // 3 % 2 == 1 and len(right) > 2
        return right[:2] + [(right[2] + 1) % 300] + right[3:] if wrong else right

    monkeypatch.setattr(RowSpeculation, "draft", draft)
    seeded = dict(max_tokens=TOKENS, temperature=0.8, top_k=50, seed=11)
    for ranks in (1, 3):
        group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS["dense"])
        runs = {}
        for speculate in ("off", "ngram:4"):
            greedy_alone = Add(Request("greedy", prompt, SamplingParams(max_tokens=TOKENS, speculate=speculate)))
            seen, _ = run_loop(group, [greedy_alone])
            state = states(group, 0)  # its slot's, once it stopped where plain decoding stops
            mixed, _ = run_loop(group, [greedy_alone, Add(Request("seeded", prompt[:40],
                                                                  SamplingParams(**seeded, speculate=speculate)))])
            runs[speculate] = seen + mixed, state
        (plain, plain_state), (fast, fast_state) = runs["off"], runs["ngram:4"]
        for rid in ("greedy", "seeded"):
            assert tokens_of(fast, rid) == tokens_of(plain, rid), (ranks, rid)
        assert tokens_of(fast, "greedy") == expected * 2
        steps = [(e.drafted, e.accepted) for e in fast if e.drafted]
        assert any(a == d for d, a in steps) and any(a < d for d, a in steps)  # accepted whole, and rejected
        # a rejected draft's tokens taken into the state, or a position lost, differ by O(0.1-1)
        for a, b in zip(fast_state, plain_state):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_cli_lets_a_linear_attention_model_draft_and_refuses_it_as_a_draft_model(tiny):  # noqa: F811
    config = ModelConfig.from_file(tiny("dense")[0])
    _check_speculation_fits(argparse.Namespace(speculate="ngram"), config)
    assert "linear-attention" in draft_unsupported_reason(config)
