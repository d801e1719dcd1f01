"""Qwen3.5 / 3.6, dense and MoE, against transformers' Qwen3_5ForCausalLM and Qwen3_5MoeForCausalLM on the same
weights, through the real loader from a saved directory: Gated DeltaNet layers split by key heads, full-attention
layers by KV groups, experts and the shared expert by columns, at 1, 2, 3 and 5 ranks (uneven; at 5 some ranks hold
no linear-attention heads, no KV heads or no expert columns), prompts longer than the delta rule's chunk; the
multimodal checkpoint layout (text_config, model.language_model.*) read as the text model; mtp.* kept."""

import json
from functools import partial

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from raytp.kernels.gated_delta_rule import CHUNK
from raytp.model.config import ModelConfig
from raytp.model.layout import model_layout, param_count
from raytp.model.mlp import MLP_COLS
from raytp.model.moe import EXPERT_COLS
from raytp.model.pieces import plan_model, quant_replicated_bytes, replicated_tensor_bytes
from raytp.parallel.devices import format_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.synthetic import synthetic_config
from tests.llmcompressed import Checkpoint, add_smollm2_tokenizer
from tests.quantized import reference_model
from tests.sharded import GiB, LocalGroup
from tests.test_synthetic import _logits

# 3 KV groups, 3 linear key heads with 3 value heads each, expert and MLP widths in blocks that divide no rank count
TEXT = dict(vocab_size=300, hidden_size=48, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=3,
            head_dim=16, linear_num_key_heads=3, linear_num_value_heads=9, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})
TINY = {
    "dense": lambda: transformers.Qwen3_5TextConfig(**TEXT, intermediate_size=80),
    "moe": lambda: transformers.Qwen3_5MoeTextConfig(**TEXT, moe_intermediate_size=40, num_experts=5,
                                                     num_experts_per_tok=2, shared_expert_intermediate_size=24),
}
BLOCKS = {"dense": {MLP_COLS: 8}, "moe": {EXPERT_COLS: 8, MLP_COLS: 8}}
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
PROMPT = CHUNK + 21  # over one chunk of the delta rule
GREEDY_TOKENS = 16
# the decode steps' states at uneven splits, with (5) and without (3) ranks that hold no heads; one and two ranks'
# decoding is the same code as three's, their prefill is checked by the logits
GREEDY_SPLITS = (3, 5)


def telling(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Norm weights, decay biases and gates that transformers initializes to constants, drawn instead; experts as
    large as the residual and routers with clear winners (rounding never flips a choice)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias")):
                p.normal_(0.0 if "linear_attn.norm" not in name else 1.0, 0.3)
            elif ".experts." in name:
                p.normal_(0, 0.2)
            elif name.endswith(".gate.weight"):
                p.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (saved directory, transformers model), each built once on first use."""
    built = {}

    def get(kind: str):
        if kind not in built:
            torch.manual_seed(0)
            config = TINY[kind]()
            model = telling(getattr(transformers, {"dense": "Qwen3_5ForCausalLM",
                                                   "moe": "Qwen3_5MoeForCausalLM"}[kind])(config))
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path, safe_serialization=True)
            built[kind] = path, model
        return built[kind]
    return get


@pytest.mark.parametrize("ranks", list(SPLITS))
@pytest.mark.parametrize("kind", list(TINY))
def test_logits_and_greedy_tokens_match_transformers(tiny, kind, ranks):
    path, reference = tiny(kind)
    group = LocalGroup(path, SPLITS[ranks], blocks=BLOCKS[kind])
    if ranks == 5:  # some ranks hold no linear-attention heads and no KV heads
        assert any(not r.linear_key_heads for r in group.plan.ranks)
        assert any(not r.kv_heads for r in group.plan.ranks)
    tokens = torch.randint(0, 300, (2, PROMPT), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)
    if ranks in GREEDY_SPLITS:
        prompt = tokens[0].tolist()
        out = group.generate([prompt], SamplingParams(max_tokens=GREEDY_TOKENS), prefill_chunk=CHUNK)["r0"]
        assert out == greedy(reference, prompt, GREEDY_TOKENS)


def greedy(model: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of `model`'s own forward with its cache: the prompt, then one token a step. (Its `generate`
    is not the reference here: for these models it returns logits that differ from the forward's by ~1e-2.)"""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens = []
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_memory_planned_is_memory_held(tiny):
    """The KV caches of the full-attention layers and the conv and recurrent states of the linear ones, as
    allocated on each rank, are what the plan counted; the weights too."""
    path, reference = tiny("moe")
    group = LocalGroup(path, SPLITS[3], blocks=BLOCKS["moe"])
    for shard, model in zip(group.plan.ranks, group.models):
        assert sum(t.numel() * t.element_size() for t in model.cache_tensors()) == shard.kv_cache_bytes
    assert param_count(group.config) == sum(p.numel() for p in reference.parameters())


def multimodal(path, out):
    """The checkpoint at `path` laid out as a published Qwen3.5 is: Qwen3_5ForConditionalGeneration's config.json
    (the text model under text_config, a vision tower's config) and tensors under model.language_model., plus a
    vision tensor and an MTP layer's tensors."""
    d = json.loads((path / "config.json").read_text())
    text = d | {"model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1}
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
              "vision_config": {"depth": 1}, "tie_word_embeddings": d["tie_word_embeddings"]}
    (out / "config.json").write_text(json.dumps(config))
    tensors = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in load_file(path / "model.safetensors").items()}
    H = d["hidden_size"]
    tensors["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    mtp = {k.replace("model.language_model.layers.3.", "mtp.layers.0."): v.clone() for k, v in tensors.items()
           if k.startswith("model.language_model.layers.3.")}  # layer 3 is full attention
    mtp |= {"mtp.fc.weight": torch.randn(H, 2 * H), "mtp.norm.weight": torch.randn(H),
            "mtp.pre_fc_norm_embedding.weight": torch.randn(H), "mtp.pre_fc_norm_hidden.weight": torch.randn(H)}
    save_file(tensors | mtp, out / "model.safetensors")
    return mtp


