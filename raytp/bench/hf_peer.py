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
from raytp.model.formats import WeightReader
from raytp.model.layout import model_layout, whole_model


def hf_state_dict(config: ModelConfig, reader: WeightReader) -> dict[str, torch.Tensor]:
    """The whole model read through `reader` as a Hugging Face Llama/Mistral/Qwen2/Qwen3 state dict: raytp's layout
    names HF's tensors, and a one-rank slice of each is the whole tensor."""
    layout = model_layout(config, whole_model(config))
    sd = {s.name: reader.read(s) for s in layout.slices()}
    if layout.tied:  # transformers' state dict lists the shared tensor under both names
        sd[layout.lm_head.name] = sd[layout.embed.name]
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

    from raytp.weights.source import ModelSource

    source = ModelSource.parse(model)
    if not source.is_synthetic:
        hf = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=getattr(torch, dtype))
        return hf.to(device).eval()
    config = source.config()
    hf_config = _synthetic_hf_config(model)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    with source.reader(getattr(torch, dtype), device) as reader:
        hf.load_state_dict(hf_state_dict(config, reader), assign=True, strict=True)
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
                done[key] = run_peer(run["model"], sweep.dtype, kind, list(sweep.batches), prompts,
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
