"""A peer to compare against: Hugging Face transformers decoding the same weights on one device.

For a checkpoint directory (or `smollm2`) the peer loads it with `from_pretrained`. For `synthetic:` models it
builds the architecture from the same config on the meta device and assigns the one-rank synthetic weights
(`raytp.weights.synthetic`, drawn on the same kind of device, so the very tensors a one-device raytp rank holds), which
costs no second copy of the model. Timing: greedy `generate` of N tokens minus that of one token (the prefill and
the first sample), over N - 1 steps; EOS is ignored, as in raytp's benchmark requests.

transformers is a test dependency, not a runtime one: `raytp bench --hf-peer` needs it installed on the nodes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

from raytp.model.config import ModelConfig


def hf_state_dict(config: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-rank raytp weight dict (raytp.model.llama's layout) as a Hugging Face Llama/Mistral/Qwen2 state dict."""
    D = config.head_dim
    split = [config.num_heads * D, config.num_kv_heads * D, config.num_kv_heads * D]
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["final_norm"], "lm_head.weight": w["lm_head"]}
    for i in range(config.num_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        sd[p + "input_layernorm.weight"] = w[f"layers.{i}.attn_norm"]
        sd[p + "post_attention_layernorm.weight"] = w[f"layers.{i}.mlp_norm"]
        for name, t in zip(("q", "k", "v"), w[f"layers.{i}.wqkv"].split(split)):
            sd[a + f"{name}_proj.weight"] = t
        if config.attention_bias:
            for name, t in zip(("q", "k", "v"), w[f"layers.{i}.bqkv"].split(split)):
                sd[a + f"{name}_proj.bias"] = t
        sd[a + "o_proj.weight"] = w[f"layers.{i}.wo"]  # (hidden, heads * head_dim): HF's layout already
        sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"] = w[f"layers.{i}.w_gate_up"].chunk(2)
        sd[m + "down_proj.weight"] = w[f"layers.{i}.w_down"]
    return sd


def _synthetic_hf_config(model: str):
    import transformers

    from raytp.weights.synthetic import CONFIGS, PREFIX

    name = model.removeprefix(PREFIX)
    if name in CONFIGS:
        d = json.loads(json.dumps(CONFIGS[name]))
    else:
        path = Path(name)
        d = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    return transformers.AutoConfig.for_model(**d)


def _hf_model(model: str, dtype: str, device: torch.device):
    import transformers

    from raytp.weights.smollm2 import resolve_model
    from raytp.parallel.plan import plan_shards
    from raytp.weights.source import model_config
    from raytp.weights.synthetic import is_synthetic, synthetic_weights

    if not is_synthetic(model):
        hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=getattr(torch, dtype))
        return hf.to(device).eval()
    config = model_config(model)
    hf_config = _synthetic_hf_config(model)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    whole = plan_shards(config, [("peer", 1 << 62)], max_context=1, max_batch=1, dtype=dtype).ranks[0]
    weights = synthetic_weights(config, whole, dtype=getattr(torch, dtype), device=device)
    hf.load_state_dict(hf_state_dict(config, weights),
                       assign=True, strict=True)
    rotary = hf.model.rotary_emb  # its frequencies are buffers, left on the meta device: compute them for real
    hf.model.rotary_emb = type(rotary)(config=hf.config).to(device)
    return hf.eval()


def hf_decode(model: str, dtype: str, device_kind: str, batches: list[int], prompts: dict[int, list[list[int]]],
              decode_tokens: int, repeats: int) -> dict[int, dict]:
    """{batch: {"ms_per_step", "tokens_per_s", "tokens" (request 0's greedy tokens)}} on this process's device."""
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    hf = _hf_model(model, dtype, device)
    hf.generation_config.eos_token_id = None  # run the full length, as raytp's benchmark requests do
    hf.generation_config.pad_token_id = 0

    def generate(ids, n):
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        tokens = out[:, ids.shape[1]:].tolist()  # .tolist() waits for the device
        return time.perf_counter() - start, tokens

    out = {}
    for batch in batches:
        ids = torch.tensor(prompts[batch], device=device)
        generate(ids, 2)  # warm-up
        steps = []
        for _ in range(repeats):
            one, _ = generate(ids, 1)
            full, tokens = generate(ids, decode_tokens)
            steps.append(1000 * (full - one) / (decode_tokens - 1))
        ms = statistics.median(steps)
        out[batch] = {"ms_per_step": ms, "tokens_per_s": 1000 * batch / ms, "tokens": tokens[0]}
    return out


def run_peer(model: str, dtype: str, device_kind: str, batches: list[int], prompts: dict[int, list[list[int]]],
             decode_tokens: int, repeats: int) -> dict[int, dict]:
    """`hf_decode` in a Ray task holding one device of `device_kind` (one GPU, or one CPU slot)."""
    resources = {"num_gpus": 1} if device_kind == "cuda" else {"num_cpus": 1}
    task = ray.remote(max_calls=1, **resources)(hf_decode)
    return ray.get(task.remote(model, dtype, device_kind, batches, prompts, decode_tokens, repeats))


def peer_rows(sweep, result, config) -> tuple[dict, str]:
    """Hugging Face decode next to every one-device configuration that ran; (rows' peer figures, a note)."""
    from raytp.bench.sweep import random_requests

    peer, done = {}, {}
    for o in result["outcomes"]:
        run = result["runs"][o["run"]] if o["run"] is not None else None
        if run is None or len(run["devices"]) != 1:
            continue
        key = (o["devices"], o["prompt_len"])
        if key not in done:
            kind = dict(sweep.device_sets)[o["devices"]][0].kind
            prompts = {b: [r.prompt_ids for r in random_requests(b, o["prompt_len"], 1, config.vocab_size, "hf")]
                       for b in sweep.batches}
            try:
                done[key] = run_peer(sweep.model, sweep.dtype, kind, list(sweep.batches), prompts,
                                     sweep.decode_tokens, sweep.repeats)
            except Exception as e:  # noqa: BLE001 - the peer is a comparison: its failure is reported, not fatal
                print(f"raytp: the HF peer on {o['devices']} failed: {e}", file=sys.stderr)
                done[key] = {}
        if o["batch"] in done[key]:
            peer[(o["devices"], o["comm"], o["prompt_len"], o["batch"])] = done[key][o["batch"]]
    note = ("transformers' AutoModelForCausalLM on the same weights (for synthetic models: the same one-device "
            "random weights, assigned into the architecture built from the same config), greedy, EOS ignored, on "
            "the device of each one-device configuration; ms per step = (time of N tokens - time of 1) / (N - 1). "
            "'HF same tokens' compares request 0's greedy tokens with raytp's: in float32 they should agree; in "
            "16-bit types the two implementations round differently and greedy tokens may part after a few steps.")
    return peer, note if peer else "requested, but the sweep has no one-device configuration that ran"
