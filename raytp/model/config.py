"""Model configuration, read from a Hugging Face `config.json`.

Only decoder-only Llama-family models are supported: they share one forward (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) and differ in what `raytp.model.architecture` declares for each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from raytp.model.architecture import ARCHITECTURES, Architecture


class ConfigError(ValueError):
    """A config.json that cannot be read; the message names the file and where it breaks."""


class UnsupportedModelError(ConfigError):
    """The config describes a model raytp cannot run."""


# What `QuantConfig` reads, said in every refusal
SUPPORTED_QUANTIZATION = ("compressed-tensors checkpoints (llmcompressor) quantizing the Linear layers, "
                          "weight-only: pack-quantized int4/int8 with group or channel scales, symmetric or with "
                          "zero points, act-order group or none (W4A16, W8A16), or float8 e4m3 weights with "
                          "channel or tensor scales (FP8); or with activations quantized per token at run time "
                          "(dynamic, symmetric, 8 bits: FP8_DYNAMIC and W8A8), float8 e4m3 weights or int8 "
                          "weights (int-quantized) with channel scales; GPTQ checkpoints (GPTQModel/AutoGPTQ, "
                          "quant_method 'gptq', formats gptq and gptq_v2): 4 or 8 bits, desc_act true or false; "
                          "AWQ checkpoints (AutoAWQ, quant_method 'awq'): 4 bits with zero points, version 'gemm'; "
                          "fine-grained FP8 checkpoints (quant_method 'fp8', e4m3 weights with weight_block_size "
                          "scales, as Qwen and DeepSeek publish them), run weight-only")


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder's Linear layers, from config.json's `quantization_config`.

    Embeddings, norms and the (tied or separate) lm_head stay dense; so does any Linear named in `ignore`.
    """

    kind: str  # "int": integers packed 32 // bits to an int32 word along the input; "fp8": float8 e4m3 weights
    bits: int  # 4 or 8 ("int"); 8 ("fp8")
    group_size: int | None  # input columns sharing one scale; None: one scale per output row (or per tensor)
    per_tensor: bool = False  # fp8 only: one scale for the whole matrix
    block_rows: int | None = None  # fp8 only: output rows sharing one scale (with group_size: block scales)
    symmetric: bool = True  # False: an integer zero point per scale
    act_order: bool = False  # the checkpoint gives every input column its group (weight_g_idx, GPTQ's g_idx)
    ignore: tuple[str, ...] = ()  # Linear module names (or "re:" patterns) left dense
    layout: str = "compressed-tensors"  # how the tensors are stored: "compressed-tensors", "gptq", "awq" or
    # "fp8-blocks" (transformers' fine-grained FP8)
    zero_offset: int = 0  # added to every stored zero point: 1 for AutoGPTQ's "gptq" format, which stores zero - 1
    # Activations quantized at run time too, per token, to the weights' 8-bit type (FP8_DYNAMIC: e4m3; W8A8: int8,
    # its weights stored unpacked [out, in] in compressed-tensors' int-quantized format), with channel scales
    dynamic_activations: bool = False

    def quantizes(self, module: str) -> bool:
        """Whether the Linear `module` ("model.layers.0.mlp.down_proj") is stored quantized."""
        return not any(re.fullmatch(p[3:], module) if p.startswith("re:") else p == module for p in self.ignore)

    def describe(self) -> str:
        if self.dynamic_activations:
            name, kind = ("fp8-dynamic", "fp8 e4m3") if self.kind == "fp8" else ("w8a8", "int8")
            return f"{name}: {kind} weights, per-channel scales, activations quantized to {kind} per token at run time"
        if self.kind == "fp8":
            if self.block_rows:
                return f"fp8 e4m3 weights, {self.block_rows}x{self.group_size} block scales"
            return f"fp8 e4m3 weights, {'per-tensor' if self.per_tensor else 'per-channel'} scales"
        scales = f"groups of {self.group_size}" if self.group_size else "per-channel scales"
        return (f"w{self.bits}a16 int, {scales}, {'symmetric' if self.symmetric else 'zero points'}"
                + (", act-order" if self.act_order else "")
                + (f", {self.layout.upper()} layout" if self.layout != "compressed-tensors" else ""))

    @classmethod
    def from_dict(cls, q: dict) -> QuantConfig:
        method = q.get("quant_method")
        if method == "gptq":
            return cls._from_gptq(q)
        if method == "awq":
            return cls._from_awq(q)
        if method == "fp8":
            return cls._from_fp8_blocks(q)
        if method != "compressed-tensors":
            raise UnsupportedModelError(f"unsupported quantization quant_method={method!r}; raytp reads "
                                        f"{SUPPORTED_QUANTIZATION}")
        groups = q.get("config_groups") or {}

        def refuse(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(f"unsupported compressed-tensors quantization: {what}; raytp reads "
                                         f"{SUPPORTED_QUANTIZATION}")

        if len(groups) != 1:
            raise refuse(f"{len(groups)} config_groups (raytp reads exactly one)")
        group = next(iter(groups.values()))
        w = group.get("weights") or {}
        if group.get("targets") != ["Linear"]:
            raise refuse(f"targets={group.get('targets')} (raytp reads ['Linear'])")
        if group.get("output_activations"):
            raise refuse("output_activations are quantized (raytp quantizes weights, and activations only at the "
                         "inputs of the Linear layers)")
        dynamic = cls._dynamic_activations(group.get("input_activations"), w, refuse)
        for what in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if q.get(what):
                raise refuse(f"{what}={q[what]}")
        fmt = group.get("format") or q.get("format")
        kind, bits, strategy, actorder = w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("actorder")
        ignore = tuple(q.get("ignore") or ())
        if dynamic:
            if not ((kind, fmt) in (("float", "float-quantized"), ("int", "int-quantized")) and bits == 8
                    and strategy == "channel" and w.get("symmetric", True)):
                raise refuse(f"format={fmt!r} with {kind} {bits}-bit weights, strategy={strategy!r}, and quantized "
                             f"activations (raytp reads them with float-quantized or int-quantized 8-bit symmetric "
                             f"weights, strategy channel)")
            config = cls("fp8" if kind == "float" else "int", 8, None, ignore=ignore, dynamic_activations=True)
        elif kind == "int" and fmt == "pack-quantized" and bits in (4, 8) and strategy in ("group", "channel"):
            if actorder not in (None, "static", "weight", "group", "dynamic"):
                raise refuse(f"actorder={actorder!r}")
            config = cls("int", bits, w.get("group_size") if strategy == "group" else None,
                         symmetric=bool(w.get("symmetric", True)), act_order=actorder in ("group", "dynamic"),
                         ignore=ignore)
            if strategy == "group" and not (isinstance(config.group_size, int) and config.group_size > 0):
                raise refuse(f"group strategy with group_size={w.get('group_size')!r}")
        elif (kind == "float" and fmt in ("float-quantized", "naive-quantized") and bits == 8
              and strategy in ("channel", "tensor") and w.get("symmetric", True)):
            config = cls("fp8", 8, None, per_tensor=strategy == "tensor", ignore=ignore)
        else:
            raise refuse(f"format={fmt!r} with {kind} {bits}-bit weights, strategy={strategy!r}")
        if config.quantizes("lm_head"):
            raise refuse("lm_head is quantized (raytp keeps it dense: add it to ignore)")
        return config

    @staticmethod
    def _dynamic_activations(a: dict | None, w: dict, refuse) -> bool:
        """Whether `input_activations` are quantized at run time in the one way raytp runs: per token, symmetric,
        8 bits of the weights' type (what llmcompressor's FP8_DYNAMIC and W8A8 write)."""
        if not a:
            return False
        what = {"dynamic": True, "strategy": "token", "symmetric": True, "num_bits": 8, "type": w.get("type")}
        defaults = {"symmetric": True, "num_bits": 8, "type": "int"}  # compressed-tensors' QuantizationArgs'
        given = {k: a.get(k, defaults.get(k)) for k in what}
        wrong = {k: v for k, v in given.items() if v != what[k]}
        if wrong:
            raise refuse(f"input_activations with {', '.join(f'{k}={v!r}' for k, v in wrong.items())} (raytp "
                         f"quantizes activations dynamically per token, symmetric, 8 bits of the weights' type; "
                         f"static or calibrated activation scales are not read)")
        return True

    @classmethod
    def _from_gptq(cls, q: dict) -> QuantConfig:
        """GPTQModel/AutoGPTQ: every decoder Linear quantized (lm_head too where `lm_head` is true: refused)."""
        bits, group_size, fmt = q.get("bits", 4), q.get("group_size", 128), q.get("checkpoint_format", "gptq")
        what = None
        if bits not in (4, 8):
            what = f"bits={bits}"
        elif fmt not in ("gptq", "gptq_v2"):
            what = f"checkpoint_format={fmt!r} (re-save the model with GPTQModel as gptq or gptq_v2)"
        elif q.get("pack_dtype", "int32") != "int32":
            what = f"pack_dtype={q['pack_dtype']!r}"
        elif q.get("lm_head"):
            what = "a quantized lm_head"
        elif q.get("dynamic"):
            what = "per-module `dynamic` overrides"
        elif not (group_size == -1 or isinstance(group_size, int) and group_size > 0):
            what = f"group_size={group_size!r}"
        if what:
            raise UnsupportedModelError(f"unsupported GPTQ quantization: {what}; raytp reads {SUPPORTED_QUANTIZATION}")
        return cls("int", bits, None if group_size == -1 else group_size, symmetric=bool(q.get("sym", True)),
                   act_order=bool(q.get("desc_act", False)) and group_size != -1, layout="gptq",
                   zero_offset=int(fmt == "gptq"))

    @classmethod
    def _from_fp8_blocks(cls, q: dict) -> QuantConfig:
        """transformers' fine-grained FP8 (Qwen3-*-FP8, DeepSeek-V3): e4m3 weights, one float scale
        (`weight_scale_inv`, what the weight is multiplied by) per block of rows x columns. Their config quantizes
        activations per token and group at run time ("dynamic"); raytp leaves them in the model dtype, as
        transformers does where it dequantizes the weights (CPUs), a little more accurate. `modules_to_not_convert`
        names modules left dense."""
        block, scheme, fmt = q.get("weight_block_size"), q.get("activation_scheme", "dynamic"), q.get("fmt", "e4m3")
        what = None
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            what = f"weight_block_size={block!r} (raytp reads two positive ints: rows, columns)"
        elif fmt != "e4m3":
            what = f"fmt={fmt!r}"
        elif scheme != "dynamic":
            what = f"activation_scheme={scheme!r} (static activation scales are not read)"
        if what:
            raise UnsupportedModelError(f"unsupported fp8 quantization: {what}; raytp reads {SUPPORTED_QUANTIZATION}")
        ignore = tuple(f"re:.*{re.escape(m)}.*" for m in q.get("modules_to_not_convert") or ())
        return cls("fp8", 8, block[1], block_rows=block[0], ignore=ignore, layout="fp8-blocks")

    @classmethod
    def _from_awq(cls, q: dict) -> QuantConfig:
        """AutoAWQ's GEMM layout: 4 bits with zero points; `modules_to_not_convert` names modules left dense."""
        bits, version = q.get("bits", q.get("w_bit", 4)), str(q.get("version", "gemm")).lower()
        group_size = q.get("group_size", q.get("q_group_size", 128))
        if bits != 4 or version != "gemm" or not q.get("zero_point", True) or not (
                isinstance(group_size, int) and group_size > 0):
            raise UnsupportedModelError(f"unsupported AWQ quantization: bits={bits} version={version!r} "
                                        f"zero_point={q.get('zero_point', True)} group_size={group_size!r}; raytp "
                                        f"reads {SUPPORTED_QUANTIZATION}")
        # AutoAWQ skips every module whose name contains one of these
        ignore = tuple(f"re:.*{re.escape(m)}.*" for m in q.get("modules_to_not_convert") or ())
        return cls("int", 4, group_size, symmetric=False, ignore=ignore, layout="awq")


# The quantizations a synthetic model takes (`synthetic:NAME@w4a16`, `--quant`), as llmcompressor's presets of the
# same names: int4 symmetric in groups of 128, int8 symmetric with one scale per output row, float8 e4m3 weights with
# one scale per output row (fp8-blocks: per block of 128 x 128, as Qwen's FP8 checkpoints); fp8-dynamic
# (FP8_DYNAMIC) and w8a8 (W8A8) the same 8-bit weights with activations quantized per token at run time. The planner
# counts them like the same quantization read from a checkpoint.
QUANT_PRESETS = {"w4a16": QuantConfig("int", 4, 128), "w8a16": QuantConfig("int", 8, None),
                 "fp8": QuantConfig("fp8", 8, None),
                 "fp8-blocks": QuantConfig("fp8", 8, 128, block_rows=128, layout="fp8-blocks"),
                 "fp8-dynamic": QuantConfig("fp8", 8, None, dynamic_activations=True),
                 "w8a8": QuantConfig("int", 8, None, dynamic_activations=True)}
NO_QUANT = "none"  # `raytp bench --quant none`: every weight in the model dtype


def quant_name(quant: QuantConfig | None) -> str:
    """What results call a model's quantization: NO_QUANT, a preset's name, or else (a checkpoint's own) its
    description, so that a row never claims a preset it does not match."""
    if quant is None:
        return NO_QUANT
    return next((name for name, preset in QUANT_PRESETS.items() if preset == quant), quant.describe())


@dataclass(frozen=True)
class MoeConfig:
    """The mixture of experts that replaces every layer's dense MLP (an architecture that declares `experts`)."""

    num_experts: int
    top_k: int  # experts each token is routed to (num_experts_per_tok)
    expert_size: int  # one expert's SwiGLU inner width: the columns the ranks split, the same range of every expert
    normalize: bool  # the top-k routing weights renormalized to sum to 1 (Mixtral always, Qwen3-MoE: norm_topk_prob)

    @classmethod
    def from_dict(cls, d: dict, arch: Architecture) -> MoeConfig:
        names = arch.experts
        sparse_step, dense_layers = d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
        if sparse_step != 1 or dense_layers:  # Qwen3-MoE can interleave dense MLP layers; no published model does
            raise UnsupportedModelError(f"decoder_sparse_step={sparse_step}, mlp_only_layers={dense_layers}: raytp "
                                        f"runs {arch.model_type} models whose every layer is a mixture of experts "
                                        f"(decoder_sparse_step 1, no mlp_only_layers)")
        count_key = next((k for k in names.count_keys if k in d), names.count_keys[0])
        moe = cls(d[count_key], d["num_experts_per_tok"], d[names.width_key],
                  bool(d[names.normalize_key]) if names.normalize_key else True)
        if not 0 < moe.top_k <= moe.num_experts:
            raise UnsupportedModelError(f"num_experts_per_tok={moe.top_k} with {count_key}={moe.num_experts}: each "
                                        f"token needs between 1 and {moe.num_experts} experts")
        return moe


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # config.json's model_type, a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's SwiGLU inner width; 0 in a mixture of experts (see `moe`)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; each serves num_heads // num_kv_heads query heads
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3-style frequency scaling, as in config.json ({"rope_type": "llama3", "factor": ...}) or None
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (always with Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quant: QuantConfig | None = None  # quantized Linear weights, or None: every weight in the model dtype
    moe: MoeConfig | None = None  # experts in place of every layer's dense MLP, or None

    def __post_init__(self):
        if self.moe is not None and self.quant is not None and self.quant.dynamic_activations:
            # here, not in from_dict: synthetic presets add quant. An expert's down_proj input is split over the
            # ranks, so its per-token activation scale would need an exchange per expert and layer
            raise UnsupportedModelError(f"{self.arch} with activations quantized at run time ({self.quant.describe()})"
                                        f": raytp runs quantized experts with 16-bit activations (w4a16, w8a16, "
                                        f"GPTQ, AWQ, fp8 weights); use one of those checkpoints")

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.architecture.qkv_bias

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = d.get("model_type")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={arch!r} (architectures={d.get('architectures')}); "
                f"raytp runs {', '.join(sorted(ARCHITECTURES))}"
            )
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        # transformers >= 5 writes "rope_parameters" (rope_theta inside); older configs "rope_scaling"
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_theta = (rope or {}).get("rope_theta", d.get("rope_theta", 10000.0))
        rope_scaling = rope
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise UnsupportedModelError(
                    f"unsupported rope_scaling type {kind!r}; raytp supports 'llama3' scaling or none"
                )
            rope_scaling = None if kind in ("default", None) else dict(rope_scaling)
        moe = MoeConfig.from_dict(d, ARCHITECTURES[arch]) if ARCHITECTURES[arch].experts else None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=0 if moe else d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quant=QuantConfig.from_dict(d["quantization_config"]) if d.get("quantization_config") else None,
            moe=moe,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix it or "
                              f"download the model again") from None
        try:
            return cls.from_dict(d)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{path}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a Llama-family config.json: {e} is missing or malformed") from None
