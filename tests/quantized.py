"""Test helper: an independent reference for a compressed-tensors checkpoint.

compressed-tensors' own compressor (the library llmcompressor wrote the checkpoint with) decompresses every
quantized Linear into a dense matrix, and transformers' Llama runs the result in float32. transformers' own
integration (`run_compressed=False`) would do the same, but transformers 5.23 drops `weight_g_idx` while loading
(its load report lists every g_idx as UNEXPECTED), so it gets act-order checkpoints wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open


def decompressed_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, each quantized Linear decompressed by compressed-tensors to `.weight`."""
    q = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    group = next(iter(q["config_groups"].values()))
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or q["format"])
    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors |= {k: st.get_tensor(k) for k in st.keys()}
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in modules}
    for m in modules:
        local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == m}
        out[m + ".weight"] = compressor.decompress(local, scheme)["weight"].float()
    return out


def reference_model(model_dir: Path) -> transformers.PreTrainedModel:
    """transformers' float32 Llama holding the decompressed weights."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = decompressed_state_dict(model_dir)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffers were on meta
    return model.eval()
