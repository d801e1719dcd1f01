"""Loads one rank's slices of a Hugging Face safetensors checkpoint, and nothing else.

Every tensor is read with `safe_open(...).get_slice(name)[rows/cols]`, so a rank reads only the bytes of
its own shard from disk and no process ever holds the whole model. Slices are fused into the layout
`raytp.model.llama.ShardedLlama` expects (q/k/v in one matrix, gate/up in one matrix).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from raytp.model.config import ModelConfig
from raytp.parallel.plan import RankShard


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor the model needs, or has one of the wrong shape."""


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single model.safetensors or a sharded index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir} (raytp never unpickles .bin/.pt files)")
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            names.update((n, f) for n in h.keys())
    return names


class _Reader:
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device, stack: ExitStack):
        self.files = _tensor_files(model_dir)
        self.dtype, self.device = dtype, device
        self.handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(self.files.values())}

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, shape: tuple[int, ...], rows: slice = slice(None), cols: slice | None = None):
        """Read rows (and optionally cols) of tensor `name`, checking its full shape first."""
        if name not in self.files:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        sl = self.handles[self.files[name]].get_slice(name)
        if tuple(sl.get_shape()) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(sl.get_shape())}, config implies {shape}")
        t = sl[rows] if cols is None else sl[rows, cols]
        return t.to(self.device, self.dtype)


def _heads(r: range, head_dim: int) -> slice:
    return slice(r.start * head_dim, r.stop * head_dim)


def load_shard(model_dir: str | Path, config: ModelConfig, shard: RankShard, *, dtype: torch.dtype,
               device: torch.device | str = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """Read rank `shard`'s weights from `model_dir` in `dtype` onto `device`."""
    c, D = config, config.head_dim
    H, V, I = c.hidden_size, c.vocab_size, c.intermediate_size
    q_rows, kv_rows = _heads(shard.q_heads, D), _heads(shard.kv_heads, D)
    cols = slice(shard.mlp_cols.start, shard.mlp_cols.stop)
    vocab = slice(shard.vocab_rows.start, shard.vocab_rows.stop)
    w: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        r = _Reader(Path(model_dir), dtype, torch.device(device), stack)
        w["embed"] = r.read("model.embed_tokens.weight", (V, H), vocab)
        if c.tie_word_embeddings or not r.has("lm_head.weight"):
            w["lm_head"] = w["embed"]
        else:
            w["lm_head"] = r.read("lm_head.weight", (V, H), vocab)
        w["final_norm"] = r.read("model.norm.weight", (H,))
        layers = range(c.num_layers)
        for i in tqdm(layers, desc=f"rank {shard.rank} loading", unit="layer", disable=not progress, leave=False):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            w[f"layers.{i}.attn_norm"] = r.read(p + "input_layernorm.weight", (H,))
            w[f"layers.{i}.mlp_norm"] = r.read(p + "post_attention_layernorm.weight", (H,))
            w[f"layers.{i}.wqkv"] = torch.cat([
                r.read(a + "q_proj.weight", (c.num_heads * D, H), q_rows),
                r.read(a + "k_proj.weight", (c.num_kv_heads * D, H), kv_rows),
                r.read(a + "v_proj.weight", (c.num_kv_heads * D, H), kv_rows),
            ])
            if c.attention_bias:
                w[f"layers.{i}.bqkv"] = torch.cat([
                    r.read(a + "q_proj.bias", (c.num_heads * D,), q_rows),
                    r.read(a + "k_proj.bias", (c.num_kv_heads * D,), kv_rows),
                    r.read(a + "v_proj.bias", (c.num_kv_heads * D,), kv_rows),
                ])
            w[f"layers.{i}.wo"] = r.read(a + "o_proj.weight", (H, c.num_heads * D), slice(None), q_rows)
            m = p + "mlp."
            w[f"layers.{i}.w_gate_up"] = torch.cat([
                r.read(m + "gate_proj.weight", (I, H), cols),
                r.read(m + "up_proj.weight", (I, H), cols),
            ])
            w[f"layers.{i}.w_down"] = r.read(m + "down_proj.weight", (H, I), slice(None), cols)
    return w
