"""Synthetic models: a real config's shapes with random weights made on each rank, no checkpoint, no disk.

    synthetic:llama-3.1-8b | synthetic:llama-3.1-70b | synthetic:llama-3.1-405b   the published HF configs
    synthetic:qwen3-8b | synthetic:qwen3-32b                                     (Qwen3: q/k norms, no bias)
    synthetic:qwen3-30b-a3b | synthetic:mixtral-8x7b                             mixtures of experts
    synthetic:gpt-oss-20b | synthetic:gpt-oss-120b                               with MXFP4 experts, as published
    synthetic:gemma-3-27b                                           Gemma 3: five sliding-window layers per full one
    synthetic:qwen3.5-27b | synthetic:qwen3.5-35b-a3b                Qwen3.5: Gated DeltaNet and full attention
    synthetic:tiny                                                               a small config for tests
    synthetic:PATH/config.json                                                   any supported config.json
    synthetic:NAME@w4a16 | @w8a16 | @fp8 | @fp8-blocks | @fp8-dynamic | @w8a8
                                                  the attention and MLP matrices quantized (config.QUANT_PRESETS)

Every weight is cut into fixed global blocks (one head of q/k/v/o, `BLOCK` rows of the MLP and the vocab) and
each block is drawn from its own generator, seeded from (tensor name, block index). A rank draws only the blocks
that cover its slices, on its own device, so the concatenation over ranks is exactly a one-rank model's weights
whatever the split. Values depend on the device type (CPU and CUDA generators differ): compare splits on one kind
of device. Weights are N(0, 0.02^2), norms 1 + N(0, 0.02^2) as the forward uses them (a family that stores norms as an offset
from 1, Gemma, draws N(0, 0.02^2)), so activations stay in range at any depth.

Quantized, a matrix is drawn directly as the tensors its checkpoint method stores for it (what
`raytp.model.quant` reads; a preset's are compressed-tensors'), each in fixed tiles of TILE x TILE: random packed
words (every value equally likely) with scales that give the weights the same 0.02 spread, FP8 values N(0, 1) with a
per-row (or per-block) scale near 0.02, or (W8A8) unpacked int8 values, every one equally likely, with scales as for
packed ones; MXFP4 (gpt-oss's experts) random bytes with power-of-two scales within a factor of two of the one
that gives that spread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import torch

from raytp.model.config import QUANT_PRESETS, ModelConfig, quant_preset
from raytp.model.layout import Slice, model_layout, whole_model

PREFIX = "synthetic:"
BLOCK = 64  # MLP columns and vocab rows are drawn in blocks of this many (the last may be partial)
SCALE = 0.02
SEED = 20261121
TILE = 256  # a quantized matrix's stored tensors are drawn in tiles of this many rows and stored columns

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}

_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "num_key_value_heads": 8, "head_dim": 128,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
          "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645}

_QWEN3_5 = {"model_type": "qwen3_5_text", "vocab_size": 248320, "head_dim": 256, "linear_num_key_heads": 16,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
            "tie_word_embeddings": False, "attention_bias": False, "mtp_num_hidden_layers": 1}
_GPT_OSS = {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_experts_per_tok": 4,
            "sliding_window": 128, "attention_bias": True, "rms_norm_eps": 1e-5, "rope_theta": 150000,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096},
            "max_position_embeddings": 131072, "swiglu_limit": 7.0, "tie_word_embeddings": False,
            "eos_token_id": 200002, "pad_token_id": 199999,
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}

# Shapes from meta-llama/Llama-3.1-{8B,70B,405B}/config.json and Qwen/Qwen3-{8B,32B}/config.json, and as noted.
CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": _LLAMA31 | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32},
    "llama-3.1-70b": _LLAMA31 | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                 "num_attention_heads": 64},
    "llama-3.1-405b": _LLAMA31 | {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                                  "num_attention_heads": 128},
    "qwen3-8b": _QWEN3 | {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                          "num_attention_heads": 32},
    "qwen3-32b": _QWEN3 | {"hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                           "num_attention_heads": 64},
    # Qwen/Qwen3-30B-A3B/config.json: 128 experts of width 768, 8 per token, every layer sparse
    "qwen3-30b-a3b": _QWEN3 | {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                               "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                               "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                               "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # mistralai/Mixtral-8x7B-v0.1/config.json: 8 experts of width 14336, 2 per token
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                     "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False,
                     "bos_token_id": 1, "eos_token_id": 2},
    # openai/gpt-oss-20b/config.json and -120b's: sliding-window (128) and full layers in turn, 4 experts of width
    # 2880 per token in MXFP4, YaRN RoPE
    "gpt-oss-20b": _GPT_OSS | {"num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": _GPT_OSS | {"num_hidden_layers": 36, "num_local_experts": 128},
    # google/gemma-3-27b-it/config.json's text_config: 62 layers, every 6th full attention, the others a window of
    # 1024; one scale per rope base; no soft-capping
    "gemma-3-27b": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376,
                    "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
                    "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168, "sliding_window": 1024,
                    "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh",
                    "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
                    "bos_token_id": 2, "eos_token_id": [1, 106]},
    # Qwen/Qwen3.5-27B/config.json's text_config: 3 Gated DeltaNet layers to 1 full-attention layer, 16 linear key
    # heads with 3 value heads each, RoPE on a quarter of each head, one MTP layer
    "qwen3.5-27b": _QWEN3_5 | {"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64,
                               "num_attention_heads": 24, "num_key_value_heads": 4, "linear_num_value_heads": 48},
    # Qwen/Qwen3.5-35B-A3B/config.json's text_config: 256 experts of width 512, 8 per token, and a shared expert
    "qwen3.5-35b-a3b": _QWEN3_5 | {"model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40,
                                   "num_attention_heads": 16, "num_key_value_heads": 2, "linear_num_value_heads": 32,
                                   "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                                   "shared_expert_intermediate_size": 512},
    # Small but awkward on purpose: 4 KV groups split 2/1/1 over 3 ranks (and zero-width ranks beyond 4), 1408 MLP
    # columns = 22 blocks, a vocab of 1000 ending in a partial block, and llama3 RoPE scaling. No EOS: runs go on.
    "tiny": {"model_type": "llama", "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1408,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE | {"original_max_position_embeddings": 256},
             "max_position_embeddings": 4096, "tie_word_embeddings": False},
}


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def split_quant(model: str) -> tuple[str, str | None]:
    """`synthetic:NAME@w4a16` -> (`synthetic:NAME`, "w4a16"); no `@SCHEME` suffix -> (model, None)."""
    base, at, quant = model.rpartition("@")
    if not at or not is_synthetic(model):
        return model, None
    if quant not in QUANT_PRESETS:
        raise ValueError(f"unknown quantization {quant!r} in {model!r}: use {base}@"
                         f"{f', {base}@'.join(QUANT_PRESETS)}, or no @ for the model dtype")
    return base, quant


def synthetic_config(model: str) -> ModelConfig:
    """`synthetic:NAME` or `synthetic:PATH/config.json` (with an optional @SCHEME) -> its ModelConfig."""
    base, quant = split_quant(model)
    name = base.removeprefix(PREFIX)
    path = Path(name)
    if name in CONFIGS:
        config = ModelConfig.from_dict(CONFIGS[name])
    elif path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        config = ModelConfig.from_file(path)
    else:
        raise ValueError(f"unknown synthetic model {model!r}: use synthetic:{', synthetic:'.join(CONFIGS)} "
                         f"or synthetic:PATH/config.json")
    if quant:
        return dataclasses.replace(config, quant=quant_preset(quant))
    if config.quant is not None:  # a quantized checkpoint's config.json: drawn in its own method's tensors
        return dataclasses.replace(config, quant=config.quant.drawable())
    return config


def config_dict(name: str) -> dict:
    """The config.json-style dict of a named synthetic model (for writing one out)."""
    return json.loads(json.dumps(CONFIGS[name]))


class _Blocks:
    """Draws rows [start, stop) of a (size, width) tensor from per-block generators, on `device`."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator(device=device)

    def draw(self, name: str, index: int, shape: tuple[int, ...], mean: float = 0.0, std: float = SCALE,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """N(mean, std^2) in `dtype` (the model's by default); for int32 and int8, uniformly random values."""
        self.gen.manual_seed(SEED ^ zlib.crc32(f"{name}#{index}".encode()))
        if dtype in (torch.int32, torch.int8):
            bits = torch.iinfo(dtype).bits
            return torch.randint(-1 << (bits - 1), 1 << (bits - 1), shape, generator=self.gen, device=self.device,
                                 dtype=torch.int64).to(dtype)
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return t.mul_(std).add_(mean).to(dtype or self.dtype)

    def rows(self, name: str, size: int, block: int, span: range, width: int, **draw) -> torch.Tensor:
        """Rows `span` of the (size, width) tensor `name`, whose global blocks have `block` rows (`draw`: how
        values are drawn, see `draw`)."""
        if not span:
            return torch.empty((0, width), dtype=draw.get("dtype") or self.dtype, device=self.device)
        first, last = span.start // block, (span.stop - 1) // block
        parts = [self.draw(name, b, (min(block, size - b * block), width), **draw) for b in range(first, last + 1)]
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        lo = span.start - first * block
        return full[lo : lo + len(span)].contiguous() if (lo, len(span)) != (0, full.shape[0]) else full

    def tiles(self, name: str, shape: tuple[int, int], rows: range, cols: range | None, **draw) -> torch.Tensor:
        """Rows `rows` and columns `cols` (None: all) of the 2-D tensor `name`, drawn in TILE x TILE tiles."""
        cols = cols if cols is not None else range(shape[1])
        if not rows or not cols:
            return torch.empty((len(rows), len(cols)), dtype=draw.get("dtype") or self.dtype, device=self.device)
        r0, c0, per_row = rows.start // TILE, cols.start // TILE, -(-shape[1] // TILE)
        tile = lambda r, c: self.draw(name, r * per_row + c, (min(TILE, shape[0] - r * TILE),  # noqa: E731
                                                              min(TILE, shape[1] - c * TILE)), **draw)
        full = torch.cat([torch.cat([tile(r, c) for c in range(c0, (cols.stop - 1) // TILE + 1)], dim=1)
                          for r in range(r0, (rows.stop - 1) // TILE + 1)])
        r, c = rows.start - r0 * TILE, cols.start - c0 * TILE
        return full[r:r + len(rows), c:c + len(cols)].contiguous()


# Hugging Face tensor name -> the name its blocks are seeded from, for the tensors of the first synthetic layout
# (so that the same model draws the same weights as before); any other tensor is seeded from its own name
_SEED_NAMES = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head", "model.norm.weight": "final_norm"}
_LAYER_SEED_NAMES = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
                     "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
                     "mlp.down_proj.weight": "down"} | {
    f"self_attn.{x}_proj.{kind}": prefix + x for x in "qkv" for kind, prefix in (("weight", ""), ("bias", "b"))}


def _seed_name(name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        return f"layers.{m[1]}.{_LAYER_SEED_NAMES.get(m[2], m[2])}"
    return _SEED_NAMES.get(name, name)


class SyntheticReader:
    """The layers' WeightReader for a synthetic model: draws only the blocks that cover each slice.

    Attention tensors are cut in blocks of one head, the MLP and vocab in blocks of `BLOCK` rows. Row-parallel
    matrices (o_proj, down_proj, sliced by columns) are drawn as their transposes, so the blocks are rows there too.
    The tensors a quantized matrix's checkpoint method stores (`QuantConfig.stored_tensors`) are drawn in tiles
    instead, by what their values are: integers (packed words, zero points, int8 values) every value equally likely,
    float8 values N(0, 1), and scales that give the weights the same 0.02 spread (`WeightFormat.synthetic_scale`).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.head_dim, self.dtype, self.norm_mean = config.head_dim, dtype, 1.0 - config.norm_offset
        self.blocks = _Blocks(dtype, torch.device(device))
        # every stored tensor of a quantized matrix -> its values' dtype and the scale of its matrix's format
        self.stored = {name: (t.dtype, s.quant.format.synthetic_scale(SCALE))
                       for s in model_layout(config, whole_model(config)).slices() if s.quant is not None
                       for name, t in s.quant.stored_tensors(s.name, s.shape).items()}

    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        g = self.blocks
        # outside inference mode: a peer may hand these tensors to a torch module as parameters
        with torch.inference_mode(False), torch.no_grad():
            if s.name in self.stored:
                module, _, suffix = s.name.rpartition(".")
                t = self._stored(f"{_seed_name(module + '.weight')}.{suffix}", s, *self.stored[s.name])
                return t if stored else t.to(g.dtype)
            name = _seed_name(s.name)
            if s.stacked:  # every expert's matrix (experts, out, in) or bias (experts, out), each a tensor of its own
                matrix = len(s.shape) == 3
                drawn = [g.tiles(f"{name}.{e}", s.shape[1:] if matrix else (s.shape[1], 1), s.rows, s.cols)
                         for e in range(s.shape[0])]
                return torch.stack(drawn if matrix else [d.view(-1) for d in drawn])
            block = self.head_dim if ".self_attn." in s.name else BLOCK
            if len(s.shape) == 1:
                if s.split is None:  # a tensor every rank holds whole: a norm
                    return g.draw(name, 0, s.shape, mean=self.norm_mean)
                return g.rows(name, s.shape[0], block, s.rows, 1).view(-1)  # a q/k/v bias
            if s.cols is None:  # a matrix's rows, or a depthwise convolution's channels (channels, 1, taps)
                width = math.prod(s.shape[1:])
                return g.rows(name, s.shape[0], block, s.rows, width).view(len(s.rows), *s.shape[1:])
            assert len(s.rows) == s.shape[0], "row-parallel slices hold every output row"
            return g.rows(name, s.shape[1], block, s.cols, s.shape[0]).t().contiguous()

    def _stored(self, name: str, s: Slice, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """A block of one tensor a checkpoint stores for a quantized matrix, in its stored dtype; a stacked tensor's
        (experts, rows, cols, bytes...) expert by expert, each 2-D with its bytes in the columns."""
        g = self.blocks
        if s.stacked:
            inner = math.prod(s.shape[3:])  # bytes of one column of the slice (an MXFP4 group's 16)
            cols = s.cols if s.cols is not None else range(s.shape[2])
            expert = Slice(s.name, (s.shape[1], s.shape[2] * inner), s.rows, range(cols.start * inner,
                                                                                   cols.stop * inner))
            return torch.stack([self._stored(f"{name}.{e}", expert, dtype, scale).view(len(s.rows), len(cols),
                                                                                      *s.shape[3:])
                                for e in range(s.shape[0])])
        if dtype == torch.uint8:  # bytes of packed values: every value equally likely
            return g.tiles(name, s.shape, s.rows, s.cols, dtype=torch.int32).to(torch.uint8)
        if dtype == torch.float8_e8m0fnu:  # powers of two around the scale, as their bytes
            exponent = round(math.log2(scale)) + 127
            drawn = g.tiles(name, s.shape, s.rows, s.cols, dtype=torch.int32)
            return (exponent - 1 + torch.remainder(drawn, 3)).to(torch.uint8)
        if dtype in (torch.int32, torch.int8):  # every value (and zero point) equally likely
            return g.tiles(name, s.shape, s.rows, s.cols, dtype=dtype)
        if dtype == torch.float8_e4m3fn:
            return g.tiles(name, s.shape, s.rows, s.cols, std=1.0, dtype=torch.float32).to(dtype)
        return g.tiles(name, s.shape, s.rows, s.cols, mean=scale, std=scale / 8, dtype=torch.float32)
