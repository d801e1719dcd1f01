"""Convert a llama.cpp GGUF file into a Hugging Face model directory.

The one real chat model that installs without a model hub ships as a GGUF (see notes/smollm2.md), while
everything else in raytp reads the Hugging Face layout: `config.json`, `*.safetensors`, `tokenizer.json`,
`tokenizer_config.json`. Converting once at pull time keeps quantized blocks, llama.cpp tensor names and
its RoPE row order out of every loader. Weights are dequantized and stored as float32, which holds every
dequantized value exactly (a Q4_1 weight is a float16 scale times a 4-bit integer plus a float16 offset), so
the result is the GGUF's model bit for bit: `--dtype float32` reproduces transformers reading the GGUF itself.
Other dtypes round at load time, like any checkpoint.

Only what that file needs is supported -- architecture `llama`, a byte-level BPE (`gpt2`) tokenizer with
the `smollm` pre-tokenizer -- and anything else fails with the value found rather than converting wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, Keys, MODEL_TENSOR, TENSOR_NAMES, TokenType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

# GGUF tensor kind -> Hugging Face name; per-layer names take the block index.
_GLOBAL_TENSORS = {
    MODEL_TENSOR.TOKEN_EMBD: "model.embed_tokens.weight",
    MODEL_TENSOR.OUTPUT_NORM: "model.norm.weight",
    MODEL_TENSOR.OUTPUT: "lm_head.weight",  # absent when the embeddings are tied
}
_LAYER_TENSORS = {
    MODEL_TENSOR.ATTN_NORM: "model.layers.{bid}.input_layernorm.weight",
    MODEL_TENSOR.ATTN_Q: "model.layers.{bid}.self_attn.q_proj.weight",
    MODEL_TENSOR.ATTN_K: "model.layers.{bid}.self_attn.k_proj.weight",
    MODEL_TENSOR.ATTN_V: "model.layers.{bid}.self_attn.v_proj.weight",
    MODEL_TENSOR.ATTN_OUT: "model.layers.{bid}.self_attn.o_proj.weight",
    MODEL_TENSOR.FFN_NORM: "model.layers.{bid}.post_attention_layernorm.weight",
    MODEL_TENSOR.FFN_GATE: "model.layers.{bid}.mlp.gate_proj.weight",
    MODEL_TENSOR.FFN_UP: "model.layers.{bid}.mlp.up_proj.weight",
    MODEL_TENSOR.FFN_DOWN: "model.layers.{bid}.mlp.down_proj.weight",
}


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "smollm" applies the regex \p{N} first, then the GPT-2 regex: every digit stands alone
    # even when whitespace precedes it ("  42" -> "  ", "4", "2"), as in SmolLM2's own tokenizer.json.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


# tokenizer.ggml.pre -> how the text is split before BPE. Each entry must be checked against the model's
# own tokenizer, so unknown values are refused instead of guessed.
_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> None:
    """Write config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json to `out_dir`.

    `out_dir` is created if needed; callers wanting atomicity pass a temporary directory and rename it.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    config = _config(meta, gguf_path)
    tensors = _tensors(reader, config, progress, desc=f"converting {gguf_path.name}")
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _tokenizer(meta, gguf_path).save(str(out_dir / "tokenizer.json"))
    tokenizer_config = _tokenizer_config(meta, config)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


_REQUIRED = object()  # sentinel: the metadata key has no default


def _required(meta: dict, key: str, gguf_path: Path):
    if key not in meta:
        raise ValueError(f"{gguf_path} has no metadata key {key!r}; it is not a complete llama GGUF")
    return meta[key]


def _f32(value: float) -> float:
    """GGUF stores floats as float32; print the shortest decimal that rounds to it (1e-05, not 9.99...e-06)."""
    return float(str(np.float32(value)))


