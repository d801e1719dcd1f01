"""Speculative decoding with the model's own MTP layer (`mtp[:k]`) on CPU ranks (threads, in-process collectives): tiny
Qwen3.5s, dense and MoE, saved by transformers, their mtp.* tensors added beside (transformers drops them): the dense
one of full-attention layers, the MoE one a linear-attention layer and a full-attention one, as Qwen3.5 mixes them
(its verify steps' positions enter the recurrent state once kept). The MTP forward equals one written from vLLM's
Qwen3.5 MTP with transformers' own layer classes; greedy and seeded tokens equal plain decoding's at 1, 2 and 3
(uneven) ranks in a mixed batch; after rejections the model's cache and the MTP layer's hold what clean runs write;
an MTP layer that is the model itself has its drafts accepted; `mtp` on a model without MTP layers is refused naming
the value and the fix, on the command line and per request."""

import asyncio
import copy
import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from raytp.cli.checks import check_args
from raytp.cli.parser import build_parser
from raytp.model.mlp import MLP_COLS
from raytp.model.moe import EXPERT_COLS
from raytp.runtime import speculation
from raytp.runtime.engine import Add, Request
from raytp.runtime.errors import RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import check_drafter, drafting
from tests.llmcompressed import add_smollm2_tokenizer
from tests.sharded import LocalGroup
from tests.test_cli_checks import SMALL, refused
from tests.test_decode_loop import run_loop, tokens_of
from tests.test_driver import fake_driver, items
from tests.test_qwen3_5 import telling

VOCAB, H = 300, 48
CONFIG = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, layer_types=["full_attention"] * 2,
              num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=80,
              max_position_embeddings=512, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})
SPLITS = {"1-rank": (1.0,), "2-ranks": (1.0, 1.0), "3-uneven": (3.0, 2.0, 1.0)}
PROMPTS = [[5, 17, 200, 42, 9, 9, 250, 31, 7], [99, 3, 3, 3, 64, 0, 12, 201, 77, 18, 140, 2]]


MOE = dict(moe_intermediate_size=40, num_experts=5, num_experts_per_tok=2, shared_expert_intermediate_size=24,
           layer_types=["linear_attention", "full_attention"], linear_num_key_heads=3, linear_num_value_heads=9,
           linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
# the MoE model's expert and MLP widths in blocks that divide no rank count
BLOCKS = {"dense": {MLP_COLS: 8}, "moe": {EXPERT_COLS: 8, MLP_COLS: 8}}


def save_with_mtp_layer(model, path) -> dict[str, torch.Tensor]:
    """`model` saved to `path` with an MTP layer added: its last decoder layer's weights, perturbed, and norms and
    fc of its own. Returns the MTP tensors."""
    model.save_pretrained(path, safe_serialization=True)
    tensors = load_file(path / "model.safetensors")
    mtp = {k.replace("model.layers.1.", "mtp.layers.0."): v + 0.02 * torch.randn_like(v) for k, v in tensors.items()
           if k.startswith("model.layers.1.")}
    mtp |= {"mtp.fc.weight": torch.randn(H, 2 * H) / (2 * H) ** 0.5, "mtp.norm.weight": 0.3 * torch.randn(H),
            "mtp.pre_fc_norm_embedding.weight": 0.3 * torch.randn(H),
            "mtp.pre_fc_norm_hidden.weight": 0.3 * torch.randn(H)}
    save_file(tensors | mtp, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"mtp_num_hidden_layers": 1}))
    return mtp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory with mtp.*, directory without, transformers model, the MTP tensors): dense."""
    torch.manual_seed(0)
    model = telling(transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**CONFIG)))
    plain, path = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("mtp")
    model.save_pretrained(plain, safe_serialization=True)
    mtp = save_with_mtp_layer(model, path)
    for d in (plain, path):
        add_smollm2_tokenizer(d)  # the command line wants one
    return path, plain, model, mtp


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """(directory with mtp.*, transformers model, the MTP tensors): experts and a shared expert in every layer, the
    MTP layer's too."""
    torch.manual_seed(0)
    config = {k: v for k, v in CONFIG.items() if k != "intermediate_size"} | MOE
    model = telling(transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**config)))
    path = tmp_path_factory.mktemp("moe")
    return path, model, save_with_mtp_layer(model, path)