def test_the_multimodal_layout_runs_as_its_text_model_and_keeps_the_mtp_layers(tiny, tmp_path):
    path, reference = tiny("dense")
    mtp = multimodal(path, tmp_path)
    config = ModelConfig.from_file(tmp_path)
    assert config.text_prefix == "model.language_model." and config.mtp_layers == 1
    group = LocalGroup(tmp_path, SPLITS[2], blocks=BLOCKS["dense"])
    tokens = torch.randint(0, 300, (1, PROMPT), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)
    layout = model_layout(config, group.plan.ranks[0])
    assert {s.name for s in layout.slices() if s.name.startswith("mtp.")} == set(mtp)
    held = {id(t) for m in group.models for t in m.weights()}
    assert all(id(t) in held for m in group.models for mtp in m.mtp for t in mtp.tensors())
    for shard, model in zip(group.plan.ranks, group.models):  # the MTP layer's KV cache is planned too
        assert sum(t.numel() * t.element_size() for t in model.cache_tensors()) == shard.kv_cache_bytes


def test_synthetic_presets_have_the_published_shapes_and_a_plan_for_a_5090_and_two_3080s():
    c = synthetic_config("synthetic:qwen3.5-27b")
    d = c.linear_attention
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (5120, 17408, 64, 24, 4, 256)
    assert (d.key_heads, d.value_heads, d.key_dim, d.value_dim) == (16, 48, 128, 128)
    assert c.mixers.count("linear_attention") == 48 and c.mtp_layers == 1
    assert 27.0e9 < param_count(c) < 27.6e9  # the text model and its MTP layer
    moe = synthetic_config("synthetic:qwen3.5-35b-a3b")
    assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.expert_size, moe.shared_expert_size) == (256, 8, 512, 512)
    assert 35.0e9 < param_count(moe) < 36.0e9
    plan = plan_model(synthetic_config("synthetic:qwen3.5-27b@w4a16"),
                      [("cuda:0", 32 * GiB), ("cuda:1", 20 * GiB), ("cuda:2", 20 * GiB)],
                      max_context=8192, max_batch=1, dtype="bfloat16")
    heads = [len(r.linear_key_heads) for r in plan.ranks]
    assert sum(heads) == 16 and heads[0] > heads[1] > 0


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 3.0, 0.05]])
def test_synthetic_weights_give_the_one_rank_logits_at_any_split(tiny, weights):
    """The synthetic reader draws the convolutions' and the DeltaNet's per-head tensors in blocks, so a split's
    shards concatenate to the one-rank model: the logits agree (a tiny config from a path)."""
    path, _ = tiny("moe")
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))  # within _logits' context
    model = f"synthetic:{path / 'config.json'}"
    torch.testing.assert_close(_logits(model, weights, tokens), _logits(model, [1.0], tokens), rtol=1e-4, atol=1e-4)


