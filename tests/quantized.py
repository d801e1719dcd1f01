"""Test helpers: an independent reference for a compressed-tensors checkpoint, and its weights in the GPTQ and AWQ
layouts (see `gptq_checkpoint`).

compressed-tensors' own compressor (the library llmcompressor wrote the checkpoint with) decompresses every
quantized Linear into a dense matrix, and transformers' Llama runs the result in float32. transformers' own
integration (`run_compressed=False`) would do the same, but transformers 5.23 drops `weight_g_idx` while loading
(its load report lists every g_idx as UNEXPECTED), so it gets act-order checkpoints wrong.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from safetensors import safe_open
from safetensors.torch import save_file

from tests.quant_reference import AWQ_ORDER, dequantize_gemm, gptq_dequantize_weight


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
    """transformers' float32 model (Llama, Qwen3, ...) holding the decompressed weights."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    if getattr(config, "num_experts_per_tok", None):
        return _reference_moe(config, model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = decompressed_state_dict(model_dir)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffers were on meta
    return model.eval()


def _reference_moe(config: transformers.PretrainedConfig, model_dir: Path) -> transformers.PreTrainedModel:
    """A mixture of experts: the checkpoint stores each expert's Linears apart and transformers' model fuses them,
    so the decompressed weights go through transformers' own loader (and its key conversion) from a directory."""
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in decompressed_state_dict(model_dir).items()},
                  Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.eval()


def quantize_activations(model: transformers.PreTrainedModel, model_dir: Path) -> transformers.PreTrainedModel:
    """`reference_model` with each quantized Linear's input quantized as the checkpoint's `input_activations` say
    (FP8_DYNAMIC, W8A8), by compressed-tensors' own dynamic quantization: the scales of `compute_dynamic_scales_and_zp`
    (per token: transformers' Linears see (batch, seq, hidden)), then its `fake_quantize`. transformers' own
    integration does not do it for a decompressed model (`run_compressed=False` leaves plain nn.Linears)."""
    q = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs.model_validate(next(iter(q["config_groups"].values()))["input_activations"])

    def quantize_input(module, inputs):
        x = inputs[0]
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, module)
        return (fake_quantize(x, scale, zero_point, args),)

    quantized = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            quantized |= {k.removesuffix(".weight_scale") for k in st.keys() if k.endswith(".weight_scale")}
    assert quantized
    for name, module in model.named_modules():
        if name in quantized:
            module.register_forward_pre_hook(quantize_input)
    return model


# --- The same weights in the GPTQ and AWQ layouts ------------------------------------------------------------------
# Written with compressed-tensors' own packing (pack_to_int32: value i of a row in bits [b*i, b*i + b), GPTQ's bit
# order too) and checked, matrix by matrix, against the format libraries' own dequantization (tests/quant_reference):
# GPTQModel's for GPTQ, AutoAWQ's for AWQ, which must give compressed-tensors' decompressed weights bit for bit.
# Scales stay in the checkpoint's float32 (GPTQModel and AutoAWQ write float16) so that the logits can be compared
# with the compressed-tensors reference at float32 tolerance.

def _quantized_modules(model_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(config.json, {module: its compressed-tensors tensors}, every other tensor)."""
    config = json.loads((model_dir / "config.json").read_text())
    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors |= {k: st.get_tensor(k) for k in st.keys()}
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
    grouped = {m: {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == m} for m in modules}
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in modules}
    return config, grouped, rest


def _unsigned(packed: torch.Tensor, shape, bits: int, packed_dim: int) -> torch.Tensor:
    """compressed-tensors' unpacking, shifted from its signed storage to the unsigned values GPTQ and AWQ store."""
    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim).to(torch.int32) + (1 << (bits - 1))


def _pack(unsigned: torch.Tensor, bits: int, packed_dim: int) -> torch.Tensor:
    return pack_to_int32((unsigned - (1 << (bits - 1))).to(torch.int8), bits, packed_dim)