_groups: dict[tuple, LocalGroup] = {}


def group_of(path, split) -> LocalGroup:
    if (path, split) not in _groups:
        _groups.clear()
        blocks = BLOCKS["moe" if path.name.startswith("moe") else "dense"]
        _groups[path, split] = LocalGroup(path, list(split), max_context=96, max_batch=4, blocks=blocks)
    return _groups[path, split]


def reference_mtp(model, mtp: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's Qwen3_5MultiTokenPredictor over a sequence, with transformers' classes: the decoder's hidden states
    after its final norm at positions 0..T-2, the embeddings of tokens 1..T-1, each normed, concatenated
    [embedding | hidden], fc, a full-attention decoder layer at positions 0..T-2, mtp.norm, the shared lm_head.
    Returns (logits (T-1, vocab), hidden states after mtp.norm (T-1, hidden))."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa"  # causal without a mask
    layer = type(model.model.layers[1])(config, layer_idx=1).eval()  # the model's own full-attention layer class
    state = {k.removeprefix("mtp.layers.0."): v for k, v in mtp.items() if k.startswith("mtp.layers.0.")}
    experts = range(model.config.num_experts) if "mlp.experts.0.up_proj.weight" in state else ()
    if experts:  # as saved, one tensor per expert; the layer holds them stacked, gate rows before up rows
        state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
            [state.pop(f"mlp.experts.{e}.{w}_proj.weight") for w in ("gate", "up")]) for e in experts])
        state["mlp.experts.down_proj"] = torch.stack([state.pop(f"mlp.experts.{e}.down_proj.weight")
                                                     for e in experts])
    layer.load_state_dict(state)
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = type(model.model.norm)(H, eps=config.rms_norm_eps)
        norms[name].load_state_dict({"weight": mtp[f"mtp.{name}.weight"]})
    fc = torch.nn.Linear(2 * H, H, bias=False)
    fc.load_state_dict({"weight": mtp["mtp.fc.weight"]})
    with torch.no_grad():
        hidden = model.model(tokens[None]).last_hidden_state[0, :-1]
        embedded = model.model.embed_tokens(tokens[1:])
        x = fc(torch.cat([norms["pre_fc_norm_embedding"](embedded), norms["pre_fc_norm_hidden"](hidden)], -1))[None]
        positions = torch.arange(len(tokens) - 1)[None]
        x = layer(x, position_embeddings=model.model.rotary_emb(x, positions), position_ids=positions)
        out = norms["norm"](x)[0]
        return model.lm_head(out), out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_the_mtp_forward_is_vllms_qwen3_5_mtp(tiny, tiny_moe, kind):
    path, model, mtp = (tiny[0], tiny[2], tiny[3]) if kind == "dense" else tiny_moe
    group = group_of(path, SPLITS["3-uneven"])
    tokens = torch.tensor(PROMPTS[1])
    logits, out = reference_mtp(model, mtp, tokens)

    def run(r, m):
        T = len(tokens)
        _, hidden = m.forward(tokens[None], torch.arange(T)[None], torch.tensor([0]), hidden=True)
        return m.mtp_forward(tokens[None, 1:], hidden[:, :-1], torch.arange(T - 1)[None], torch.tensor([0]))

    pieces = group.on_all_ranks(run)
    torch.testing.assert_close(torch.cat([p[0] for p in pieces], dim=-1)[0], logits[-1], rtol=1e-4, atol=1e-4)
    for _, h in pieces:
        torch.testing.assert_close(h[0], out, rtol=1e-4, atol=1e-4)


def off(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, speculate="off")


def drafted_steps(seen, rid=None):
    return [(e.drafted, e.accepted) for e in seen if e.drafted and rid in (None, e.request_id)]


def samples(seen, rid):
    return {i: [e.token_id for e in seen if e.request_id == rid and e.index == i and e.token_id is not None]
            for i in sorted({e.index for e in seen if e.request_id == rid})}


