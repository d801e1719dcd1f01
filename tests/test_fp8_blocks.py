"""Fine-grained FP8 checkpoints (quant_method "fp8" with weight_block_size: how Qwen publishes Qwen3-*-FP8) against
transformers, which dequantizes them by itself on a CPU, at even, uneven and zero-width splits: Qwen3 with Qwen's
128 x 128 blocks, Qwen3-MoE, and a Llama whose o_proj splits fall inside a block of columns; the planner's bytes
and blocks."""

import pytest
import torch
import transformers

from raytp.model.config import UnsupportedModelError
from raytp.model.formats import FP8Weight
from raytp.model.quant.registry import quant_config
from raytp.model.pieces import plan_model, quant_replicated_bytes
from raytp.weights.synthetic import synthetic_config
from tests.quantized import fp8_blocks_checkpoint
from tests.test_moe_model import with_telling_experts
from tests.sharded import LocalGroup, assert_matches_reference
from tests.test_qwen3 import GREEDY_TOKENS, SPLITS, _tiny_qwen3

GiB = 1 << 30


@pytest.fixture(scope="module")
def fp8_qwen3(tmp_path_factory):
    """Qwen3 in 128 x 128 blocks: 4 query heads of 64 over 2 KV groups (128 o_proj columns each: whole blocks),
    384 MLP columns (3 blocks)."""
    source = tmp_path_factory.mktemp("qwen3-float")
    _tiny_qwen3(1000, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                intermediate_size=384, tie_word_embeddings=False).save_pretrained(source, safe_serialization=True)
    return fp8_blocks_checkpoint(source, tmp_path_factory.mktemp("qwen3-fp8"))


@pytest.fixture(scope="module")
def fp8_llama_mid_block(tmp_path_factory):
    """Llama in 32 x 32 blocks whose KV groups are 16 o_proj columns: ranks split o_proj inside a block of columns
    (its scales then start mid-group), and q/k/v rows inside blocks of rows. Every width a whole number of blocks:
    transformers derives the block from the scale grid's shape (rows // grid rows), so it reads a partial last
    block (which raytp reads as the config's block size, cut short) otherwise."""
    source = tmp_path_factory.mktemp("llama-float")
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=6, head_dim=16,
                                      max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(source, safe_serialization=True)
    return fp8_blocks_checkpoint(source, tmp_path_factory.mktemp("llama-fp8"), block=(32, 32))


@pytest.fixture(scope="module")
def fp8_qwen3_moe(tmp_path_factory):
    """Qwen3-MoE in 32 x 32 blocks: 6 experts of 96 columns (3 blocks), top 2, routers left in the model dtype (as
    transformers leaves them: they are not nn.Linear)."""
    source = tmp_path_factory.mktemp("qwen3-moe-float")
    config = transformers.Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         moe_intermediate_size=96, num_experts=6, num_experts_per_tok=2,
                                         norm_topk_prob=True, vocab_size=1000, num_hidden_layers=2,
                                         max_position_embeddings=512)
    torch.manual_seed(0)
    with_telling_experts(transformers.Qwen3MoeForCausalLM(config)).save_pretrained(source, safe_serialization=True)
    return fp8_blocks_checkpoint(source, tmp_path_factory.mktemp("qwen3-moe-fp8"), block=(32, 32))


def reference(path):
    """transformers' own reading of the checkpoint: on a CPU it dequantizes the e4m3 blocks (and warns so)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_fp8_blocks_qwen3_matches_transformers(fp8_qwen3, ranks):
    group = LocalGroup(fp8_qwen3, SPLITS[ranks])
    assert group.config.quant.describe() == "fp8 e4m3 weights, 128x128 block scales"
    if ranks == 5:
        assert any(not r.kv_heads for r in group.plan.ranks)
    tokens = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(ranks))
    assert_matches_reference(group, reference(fp8_qwen3), tokens, prompt_len=7, greedy_tokens=GREEDY_TOKENS)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 2.0, 1.0]])  # 3 + 3 and 3 + 2 + 1 heads of 16 columns
def test_fp8_blocks_split_inside_a_block_match_transformers(fp8_llama_mid_block, weights):
    group = LocalGroup(fp8_llama_mid_block, weights, blocks={"mlp_cols": 32})
    ranks = len(weights)
    o_proj = [m.layers[0].attention.o_proj.weight for m in group.models if m.layers[0].attention.n_q]
    assert any(isinstance(w, FP8Weight) and w.group_start for w in o_proj)  # a split inside a block of columns
    tokens = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(ranks))
    assert_matches_reference(group, reference(fp8_llama_mid_block), tokens, prompt_len=7,
                             greedy_tokens=GREEDY_TOKENS)


@pytest.mark.parametrize("weights", [[1.0], [3.0, 2.0, 1.0], [1.0, 4.0, 1.0, 2.0, 3.0]])
def test_fp8_blocks_qwen3_moe_matches_transformers(fp8_qwen3_moe, weights):
    """Every expert's columns split in whole blocks of 32, some ranks with none."""
    group = LocalGroup(fp8_qwen3_moe, weights, blocks={"expert_cols": 32})
    widths = [len(r.expert_cols) for r in group.plan.ranks]
    assert sum(widths) == 96 and all(w % 32 == 0 for w in widths) and (len(weights) == 1 or 0 in widths)
    tokens = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(len(weights)))
    assert_matches_reference(group, reference(fp8_qwen3_moe), tokens, prompt_len=7, greedy_tokens=GREEDY_TOKENS)