def _write(dst: Path, src: Path, config: dict, tensors: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def gptq_checkpoint(src: Path, dst: Path) -> Path:
    """The symmetric act-order W4A16 checkpoint `src` in AutoGPTQ's "gptq" (v1) layout: qweight (in / 8, out),
    qzeros (groups, out / 8) holding zero - 1, scales (groups, out), g_idx (in,) from weight_g_idx."""
    config, modules, tensors = _quantized_modules(src)
    w = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["actorder"]) == (4, True, "group")
    dense = decompressed_state_dict(src)
    for m, t in modules.items():
        shape = tuple(t["weight_shape"].tolist())
        q = _unsigned(t["weight_packed"], shape, 4, 1)  # (out, in)
        scales = t["weight_scale"].t()  # (groups, out)
        zeros = torch.full_like(scales, 8 - 1, dtype=torch.int32)  # v1 stores the midpoint minus one
        gptq = {"qweight": _pack(q.t(), 4, 0), "qzeros": _pack(zeros, 4, 1), "scales": scales,
                "g_idx": t["weight_g_idx"]}
        assert torch.equal(gptq_dequantize_weight(gptq["qweight"], gptq["qzeros"], scales, gptq["g_idx"], 4).t(),
                           dense[m + ".weight"]), m
        tensors |= {f"{m}.{k}": v for k, v in gptq.items()}
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": w["group_size"],
                                     "desc_act": True, "sym": True, "checkpoint_format": "gptq"}
    return _write(dst, src, config, tensors)


def awq_checkpoint(src: Path, dst: Path) -> Path:
    """The asymmetric W4A16 checkpoint `src` (no act-order) in AutoAWQ's GEMM layout: qweight (in, out / 8) and
    qzeros (groups, out / 8) packed along the outputs in AWQ_ORDER, scales (groups, out)."""
    config, modules, tensors = _quantized_modules(src)
    w = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["actorder"]) == (4, False, None)
    dense = decompressed_state_dict(src)
    for m, t in modules.items():
        out, inp = t["weight_shape"].tolist()
        q = _unsigned(t["weight_packed"], (out, inp), 4, 1)
        zeros = _unsigned(t["weight_zero_point"], (out, t["weight_scale"].shape[1]), 4, 0)
        interleave = torch.arange(out).view(-1, 8)[:, AWQ_ORDER].flatten()  # nibble s of a word: output AWQ_ORDER[s]
        awq = {"qweight": _pack(q.t()[:, interleave], 4, 1), "qzeros": _pack(zeros.t()[:, interleave], 4, 1),
               "scales": t["weight_scale"].t()}
        assert torch.equal(dequantize_gemm(awq["qweight"], awq["qzeros"], awq["scales"], 4, w["group_size"]).t(),
                           dense[m + ".weight"]), m
        tensors |= {f"{m}.{k}": v for k, v in awq.items()}
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": w["group_size"],
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    return _write(dst, src, config, tensors)


def fp8_blocks_checkpoint(source: Path, out: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """The float checkpoint at `source` as transformers' fine-grained FP8 (what Qwen publishes as Qwen3-*-FP8):
    every decoder Linear's weight in e4m3, scaled per block of `block` rows x columns by `weight_scale_inv`
    (amax / 448, so each block's largest value is e4m3's largest), written to `out` with the config that says so.
    transformers dequantizes it by itself on a CPU: the reference the tests compare with."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in source.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors |= {k: st.get_tensor(k) for k in st.keys()}
    rows, cols = block
    stored = {}
    for name, t in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            stored[name] = t
            continue
        n, k = t.shape
        padded = torch.zeros(-(-n // rows) * rows, -(-k // cols) * cols)
        padded[:n, :k] = t.float()
        blocks = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        values = (blocks / scale[:, None, :, None]).view(padded.shape)[:n, :k]
        stored[name], stored[name + "_scale_inv"] = values.to(torch.float8_e4m3fn).contiguous(), scale
    save_file(stored, out / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config))
    return out
