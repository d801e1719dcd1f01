"""The new families on one GPU, end to end (GPU host only): a small Gemma 3, Qwen3.5 (dense and MoE) and gpt-oss
(MXFP4 experts) saved by transformers, read by raytp's loader onto the GPU and decoded by the engine from CUDA
graphs with its Triton kernels (window attention, sinks, fla-core's delta rule where installed, the MXFP4 GEMV),
greedy in float32: the tokens of transformers' own forward on the same weights on the CPU, for two prompts of
different lengths in one batch, prompts and generations longer than the window and the delta rule's chunk."""

import pytest
import torch
import transformers

from raytp.model.llama import ShardedLlama
from raytp.model.pieces import plan_model
from raytp.parallel.comm.factory import PHASES, CommPlan, open_group
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource
from tests.test_gpt_oss import save_mxfp4
from tests.test_qwen3_5 import greedy, telling
from tests.util import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY_TOKENS = 24
PROMPTS = (70, 9)  # token counts: over the delta rule's chunk of 64 and the windows, and under them
QWEN3_5 = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
               linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=512,
               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})


def gemma3(path):
    config = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, sliding_window=16, max_position_embeddings=512)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


def qwen3_5(path):
    model = telling(transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**QWEN3_5, intermediate_size=512)))
    model.save_pretrained(path)
    return model


def qwen3_5_moe(path):
    config = transformers.Qwen3_5MoeTextConfig(**QWEN3_5, moe_intermediate_size=128, num_experts=8,
                                               num_experts_per_tok=2, shared_expert_intermediate_size=128)
    model = telling(transformers.Qwen3_5MoeForCausalLM(config))
    model.save_pretrained(path)
    return model


def gpt_oss(path):
    config = transformers.GptOssConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                                       max_position_embeddings=512)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "sinks")) or name.endswith("bias"):
                p.normal_(0, 1.0)
    save_mxfp4(model, path, seed=1)
    return transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()


FAMILIES = {"gemma3": gemma3, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe, "gpt_oss": gpt_oss}


def decode(path, prompts: list[list[int]], device: str = "cuda") -> dict[str, list[int]]:
    """Greedy tokens of `prompts` in one batch, one rank on `device`, decode steps replayed from CUDA graphs."""
    source = ModelSource.parse(str(path))
    config = source.config()
    device = torch.device(device)
    plan = plan_model(config, [(device.type, 8 << 30)], max_context=256, max_batch=4, dtype="float32")
    opening = open_group(CommPlan.make("hoststaged", [[0]], f"tcp://127.0.0.1:{free_port()}", timeout_s=60), 0,
                         device)
    for phase in PHASES:
        opening.step(phase)
    with source.reader(torch.float32, device) as reader:
        lm = ShardedLlama(config, plan.ranks[0], opening.comm, reader, max_batch=4, max_context=256)
    engine = RankEngine(lm, opening.comm)
    if device.type == "cuda":
        engine.use_cuda_graphs()
    out = {f"r{i}": [] for i in range(len(prompts))}

    def emit(events):
        for e in events:
            if e.token_id is not None:
                out[e.request_id].append(e.token_id)
        if sum(map(len, out.values())) == GREEDY_TOKENS * len(prompts):
            engine.inbox.put(Stop())

    for i, prompt in enumerate(prompts):
        engine.inbox.put(Add(Request(f"r{i}", prompt, SamplingParams(max_tokens=GREEDY_TOKENS), [])))
    engine.run(emit)
    opening.comm.close()
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graphed_gpu_decode_gives_the_tokens_of_transformers(family, tmp_path):
    if not hasattr(transformers, {"gemma3": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}.get(
            family, "Qwen3_5ForCausalLM")):
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    torch.manual_seed(0)
    reference = FAMILIES[family](tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in PROMPTS]
    out = decode(tmp_path, prompts)
    for i, prompt in enumerate(prompts):
        assert out[f"r{i}"] == greedy(reference, prompt, GREEDY_TOKENS), f"prompt {i} of {len(prompt)} tokens"