@pytest.mark.parametrize("split", list(SPLITS))
def test_greedy_and_seeded_tokens_are_those_of_plain_decoding_in_a_mixed_batch(tiny, split):
    """Greedy n=2 drafting 3, greedy without drafting, seeded hot sampling (flat distributions: the shared noise
    makes the MTP layer's draws agree often) with a repetition penalty drafting 2, and a seeded request drafting 4
    that joins mid-run; again with drafting off everywhere."""
    group = group_of(tiny[0], SPLITS[split])
    params = [SamplingParams(max_tokens=12, n=2, speculate="mtp:3"), SamplingParams(max_tokens=10),
              SamplingParams(temperature=2.0, top_k=40, repetition_penalty=1.1, seed=7, max_tokens=14,
                             speculate="mtp:2")]
    joining = SamplingParams(temperature=2.0, seed=3, max_tokens=10, speculate="mtp")

    def run(params, late):
        def join(event, submit, seen):
            if event.request_id == "r0" and len(tokens_of(seen, "r0")) == 4:
                submit(Add(Request("late", PROMPTS[1], late, [])))
        first = [Add(Request(f"r{i}", PROMPTS[i % 2], p, [])) for i, p in enumerate(params)]
        return run_loop(group, first, join)[0]

    fast = run(params, joining)
    plain = run([off(p) for p in params], off(joining))
    for rid in ("r0", "r1", "r2", "late"):
        assert samples(fast, rid) == samples(plain, rid), rid
    steps = drafted_steps(fast)
    assert any(a > 0 for _, a in steps) and any(a < d for d, a in steps)  # drafts accepted, and drafts rejected
    assert not drafted_steps(plain) and not drafted_steps(fast, "r1") and drafted_steps(fast, "late")


def test_moe_greedy_and_seeded_tokens_are_those_of_plain_decoding(tiny_moe):
    group = group_of(tiny_moe[0], SPLITS["3-uneven"])
    params = [SamplingParams(max_tokens=12, speculate="mtp:3"),
              SamplingParams(temperature=2.0, seed=7, max_tokens=12, speculate="mtp:2")]
    first = lambda params: [Add(Request(f"r{i}", PROMPTS[i], p, [])) for i, p in enumerate(params)]  # noqa: E731
    fast, plain = (run_loop(group, first(ps))[0] for ps in (params, [off(p) for p in params]))
    for rid in ("r0", "r1"):
        assert tokens_of(fast, rid) == tokens_of(plain, rid), rid
    assert drafted_steps(fast) and not drafted_steps(plain)


def test_after_rejected_drafts_both_caches_hold_what_clean_runs_write(tiny, monkeypatch):
    """One seeded row drafting 3, never pausing (every step a verify step, so the MTP layer sees every position's
    hidden state): the model's cache equals a clean forward over the sequence, the MTP layer's a clean MTP run over
    it, at every position the drafter has run with the decoder's hidden state."""
    monkeypatch.setattr(speculation, "MIN_GAIN", -1.0)
    group = group_of(tiny[0], SPLITS["3-uneven"])
    params = SamplingParams(temperature=2.0, seed=5, max_tokens=24, speculate="mtp:3")
    seen, engines = run_loop(group, [Add(Request("r0", PROMPTS[0], params, []))])
    steps = drafted_steps(seen)
    assert any(a < d for d, a in steps) and any(a > 0 for _, a in steps)
    tokens = PROMPTS[0] + tokens_of(seen, "r0")
    run_by_mtp = engines[0].mtp.pending[0].start  # positions the MTP layer ran with the decoder's hidden states
    assert run_by_mtp >= len(tokens) - 5
    target_held, clean = len(tokens) - 1, 3  # slot 3: nobody used it

    def compare(r, m):
        T = len(tokens)
        _, hidden = m.forward(torch.tensor([tokens[:-1]]), torch.arange(T - 1)[None], torch.tensor([clean]),
                              hidden=True)
        m.mtp_forward(torch.tensor([tokens[1:run_by_mtp + 1]]), hidden[:, :run_by_mtp],
                      torch.arange(run_by_mtp)[None], torch.tensor([clean]))
        n = len(m.config.mixers)
        for i, state in enumerate(m.states):
            held = target_held if i < n else run_by_mtp
            for kv in ("k", "v"):
                got, want = getattr(state, kv)[0, :, :held], getattr(state, kv)[clean, :, :held]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    group.on_all_ranks(compare)