def _config(meta: dict, gguf_path: Path) -> dict:
    arch = _required(meta, Keys.General.ARCHITECTURE, gguf_path)
    if arch != "llama":
        raise ValueError(f"{gguf_path} has architecture {arch!r}; only 'llama' GGUF files can be converted")

    def get(template: str, default=_REQUIRED):
        """Read `{arch}.`-prefixed metadata; without a default, a missing key is an error."""
        key = template.format(arch=arch)
        return _required(meta, key, gguf_path) if default is _REQUIRED else meta.get(key, default)

    scaling = get(Keys.Rope.SCALING_TYPE, "none")
    if scaling != "none":
        raise ValueError(f"{gguf_path} uses RoPE scaling {scaling!r}; only unscaled RoPE GGUF files can be converted")
    hidden = get(Keys.LLM.EMBEDDING_LENGTH)
    n_heads = get(Keys.Attention.HEAD_COUNT)
    head_dim = get(Keys.Attention.KEY_LENGTH, hidden // n_heads)
    rotary_dim = get(Keys.Rope.DIMENSION_COUNT, head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{gguf_path} rotates {rotary_dim} of {head_dim} head dims; partial RoPE is not supported")

    tokens = _required(meta, Keys.Tokenizer.LIST, gguf_path)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": get(Keys.LLM.VOCAB_SIZE, len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": get(Keys.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": get(Keys.LLM.BLOCK_COUNT),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get(Keys.Attention.HEAD_COUNT_KV, n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get(Keys.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": _f32(get(Keys.Rope.FREQ_BASE, 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": get(Keys.LLM.CONTEXT_LENGTH),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get(Keys.Tokenizer.BOS_ID),
        "eos_token_id": meta.get(Keys.Tokenizer.EOS_ID),
        "pad_token_id": meta.get(Keys.Tokenizer.PAD_ID),
        "torch_dtype": "float32",
    }


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves for its RoPE kernel,
    Hugging Face keeps them as [first half; second half] (rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensors(reader: GGUFReader, config: dict, progress: bool, desc: str) -> dict[str, torch.Tensor]:
    names = {TENSOR_NAMES[kind] + ".weight": hf for kind, hf in _GLOBAL_TENSORS.items()}
    for bid in range(config["num_hidden_layers"]):
        names |= {
            TENSOR_NAMES[kind].format(bid=bid) + ".weight": hf.format(bid=bid) for kind, hf in _LAYER_TENSORS.items()
        }
    unknown = sorted(t.name for t in reader.tensors if t.name not in names)
    if unknown:
        raise ValueError(f"GGUF has tensors raytp cannot map to a llama model: {unknown[:5]} ({len(unknown)} in all)")
    heads = {MODEL_TENSOR.ATTN_Q: config["num_attention_heads"], MODEL_TENSOR.ATTN_K: config["num_key_value_heads"]}
    permuted = {
        TENSOR_NAMES[kind].format(bid=bid) + ".weight": n
        for kind, n in heads.items()
        for bid in range(config["num_hidden_layers"])
    }

    tensors = {}
    for t in tqdm(reader.tensors, desc=desc, unit="tensor", disable=not progress):
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if t.name in permuted:
            w = _unpermute(w, permuted[t.name])
        tensors[names[t.name]] = torch.from_numpy(np.array(w, dtype=np.float32))

    missing = sorted(set(names.values()) - set(tensors) - {"lm_head.weight"})
    if missing:
        raise ValueError(f"GGUF lacks tensors a llama model needs: {missing[:5]} ({len(missing)} in all)")
    return tensors


def _tokenizer(meta: dict, gguf_path: Path) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary and merges, with its control tokens as special tokens."""
    kind = meta.get(Keys.Tokenizer.MODEL)
    pre = meta.get(Keys.Tokenizer.PRE)
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{gguf_path} has tokenizer model {kind!r} with pre-tokenizer {pre!r}; raytp converts model 'gpt2' "
            f"with pre-tokenizer {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = _required(meta, Keys.Tokenizer.LIST, gguf_path)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{gguf_path} vocabulary repeats {len(tokens) - len(vocab)} token strings")
    merges = [tuple(merge.split(" ")) for merge in _required(meta, Keys.Tokenizer.MERGES, gguf_path)]

    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = _required(meta, Keys.Tokenizer.TOKEN_TYPE, gguf_path)
    # Control tokens (<|im_start|>, ...) must match whole in raw text and be skippable when decoding.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TokenType.CONTROL]
    )
    return tokenizer


def _tokenizer_config(meta: dict, config: dict) -> dict:
    tokens = meta[Keys.Tokenizer.LIST]
    special = {
        name: tokens[meta[key]]
        for name, key in (
            ("bos_token", Keys.Tokenizer.BOS_ID),
            ("eos_token", Keys.Tokenizer.EOS_ID),
            ("unk_token", Keys.Tokenizer.UNK_ID),
            ("pad_token", Keys.Tokenizer.PAD_ID),
        )
        if key in meta
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": meta.get(Keys.Tokenizer.ADD_BOS, False),
        "model_max_length": config["max_position_embeddings"],
    }
    if Keys.Tokenizer.CHAT_TEMPLATE in meta:
        tokenizer_config["chat_template"] = meta[Keys.Tokenizer.CHAT_TEMPLATE]
    return tokenizer_config
