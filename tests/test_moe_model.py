"""Qwen3-MoE and Mixtral against transformers' Qwen3MoeForCausalLM and MixtralForCausalLM on the same weights, through
the real loader from a saved directory, at uneven splits whose expert columns leave some ranks none; the planner's
bytes for all experts and for the active ones; and what is refused."""

import pytest
import torch
import transformers

from raytp.model.families import FAMILIES
from raytp.model.config import ModelConfig, UnsupportedModelError
from raytp.model.layout import model_layout, param_count
from raytp.model.moe import EXPERT_COLS
from raytp.model.pieces import plan_model, replicated_tensor_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.synthetic import SyntheticReader, config_dict, synthetic_config
from tests.sharded import LocalGroup

# Expert width 40 in blocks of 8: 5 blocks that divide over none of the rank counts; 3 KV groups, 6 or 5 experts
ATTENTION = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8)
TINY = {
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(**ATTENTION, moe_intermediate_size=40, num_experts=6,
                                                     num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3-moe-unnormalized": lambda: transformers.Qwen3MoeConfig(**ATTENTION, moe_intermediate_size=40,
                                                                  num_experts=5, num_experts_per_tok=3,
                                                                  norm_topk_prob=False, tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(**ATTENTION, intermediate_size=40, num_local_experts=5,
                                                  num_experts_per_tok=2, sliding_window=8),  # under the prompts
}
BLOCKS = {EXPERT_COLS: 8}
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
GREEDY_TOKENS = 32


def with_telling_experts(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """`model` with experts as large as the residual (a wrong one shows in the logits) and routers with clear
    winners (rounding never flips a choice)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.2)
            elif name.endswith(".gate.weight"):
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """family -> (saved directory, transformers model), each built once on first use."""
    built = {}

    def get(family: str):
        if family not in built:
            config = TINY[family]()
            config.update(dict(vocab_size=1000, num_hidden_layers=2, max_position_embeddings=512))
            torch.manual_seed(0)
            model = with_telling_experts(getattr(transformers, FAMILIES[config.model_type].hf_class)(config))
            path = tmp_path_factory.mktemp(family)
            model.eval().save_pretrained(path, safe_serialization=True)
            built[family] = path, model
        return built[family]
    return get


@pytest.mark.parametrize("ranks", list(SPLITS))
@pytest.mark.parametrize("family", list(TINY))
def test_logits_match_transformers(tiny_moe, family, ranks):
    path, reference = tiny_moe(family)
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS)
    widths = [len(r.expert_cols) for r in group.plan.ranks]
    assert sum(widths) == 40 and (ranks < 5 or 0 in widths)  # at 5 ranks some hold no expert columns
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranks", list(SPLITS))
@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])  # the engine loop is the slow part: two families
def test_greedy_tokens_match_transformers(tiny_moe, family, ranks):
    path, reference = tiny_moe(family)
    prompt = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 11:].tolist()
    group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS)
    assert group.generate([prompt[0].tolist()], SamplingParams(max_tokens=GREEDY_TOKENS))["r0"] == expected


@pytest.mark.parametrize("family", list(TINY))
def test_plan_holds_every_expert_and_reads_the_top_k(tiny_moe, family):
    """One float32 rank holds every parameter (the router whole, with the norms); a batch-1 step reads all of them
    but the embedding table and the experts a token does not select."""
    path, reference = tiny_moe(family)
    group = LocalGroup(path, [1.0], blocks=BLOCKS)
    config, rank = group.config, group.plan.ranks[0]
    assert param_count(config) == sum(p.numel() for p in reference.parameters())
    assert rank.weight_bytes + replicated_tensor_bytes(config, "float32") == 4 * param_count(config)
    moe, layout = config.moe, model_layout(config, rank)
    unread_experts = (moe.num_experts - moe.top_k) * 3 * config.hidden_size * moe.expert_size * config.num_layers
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert rank.read_bytes == rank.weight_bytes - 4 * (embedding + unread_experts)
    assert {s.name for s in layout.slices() if s.split is None} >= {s.mlp.router.name for s in layout.layers}


def test_synthetic_expert_shards_concatenate_to_the_one_rank_weights():
    config = ModelConfig.from_dict(config_dict("mixtral-8x7b") | dict(
        vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))

    def read(shard) -> dict[str, torch.Tensor]:
        reader = SyntheticReader(config, torch.float32, torch.device("cpu"))
        return {s.name: reader.read(s) for s in model_layout(config, shard).slices()}

    GiB, shape = 1 << 30, dict(max_context=64, max_batch=1)
    full = read(plan_model(config, [("cpu", GiB)], **shape).ranks[0])
    shards = [read(r) for r in plan_model(config, [("a", 3 * GiB), ("b", GiB), ("c", 2 * GiB)], blocks={
        EXPERT_COLS: 16}, **shape).ranks]
    moe = "model.layers.0.block_sparse_moe."
    for name, dim in ((moe + "experts.7.w1.weight", 0), (moe + "experts.7.w3.weight", 0),
                      (moe + "experts.7.w2.weight", 1), (moe + "experts.0.w2.weight", 1)):
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), full[name]), name
    assert all(torch.equal(s[moe + "gate.weight"], full[moe + "gate.weight"]) for s in shards)


def test_synthetic_presets_have_the_published_sizes():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active; Mixtral-8x7B: 46.7B, 12.9B active (their model cards). Active
    here: what a one-rank bf16 step reads, plus the embedding table it does not."""
    GiB = 1 << 30
    for name, total, active in (("qwen3-30b-a3b", 30.5e9, 3.3e9), ("mixtral-8x7b", 46.7e9, 12.9e9)):
        config = synthetic_config(f"synthetic:{name}")
        assert abs(param_count(config) / total - 1) < 0.01
        rank = plan_model(config, [("cuda", 200 * GiB)], max_context=4096, max_batch=1).ranks[0]
        read = rank.read_bytes / 2 + config.vocab_size * config.hidden_size
        assert abs(read / active - 1) < 0.02, (name, read)


def test_unsupported_mixtures_are_refused_with_the_values():
    qwen = config_dict("qwen3-30b-a3b")
    with pytest.raises(UnsupportedModelError, match=r"mlp_only_layers=\[0, 3\]"):
        ModelConfig.from_dict(qwen | {"mlp_only_layers": [0, 3]})
    for quant in ("fp8-dynamic", "w8a8"):  # experts quantized with 16-bit activations only
        with pytest.raises(UnsupportedModelError, match=f"{quant}: .*w4a16, w8a16"):
            synthetic_config(f"synthetic:qwen3-30b-a3b@{quant}")
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=9 with num_local_experts=8"):
        ModelConfig.from_dict(config_dict("mixtral-8x7b") | {"num_experts_per_tok": 9})