# Tiny Qwen3.5s for llmcompressor, with SmolLM2's tokenizer (its 49152 tokens calibrate GPTQ): widths in whole groups
# of 64, each key head's out_proj columns three groups (three value heads of 64), 3 key heads that 2 and 5 ranks
# split unevenly; the MoE's experts two groups wide, so 3 and 5 ranks leave some without expert columns
W4A16_TEXT = dict(vocab_size=49152, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, linear_num_key_heads=3, linear_num_value_heads=9, linear_key_head_dim=32,
                  linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=512,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})
W4A16 = {
    "dense": lambda: transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**W4A16_TEXT,
                                                                                    intermediate_size=320)),
    "moe": lambda: transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(
        **W4A16_TEXT, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=64)),
}
W4A16_BLOCKS = {"dense": {MLP_COLS: 64}, "moe": {EXPERT_COLS: 64, MLP_COLS: 64}}


def _float_qwen3_5_for_w4a16(kind: str, out) -> None:
    torch.manual_seed(0)
    telling(W4A16[kind]()).save_pretrained(out, safe_serialization=True)
    add_smollm2_tokenizer(out)


# made by llmcompressor in the run's one llmcompressor invocation (tests/llmcompressed.py)
LLMCOMPRESSED = {f"qwen3.5-{kind}": Checkpoint(partial(_float_qwen3_5_for_w4a16, kind), ("w4a16",)) for kind in W4A16}


@pytest.fixture(scope="module", params=list(W4A16))
def w4a16_qwen3_5(request, llmcompressed):
    """(kind, its directory, two prompts, the reference's last-position logits on them and its greedy tokens after
    the first): the tiny Qwen3.5 quantized by llmcompressor's GPTQ (w4a16: 4-bit, groups of 64, act-order) - every
    Linear but lm_head, the linear-attention projections included (its conv1d is no Linear: kept as it was; the
    MoE's router no Linear either) - and transformers' Qwen3_5ForCausalLM or Qwen3_5MoeForCausalLM holding
    compressed-tensors' own decompression."""
    kind = request.param
    path = llmcompressed[f"qwen3.5-{kind}"] / "w4a16"
    reference = reference_model(path)
    assert type(reference).__name__ == {"dense": "Qwen3_5ForCausalLM", "moe": "Qwen3_5MoeForCausalLM"}[kind]
    tokens = torch.randint(0, 49152, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = reference(tokens).logits[:, -1]
    return kind, path, tokens, logits, greedy(reference, tokens[0].tolist(), GREEDY_TOKENS)


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_w4a16_made_by_llmcompressor_matches_transformers(w4a16_qwen3_5, ranks):
    kind, path, tokens, logits, tokens_out = w4a16_qwen3_5
    stored = load_file(path / "model.safetensors")
    for linear in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"):
        assert f"model.layers.0.linear_attn.{linear}.weight_g_idx" in stored
    group = LocalGroup(path, SPLITS[ranks], blocks=W4A16_BLOCKS[kind])
    assert group.config.quant.act_order and group.config.quant.group_size == 64
    if ranks == 5:
        assert any(not r.linear_key_heads for r in group.plan.ranks)
        assert kind == "dense" or any(not r.expert_cols for r in group.plan.ranks)
    torch.testing.assert_close(group.logits(tokens), logits, rtol=1e-4, atol=1e-4)
    if ranks in GREEDY_SPLITS:
        out = group.generate([tokens[0].tolist()], SamplingParams(max_tokens=GREEDY_TOKENS),
                             prefill_chunk=CHUNK)["r0"]
        assert out == tokens_out


@pytest.mark.parametrize("ranks", [1, 3, 5])
def test_w4a16_planned_bytes_are_the_bytes_each_rank_holds(w4a16_qwen3_5, ranks):
    """Each rank's share of the quantized linear-attention, attention, MLP and expert weights plus what every rank
    keeps whole (the MoE's shared_expert_gate quantized too) are what it loads (act-order: out_proj's columns keep
    their groups, as o_proj's do); a rank without heads holds less of the whole part, never more."""
    kind, path = w4a16_qwen3_5[:2]
    group = LocalGroup(path, SPLITS[ranks], blocks=W4A16_BLOCKS[kind])
    whole = replicated_tensor_bytes(group.config, "float32") + quant_replicated_bytes(group.config, "float32")
    for model, shard in zip(group.models, group.plan.ranks):
        held = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.weights()}.values())
        planned = shard.weight_bytes + whole
        assert held == planned if shard.linear_key_heads and shard.kv_heads else held <= planned, shard.rank


