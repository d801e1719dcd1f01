"""Synthetic models: a real config's shapes with random weights made on each rank, no checkpoint, no disk.

    synthetic:llama-3.1-8b | synthetic:llama-3.1-70b | synthetic:llama-3.1-405b   the published HF configs
    synthetic:tiny                                                               a small config for tests
    synthetic:PATH/config.json                                                   any supported config.json
    synthetic:NAME@w4a16 | @w8a16 | @fp8          the attention and MLP matrices quantized (plan.QUANT_SCHEMES)

Every weight is cut into fixed global blocks (one head of q/k/v/o, `BLOCK` rows of the MLP and the vocab) and
each block is drawn from its own generator, seeded from (tensor name, block index). A rank draws only the blocks
that cover its slices, on its own device, so the concatenation over ranks is exactly a one-rank model's weights
whatever the split. Values depend on the device type (CPU and CUDA generators differ): compare splits on one kind
of device. Weights are N(0, 0.02^2), norms 1 + N(0, 0.02^2), so activations stay in range at any depth.

Quantized, a matrix is drawn directly in its stored layout, in the same blocks: random packed words (every value
equally likely) with scales that give the weights the same 0.02 spread, or FP8 values N(0, 1) with a per-row scale
near 0.02. Scales are drawn in blocks of whole groups, so a row-parallel slice that starts mid-group (an MLP block
of 64 columns in groups of 128) gets its groups' scales and an IntWeight.group_start.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

from raytp.model.config import ModelConfig
from raytp.model.formats import FP8Weight, IntWeight
from raytp.model.layout import Slice
from raytp.parallel.plan import QUANT_SCHEMES, QuantScheme

PREFIX = "synthetic:"
BLOCK = 64  # MLP columns and vocab rows are drawn in blocks of this many (the last may be partial)
SCALE = 0.02
SEED = 20261121
GROUP_BLOCK = 8  # quantization groups per block of drawn scales

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}

# Shapes from meta-llama/Llama-3.1-{8B,70B,405B}/config.json.
CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": _LLAMA31 | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32},
    "llama-3.1-70b": _LLAMA31 | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                 "num_attention_heads": 64},
    "llama-3.1-405b": _LLAMA31 | {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                                  "num_attention_heads": 128},
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
    if quant not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantization {quant!r} in {model!r}: use {base}@"
                         f"{f', {base}@'.join(QUANT_SCHEMES)}, or no @ for the model dtype")
    return base, quant


def synthetic_config(model: str) -> ModelConfig:
    """`synthetic:NAME` or `synthetic:PATH/config.json` (with an optional @SCHEME) -> its ModelConfig."""
    name = split_quant(model)[0].removeprefix(PREFIX)
    if name in CONFIGS:
        return ModelConfig.from_dict(CONFIGS[name])
    path = Path(name)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return ModelConfig.from_file(path)
    raise ValueError(f"unknown synthetic model {model!r}: use synthetic:{', synthetic:'.join(CONFIGS)} "
                     f"or synthetic:PATH/config.json")


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
        """N(mean, std^2) in `dtype` (the model's by default); for int32, uniformly random words."""
        self.gen.manual_seed(SEED ^ zlib.crc32(f"{name}#{index}".encode()))
        if dtype == torch.int32:
            return torch.randint(-1 << 31, 1 << 31, shape, generator=self.gen, device=self.device,
                                 dtype=torch.int64).int()
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


# Hugging Face tensor name -> the name its blocks are seeded from (kept from the first synthetic layout, so that
# the same model draws the same weights as before)
_SEED_NAMES = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head", "model.norm.weight": "final_norm"}
_LAYER_SEED_NAMES = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
                     "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
                     "mlp.down_proj.weight": "down"} | {
    f"self_attn.{x}_proj.{kind}": prefix + x for x in "qkv" for kind, prefix in (("weight", ""), ("bias", "b"))}