def test_fp8_blocks_experts_stacked_for_the_routed_gemv_match_transformers(fp8_qwen3_moe, monkeypatch):
    """A CUDA rank's load path on a CPU (packing forced, as a CUDA rank packs): the experts' block scales become the
    packed GEMV's groups, stacked (PackedExperts); the routed orchestration gives transformers' logits."""
    from raytp.model import experts
    from raytp.model.formats import fused

    monkeypatch.setattr(fused, "use_triton", lambda t: True)
    monkeypatch.setattr(fused, "reserve", lambda packed: None)  # the CUDA kernel's workspace: none on a CPU
    monkeypatch.setattr(experts, "use_triton", lambda t: True)  # choose the backend a CUDA rank does
    group = LocalGroup(fp8_qwen3_moe, [3.0, 2.0, 1.0], blocks={"expert_cols": 32})
    held = [m.layers[0].mlp.experts for m in group.models if m.layers[0].mlp.experts is not None]
    assert held and all(isinstance(e, experts.PackedExperts) and e.gate_up.like.kind.is_float for e in held)
    assert all(e.down.like.group_tiles == 1 for e in held)  # blocks of 32 inputs: one 32-input tile a group
    tokens = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(11))
    assert_matches_reference(group, reference(fp8_qwen3_moe), tokens, prompt_len=5, greedy_tokens=8)


def test_fp8_blocks_config_is_read_and_refused_with_the_reason():
    q = quant_config({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                               "weight_block_size": [128, 128], "modules_to_not_convert": ["mlp.gate"]})
    assert (q.kind, q.group_size, q.block_rows) == ("fp8", 128, 128)
    assert not q.quantizes("model.layers.3.mlp.gate") and q.quantizes("model.layers.3.mlp.down_proj")
    for bad, what in [({"weight_block_size": None}, "weight_block_size=None"),
                      ({"activation_scheme": "static"}, "activation_scheme='static'"),
                      ({"fmt": "e5m2"}, "fmt='e5m2'")]:
        with pytest.raises(UnsupportedModelError, match=what):
            quant_config({"quant_method": "fp8", "weight_block_size": [128, 128]} | bad)


@pytest.mark.parametrize("fixture,weights", [("fp8_qwen3", [3.0, 2.0, 1.0]), ("fp8_llama_mid_block", [1.0, 1.0])])
def test_planned_bytes_are_the_bytes_each_rank_holds(request, fixture, weights):
    """Each rank's sharded weights plus the scales every rank keeps (o_proj's block of columns that two ranks share)
    are what it loads: e4m3 values and one float32 scale per row and block of columns; MLP splits fall on blocks."""
    path = request.getfixturevalue(fixture)
    group = LocalGroup(path, weights, blocks={"mlp_cols": 32})
    config, replicated = group.config, quant_replicated_bytes(group.config, "float32")
    for model, shard in zip(group.models, group.plan.ranks):
        held = sum(t.numel() * t.element_size() for layer in model.layers
                   for linear in (layer.attention.qkv, layer.attention.o_proj, layer.mlp.gate_up, layer.mlp.down) for t in linear.weight.tensors())
        held += model.embed.table.numel() * 4 + model.lm_head.weight.weight.numel() * 4
        assert held <= shard.weight_bytes + replicated, (shard.rank, held)
        if (config.q_per_kv * config.head_dim) % config.quant.group_size == 0:  # no o_proj block shared
            assert held == shard.weight_bytes + replicated
        assert shard.mlp_cols.start % config.quant.group_size == 0


def test_synthetic_preset_counts_block_scales():
    """synthetic:...@fp8-blocks as Qwen's checkpoints: a byte per weight and a float32 scale per row and 128 inputs
    (held per row: any split of the rows is exact), counted here from Qwen3-8B's published shapes."""
    config = synthetic_config("synthetic:qwen3-8b@fp8-blocks")
    h, q, kv, i, vocab = 4096, 4096, 1024, 12288, 151936
    matrices = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    layer = sum(o * n + o * (n // 128) * 4 for o, n in matrices)
    plan = plan_model(config, [("cuda:0", 80 * GiB)], max_context=1024, max_batch=1, dtype="bfloat16")
    assert plan.ranks[0].weight_bytes + quant_replicated_bytes(config, "bfloat16") == 36 * layer + 2 * vocab * h * 2
    assert plan.quant == "fp8 e4m3 weights, 128x128 block scales"
    uneven = plan_model(config, [("cuda:0", 6 * GiB), ("cuda:1", 4 * GiB), ("cuda:2", 2 * GiB)], max_context=1024,
                        max_batch=1)
    assert all(r.mlp_cols.start % 128 == 0 for r in uneven.ranks) and len(uneven.ranks[2].mlp_cols) > 0
