"""The sharded forward against Hugging Face transformers on the same weights, at many uneven splits."""

import pytest
import torch
import transformers

from raytp.runtime.sampling import SamplingParams
from tests.sharded import LocalGroup

TINY = {
    # name: (transformers class, config kwargs); head counts chosen not to divide the rank counts
    "llama-7h-1kv": ("LlamaForCausalLM", dict(model_type="llama", hidden_size=56, num_attention_heads=7,
                                               num_key_value_heads=1, head_dim=8, intermediate_size=200)),
    "llama-12h-4kv-untied": ("LlamaForCausalLM", dict(model_type="llama", hidden_size=96, num_attention_heads=12,
                                                       num_key_value_heads=4, intermediate_size=300,
                                                       tie_word_embeddings=False)),
    "llama3-rope-scaling": ("LlamaForCausalLM", dict(model_type="llama", hidden_size=64, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128,
                                                      rope_theta=500000.0, rope_scaling={
                                                          "rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32})),
    "mistral-8h-2kv": ("MistralForCausalLM", dict(model_type="mistral", hidden_size=64, num_attention_heads=8,
                                                   num_key_value_heads=2, intermediate_size=160,
                                                   sliding_window=8)),  # shorter than the prompts
    "llama-bias-6h-3kv": ("LlamaForCausalLM", dict(model_type="llama", hidden_size=48, num_attention_heads=6,
                                                 num_key_value_heads=3, intermediate_size=100, attention_bias=True)),
    "qwen2-bias-6h-2kv": ("Qwen2ForCausalLM", dict(model_type="qwen2", hidden_size=48, num_attention_heads=6,
                                                    num_key_value_heads=2, intermediate_size=100,
                                                    tie_word_embeddings=True)),
}

SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}


@pytest.fixture(scope="module", params=list(TINY))
def tiny_model(request, tmp_path_factory):
    cls_name, kwargs = TINY[request.param]
    torch.manual_seed(0)
    config_cls = transformers.AutoConfig.for_model(kwargs["model_type"]).__class__
    config = config_cls(vocab_size=1000, num_hidden_layers=3, max_position_embeddings=512,
                        **{k: v for k, v in kwargs.items() if k != "model_type"})
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # transformers zero-inits biases; make the q/k/v bias matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_tiny_models_logits_match_transformers(tiny_model, ranks):
    path, reference = tiny_model
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    group = LocalGroup(path, SPLITS[ranks])
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranks", [1, 3, 5])
def test_tiny_models_greedy_generation_matches_transformers(tiny_model, ranks):
    path, reference = tiny_model
    prompt = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 11:].tolist()
    out = LocalGroup(path, SPLITS[ranks]).generate([prompt[0].tolist()], SamplingParams(max_tokens=24))
    assert out["r0"] == expected


def test_more_ranks_than_kv_heads_gives_zero_width_attention_ranks(tiny_model):
    path, reference = tiny_model
    group = LocalGroup(path, [1.0] * 9)
    assert any(len(s.kv_heads) == 0 for s in group.plan.ranks)
    tokens = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)