def _seed_name(name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return f"layers.{m[1]}.{_LAYER_SEED_NAMES[m[2]]}" if m else _SEED_NAMES[name]


class SyntheticReader:
    """The layers' WeightReader for a synthetic model: draws only the blocks that cover each slice.

    Attention tensors are cut in blocks of one head, the MLP and vocab in blocks of `BLOCK` rows. Row-parallel
    matrices (o_proj, down_proj, sliced by columns) are drawn as their transposes, so the blocks are rows there too.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, quant: str | None = None):
        self.head_dim = config.head_dim
        self.blocks = _Blocks(dtype, torch.device(device))
        self.quant = QUANT_SCHEMES[quant] if quant else None

    def read(self, s: Slice) -> torch.Tensor | IntWeight | FP8Weight:
        name, g = _seed_name(s.name), self.blocks
        block = self.head_dim if ".self_attn." in s.name else BLOCK
        # outside inference mode: a peer may hand these tensors to a torch module as parameters
        with torch.inference_mode(False), torch.no_grad():
            if self.quant and s.name.endswith("_proj.weight"):
                return _quantized(g, name, s, block, self.quant)
            if len(s.shape) == 1:
                if name.endswith("norm"):
                    return g.draw(name, 0, s.shape, mean=1.0)
                return g.rows(name, s.shape[0], block, s.rows, 1).view(-1)  # a q/k/v bias
            if s.cols is None:
                return g.rows(name, s.shape[0], block, s.rows, s.shape[1])
            assert len(s.rows) == s.shape[0], "row-parallel slices hold every output row"
            return g.rows(name, s.shape[1], block, s.cols, s.shape[0]).t().contiguous()


def _quantized(g: _Blocks, name: str, s: Slice, block: int, scheme: QuantScheme) -> IntWeight | FP8Weight:
    """Slice `s` of a matrix drawn in `scheme`'s stored layout: column-parallel slices (all inputs) in blocks of
    output rows, row-parallel ones (all outputs) in blocks of input columns, like the dense weights."""
    out_features, in_features = s.shape
    cols = s.cols if s.cols is not None else range(in_features)
    if scheme.float8:
        scale = g.rows(name + ".scale", out_features, block, s.rows, 1, mean=SCALE, std=SCALE / 8,
                       dtype=torch.float32)
        if s.cols is None:
            return FP8Weight(g.rows(name, out_features, block, s.rows, in_features, std=1.0,
                                    dtype=torch.float32).to(torch.float8_e4m3fn), scale)
        values = g.rows(name, in_features, block, cols, out_features, std=1.0, dtype=torch.float32)
        return FP8Weight(values.t().contiguous().to(torch.float8_e4m3fn), scale)
    per = 32 // scheme.bits
    group_size = scheme.group_size or in_features
    n_groups = -(-in_features // group_size)
    # uniform values in [0, 2**bits) minus the midpoint have standard deviation ~2**bits / sqrt(12)
    step = SCALE * 12 ** 0.5 / (1 << scheme.bits)
    draw_scales = dict(mean=step, std=step / 8)
    if s.cols is None:
        packed = g.rows(name + ".packed", out_features, block, s.rows, in_features // per, dtype=torch.int32)
        scales = g.rows(name + ".scales", out_features, block, s.rows, n_groups, **draw_scales)
        return IntWeight(packed, scales, None, scheme.bits, group_size)
    if block % per or cols.start % per or cols.stop % per:
        raise ValueError(f"{s.name}: input columns [{cols.start}, {cols.stop}) in blocks of {block} do not fall "
                         f"on the {per}-value words of {scheme.name}")
    words = range(cols.start // per, cols.stop // per)
    packed = g.rows(name + ".packed", in_features // per, block // per, words, out_features, dtype=torch.int32)
    groups = range(cols.start // group_size, -(-cols.stop // group_size)) if cols else range(0)
    scales = g.rows(name + ".scales", n_groups, GROUP_BLOCK, groups, out_features, **draw_scales)
    return IntWeight(packed.t().contiguous(), scales.t().contiguous(), None, scheme.bits, group_size,
                     group_start=cols.start - groups.start * group_size if cols else 0)