def test_mtp_without_mtp_layers_is_refused_naming_the_value_and_the_fix(tiny, capsys):
    assert [drafting(v) for v in ("mtp", "mtp:1", "mtp:8")] == [("mtp", 4), ("mtp", 1), ("mtp", 8)]
    for bad in ("mtp:0", "mtp:9", "mtp:x"):
        with pytest.raises(RequestError, match=repr(bad)):
            SamplingParams(speculate=bad)
    with pytest.raises(RequestError, match=r"'mtp:2'.*no MTP layers.*ngram") as e:
        check_drafter("mtp:2", None, 0)
    assert e.value.param == "speculate"
    check_drafter("mtp:2", None, 1)
    path, plain = tiny[:2]
    err = refused(capsys, "generate", "--model", str(plain), "--prompt-ids", "1,2", "--speculate", "mtp:3", *SMALL)
    assert "--speculate mtp:3" in err and str(plain) in err and "no MTP layers" in err and "ngram" in err
    check_args(build_parser().parse_args(["generate", "--model", str(path), "--prompt-ids", "1,2", "--speculate",
                                          "mtp:3", *SMALL]))  # a model with MTP layers takes it


def save_model_whose_mtp_layer_is_itself(path) -> None:
    """A one-layer Qwen3.5 whose embedding rows have an RMS of 1 (so the MTP layer's embedding norm, weight 0 under
    (1+w), leaves them as they are), its MTP layer that very layer, fc passing the embedding alone and mtp.norm the
    final norm: the MTP layer computes at position p what the model computes at p + 1 (the same keys, shifted one
    position), so every drafted token but near-ties is the model's."""
    torch.manual_seed(1)
    model = telling(transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
        **CONFIG | dict(num_hidden_layers=1, layer_types=["full_attention"]))))
    with torch.no_grad():
        e = model.model.embed_tokens.weight
        e.copy_(e / e.pow(2).mean(-1, keepdim=True).sqrt())
    model.save_pretrained(path, safe_serialization=True)
    tensors = load_file(path / "model.safetensors")
    mtp = {k.replace("model.layers.0.", "mtp.layers.0."): v.clone() for k, v in tensors.items()
           if k.startswith("model.layers.0.")}
    mtp |= {"mtp.fc.weight": torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1), "mtp.norm.weight":
            tensors["model.norm.weight"].clone(), "mtp.pre_fc_norm_embedding.weight": torch.zeros(H),
            "mtp.pre_fc_norm_hidden.weight": torch.zeros(H)}
    save_file(tensors | mtp, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"mtp_num_hidden_layers": 1}))


def test_an_mtp_layer_that_is_the_one_layer_model_itself_has_its_drafts_accepted(tmp_path):
    """What a wrong token, position or cache entry in drafting breaks (save_model_whose_mtp_layer_is_itself)."""
    save_model_whose_mtp_layer_is_itself(tmp_path)
    group = LocalGroup(tmp_path, [2.0, 1.0], max_context=96, max_batch=2)
    greedy = SamplingParams(max_tokens=20, speculate="mtp:4")
    fast = run_loop(group, [Add(Request("r0", PROMPTS[0], greedy, []))])[0]
    plain = run_loop(group, [Add(Request("r0", PROMPTS[0], off(greedy), []))])[0]
    assert tokens_of(fast, "r0") == tokens_of(plain, "r0")
    steps = drafted_steps(fast)
    assert sum(a for _, a in steps) >= 0.9 * sum(d for d, _ in steps) and len(steps) <= 6


def test_a_request_for_mtp_on_a_model_without_mtp_layers_never_reaches_the_leader():
    """The API's per-request field: the driver refuses it (a 400 naming `speculate`) before any rank sees it."""
    async def run():
        d = fake_driver(lambda rid: [])
        with pytest.raises(RequestError, match=r"'mtp'.*no MTP layers") as e:
            await items(d, [1, 2], SamplingParams(max_tokens=4, speculate="mtp"))
        return d, e.value.param
    d, param = asyncio.run(run())
    assert param == "speculate" and d.group.leader.commands == [] and d.streams == {}
