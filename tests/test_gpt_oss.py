"""gpt-oss against transformers' GptOssForCausalLM, which reads the same saved MXFP4 checkpoint and dequantizes its
experts itself (Mxfp4Config(dequantize=True)): a tiny random config with sliding-window and full layers, sinks,
biases, YaRN RoPE and MXFP4 experts, through raytp's real loader, at 1, 2, 3 (uneven) and 5 ranks, prompts longer
than the window; the planner's bytes of MXFP4 experts; the synthetic presets' sizes."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from raytp.model.config import ModelConfig, UnsupportedModelError
from raytp.model.layout import model_layout, param_count
from raytp.model.moe import EXPERT_COLS
from raytp.model.pieces import plan_model, replicated_tensor_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.synthetic import SyntheticReader, synthetic_config
from tests.sharded import LocalGroup
from tests.test_mxfp4 import GPT_OSS_QUANTIZATION

# 6 query heads in 3 KV groups; expert width 96: three 32-column groups, which no rank count divides evenly; a window
# of 8 positions, shorter than every prompt
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=3, head_dim=16, num_local_experts=5, num_experts_per_tok=2, sliding_window=8,
            max_position_embeddings=512)
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
BLOCKS = {EXPERT_COLS: 32}
GREEDY_TOKENS = 32


def save_mxfp4(model: transformers.GptOssForCausalLM, path, seed: int) -> None:
    """`model` saved with its experts replaced by random MXFP4 blocks and scales (spreads of ~0.3-0.7, so that the
    experts are as large as the residual and the SwiGLU's clamp bites), and config.json's quantization_config."""
    model.save_pretrained(path)
    tensors, g = load_file(path / "model.safetensors"), torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inp, out = tensors.pop(name).shape  # transformers holds them (experts, in, out)
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, out, inp // 32, 16), generator=g,
                                                  dtype=torch.uint8)
        tensors[name + "_scales"] = torch.randint(122, 126, (experts, out, inp // 32), generator=g,
                                                  dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": GPT_OSS_QUANTIZATION}))


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory):
    """(saved directory, transformers' model of that directory, its experts dequantized by transformers)."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "sinks")) or name.endswith("bias"):
                p.normal_(0, 1.0)  # routers with clear winners, sinks and biases that matter
    path = tmp_path_factory.mktemp("gpt-oss")
    save_mxfp4(model, path, seed=1)
    reference = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    return path, reference


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_logits_match_transformers(tiny_gpt_oss, ranks):
    path, reference = tiny_gpt_oss
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS)
    widths = [len(r.expert_cols) for r in group.plan.ranks]
    assert sum(widths) == 96 and all(w % 32 == 0 for w in widths) and (ranks < 5 or 0 in widths)
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_greedy_tokens_match_transformers(tiny_gpt_oss, ranks):
    """A prompt of 11 tokens then 32 more: both well past the window of 8, through the engine's prefill and
    decode steps."""
    path, reference = tiny_gpt_oss
    prompt = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 11:].tolist()
    group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS)
    assert group.generate([prompt[0].tolist()], SamplingParams(max_tokens=GREEDY_TOKENS))["r0"] == expected


def test_plan_counts_mxfp4_experts_as_stored(tiny_gpt_oss):
    """One float32 rank: every tensor of the checkpoint in the bytes it is stored in (MXFP4 experts half a byte a
    weight and a byte per 32, everything else float32), the router and down_proj's biases whole."""
    path, _ = tiny_gpt_oss
    group = LocalGroup(path, [1.0], blocks=BLOCKS)
    rank = group.plan.ranks[0]
    stored = load_file(path / "model.safetensors")
    weights = sum(t.numel() * (1 if t.dtype == torch.uint8 else 4) for t in stored.values())
    assert rank.weight_bytes + replicated_tensor_bytes(group.config, "float32") == weights
    held = sum(t.numel() * t.element_size() for t in group.models[0].weights())
    assert held == weights


def test_synthetic_presets_have_the_published_sizes():
    """gpt-oss-20b: 20.9B parameters, 3.6B active; gpt-oss-120b: 116.8B, 5.1B active (OpenAI's model card)."""
    for name, total, active in (("gpt-oss-20b", 20.9e9, 3.6e9), ("gpt-oss-120b", 116.8e9, 5.1e9)):
        config = synthetic_config(f"synthetic:{name}")
        assert abs(param_count(config) / total - 1) < 0.01, (name, param_count(config))


def test_synthetic_mxfp4_shards_concatenate_to_the_one_rank_weights(tmp_path):
    """A synthetic gpt-oss (synthetic:PATH/config.json) draws each rank's rows and 32-column groups of every expert's
    blocks and scales, and gate_up's biases, as the same tensors a one-rank model draws; its logits at 3 uneven ranks
    equal one rank's."""
    (tmp_path / "config.json").write_text(json.dumps(
        transformers.GptOssConfig(**TINY).to_dict() | {"quantization_config": GPT_OSS_QUANTIZATION}))
    model = f"synthetic:{tmp_path / 'config.json'}"
    config = synthetic_config(model)

    def read(shard) -> dict[str, torch.Tensor]:
        reader = SyntheticReader(config, torch.float32, torch.device("cpu"))
        return {s.name: (s.quant.read(reader, s).dequantize(torch.float32) if s.quant else reader.read(s))
                for s in model_layout(config, shard).slices()}

    shape = dict(max_context=64, max_batch=1, blocks=BLOCKS)
    full = read(plan_model(config, [("cpu", 1 << 30)], **shape).ranks[0])
    plan = plan_model(config, [("a", 3 << 30), ("b", 1 << 30), ("c", 2 << 30)], **shape)
    widths = [len(r.expert_cols) for r in plan.ranks]
    assert sum(widths) == 96 and all(w % 32 == 0 for w in widths) and max(widths) < 96
    shards = [read(r) for r in plan.ranks]
    experts = "model.layers.1.mlp.experts."
    for name, dim in ((experts + "gate_up_proj", 1), (experts + "gate_up_proj_bias", 1), (experts + "down_proj", 2)):
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), full[name]), name
    gate_up = full[experts + "gate_up_proj"]
    assert 0.01 < gate_up.std() < 0.04  # the weights' spread that every synthetic model draws (~0.02)
    tokens = torch.tensor([[1, 17, 999, 512, 3, 8, 9, 10, 11, 12]])
    from tests.test_synthetic import _logits

    torch.testing.assert_close(_logits(model, [3.0, 1.0, 2.0], tokens), _logits(model, [1.0], tokens), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("rope", [dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                       original_max_position_embeddings=4096, rope_theta=150000.0),
                                  dict(factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6)])
def test_yarn_frequencies_equal_transformers(rope):
    """gpt-oss's (no truncation) and a truncated one with default betas: frequencies bit for bit, and the factor
    cos and sin are multiplied by."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from raytp.model.rope import rope_inv_freq

    rope = dict(rope, rope_type="yarn")
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.GptOssConfig(head_dim=64, rope_parameters=rope),
                                                    "cpu")
    got, factor = rope_inv_freq(64, rope["rope_theta"], rope)
    assert torch.equal(got, want) and factor == want_factor


def test_what_raytp_does_not_run_is_refused():
    config = transformers.GptOssConfig(**TINY).to_dict()
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        ModelConfig.from_dict(config | {"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="not stored in MXFP4"):
        model_layout(ModelConfig.from_dict(config), plan_model(ModelConfig.from_dict(config), [("cpu", 1 << 30)],
                                                               max_context=64, max_batch=1).ranks[0])
