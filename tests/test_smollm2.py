"""The embedded SmolLM2 sharded unevenly vs transformers, on our converted weights and on the original GGUF."""

import pytest
import torch
import transformers

from raytp.runtime.sampling import SamplingParams
from raytp.weights.tokenizer import Tokenizer
from tests.sharded import LocalGroup, shared_group

SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [5.0, 1.0, 3.0, 1.0, 2.0], 12: [1.0] * 12}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gguf_reference(smollm2_gguf):
    """transformers' own GGUF loader reading the original file: nothing shared with raytp's conversion."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_logits_match_transformers_at_uneven_splits(smollm2_dir, reference, ranks):
    ids = Tokenizer.from_dir(smollm2_dir).encode("Gravity bends light; 42 photons, café, naïve 🤖.")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    got = shared_group(smollm2_dir, SPLITS[ranks]).logits(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)


GGUF_PROMPTS = {"chat": [{"role": "user", "content": "Name three colors."}],
                "story": "Once upon a time, there was a little"}


# The chat (it ends sooner) on 12 threads of 2 CI cores, the suite's only model run past 8 ranks (the host-staged
# all-reduce at 12 ranks: tests/test_comm.py), then on one rank; the story on 3 ranks is
# test_speed_split_gives_transformers_greedy_tokens. 12 first: the logits test above leaves its group loaded.
@pytest.mark.parametrize("ranks, prompt_name", [(12, "chat"), (1, "chat")])
def test_greedy_32_tokens_match_transformers_gguf_loader(smollm2_dir, gguf_reference, ranks, prompt_name):
    """The conversion is lossless, so float32 raytp follows the original GGUF token for token at any split
    (12 ranks: 9 of them hold no attention head)."""
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    text = GGUF_PROMPTS[prompt_name]
    prompt = tokenizer.encode(text if isinstance(text, str) else tokenizer.apply_chat_template(text))
    with torch.no_grad():
        expected = gguf_reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                           eos_token_id=sorted(tokenizer.eos_token_ids))[0, len(prompt):].tolist()
    out = shared_group(smollm2_dir, SPLITS[ranks]).generate([prompt], SamplingParams(max_tokens=32),
                                                          stop_ids=sorted(tokenizer.eos_token_ids))
    assert out["r0"] == expected


def test_speed_split_gives_transformers_greedy_tokens(smollm2_dir, gguf_reference):
    """A speed split (a slow, a fast and a middling device with equal memory) is as exact as any other split."""
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    prompt = tokenizer.encode(GGUF_PROMPTS["story"])
    group = LocalGroup(smollm2_dir, [2.0, 2.0, 2.0], bandwidths=[0.3e12, 1.0e12, 0.6e12])
    assert group.plan.split == "speed"
    assert [len(r.mlp_cols) for r in group.plan.ranks] != [512, 512, 512]  # not the even memory split
    with torch.no_grad():
        expected = gguf_reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                           eos_token_id=sorted(tokenizer.eos_token_ids))[0, len(prompt):].tolist()
    assert group.generate([prompt], SamplingParams(max_tokens=32),
                          stop_ids=sorted(tokenizer.eos_token_ids))["r0"] == expected