def test_raytp_plan_shows_linear_attention_heads_and_state_per_rank(capsys):
    """The plan docs/models.md prints (a 5090 and two 3080s): each rank's linear-attention heads, summing to the
    model's, and its conv and recurrent state beside the KV cache of the full-attention layers (and the MTP
    layer), in the bytes the published shape gives: a key head keeps per sequence and linear layer 3 value heads'
    128 x 128 float32 state and 3 taps of its 640 conv channels, a KV head 2 x 256 bf16 values per position."""
    from raytp.cli import main

    devices = "cuda:0@32GiB,cuda:1@20GiB,cuda:2@20GiB"
    assert main(["plan", "--model", "synthetic:qwen3.5-27b@w4a16", "--devices", devices]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[1]
    for title in ("linear key heads", "linear value heads", "KV heads", "conv + recurrent state", "KV cache"):
        assert title in header
    assert main(["plan", "--model", "synthetic:qwen3.5-27b@w4a16", "--devices", devices, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    ranks = plan["ranks"]
    assert sum(r["linear_key_heads"] for r in ranks) == 16 and sum(r["linear_value_heads"] for r in ranks) == 48
    assert ranks[0]["linear_key_heads"] > ranks[1]["linear_key_heads"] > 0
    per_key_head = 48 * (3 * 128 * 128 * 4 + (2 * 128 + 3 * 128) * 3 * 2)  # 48 linear-attention layers
    per_kv_head = (16 + 1) * 2 * plan["max_context"] * 256 * 2  # 16 full-attention layers and the MTP layer
    for r, row in zip(ranks, table[2:]):
        assert r["state_bytes"] == {"conv + recurrent state": r["linear_key_heads"] * per_key_head,
                                    "KV cache": r["kv_heads"] * per_kv_head}
        for title, n in r["state_bytes"].items():  # the table's columns are aligned under their titles
            assert row[header.index(title):].startswith(format_bytes(n) + " "), title


def test_mtp_layers_counted_but_not_stored_load_as_none(tiny, tmp_path):
    """config.json counts an MTP layer whose tensors the checkpoint does not hold, as transformers re-saves a
    published Qwen3.5 (a fine-tune, llmcompressor's output): the model loads without it, checks clean and gives
    transformers' logits; with some of its tensors but not all, the check names a missing one."""
    import shutil

    from raytp.weights.source import ModelSource

    path, reference = tiny("dense")
    copy = shutil.copytree(path, tmp_path / "resaved")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # what check asks for; this test reads no text
        (copy / f).write_text("{}")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"mtp_num_hidden_layers": 1}))
    source = ModelSource.parse(str(copy))
    assert ModelConfig.from_file(copy).mtp_layers == 1 and source.config().mtp_layers == 0
    source.check()
    group = LocalGroup(copy, SPLITS[2], blocks=BLOCKS["dense"])
    assert not any(m.mtp for m in group.models)
    tokens = torch.randint(0, 300, (1, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)

    H = config["hidden_size"]
    save_file(load_file(copy / "model.safetensors") | {"mtp.fc.weight": torch.randn(H, 2 * H)},
              copy / "model.safetensors")
    assert ModelSource.parse(str(copy)).config().mtp_layers == 1
    with pytest.raises(ValueError, match=r"mtp\.norm\.weight|mtp\.pre_fc_norm|mtp\.layers\.0\."):
        ModelSource.parse(str(copy)).check()
