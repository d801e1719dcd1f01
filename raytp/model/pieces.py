"""What a model can split, and what every rank holds whole: its declaration to the planner.

`ModelPieces(config)` is the `raytp.parallel.plan.Splittable` of a model config: the sum of what the kinds of the
layers it lists declare (`raytp.model.kinds`: each layer's mixer and feed-forward block), plus the vocabulary
(`raytp.model.layers.vocab_piece`). Pieces of the same name add up over layers (`raytp.parallel.plan.sum_pieces`):
the KV groups of full and sliding-window layers are one dimension, each layer adding its weights and its cache. No
model's formula is written here.

Replicated: every tensor the layout gives each rank whole (norms, q/k norms, routers), the quantization data each
layer kind keeps whole, and the working buffers: one layer's activations for a prefill chunk (the residual, normed
input and sublayer outputs at full width, and the largest buffer any mixer and any feed-forward kind declares, an
upper bound of the local slices so that the overhead does not depend on the split it feeds), plus the gathered
float32 logits of one step. Attention scores are not counted: torch's fused SDPA kernels never materialise them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from raytp.model.attention import KV_CACHE, WINDOW_CACHE
from raytp.model.config import ModelConfig
from raytp.model.formats import weight_format
from raytp.model.layers import vocab_piece
from raytp.model.layout import Slice, layer_count, layer_kinds, model_layout, whole_model
from raytp.parallel.devices import format_bytes
from raytp.parallel.plan import (DTYPE_BYTES, PREFILL_CHUNK, Piece, PlanError, PlanShape, ShardPlan, plan_shards,
                                 sum_pieces)


def _shape(max_context: int, max_batch: int, dtype: str) -> PlanShape:
    return PlanShape(max_context=max_context, max_batch=max_batch, dtype=dtype)


def replicated_tensor_bytes(config: ModelConfig, dtype: str) -> int:
    """The tensors every rank holds whole, as the layout lists them (norms, routers), in `dtype`."""
    layout = model_layout(config, whole_model(config))
    return sum(_whole_bytes(s, DTYPE_BYTES[dtype]) for s in layout.slices() if s.split is None)


def _whole_bytes(s: Slice, nbytes: int) -> int:
    """A tensor every rank holds whole; a quantized Linear (Qwen3.5's shared_expert_gate) as its format holds it,
    with act-order its input columns' group index (int32)."""
    if s.quant is None:
        return math.prod(s.shape) * nbytes
    rows, width = s.shape
    return rows * weight_format(s.quant).row_bytes(width, nbytes) + (width * 4 if s.quant.act_order else 0)


def quant_replicated_bytes(config: ModelConfig, dtype: str) -> int:
    """Quantization data every rank holding a share of the layers keeps whole, whatever its share: the sum of what
    each layer's kinds declare (per-row scales of row-parallel layers, act-order group indices, a group two ranks'
    head ranges share)."""
    shape = _shape(1, 1, dtype)
    return sum(kind.replicated_bytes(config, shape) for i in range(layer_count(config))
               for kind in layer_kinds(config, i))


def replicated_overhead_bytes(config: ModelConfig, *, max_context: int, max_batch: int, dtype: str) -> int:
    """What every rank holds whatever its share: the layout's whole tensors, quantization data kept whole and
    working buffers (see the module's docstring)."""
    shape = _shape(max_context, max_batch, dtype)
    tokens = max_batch * min(max_context, PREFILL_CHUNK)
    kinds = [layer_kinds(config, i) for i in range(layer_count(config))]
    buffers = (max(mixer.buffer_bytes(config, shape) for mixer, _ in kinds)
               + max(mlp.buffer_bytes(config, shape) for _, mlp in kinds))
    return (replicated_tensor_bytes(config, dtype) + quant_replicated_bytes(config, dtype)
            + tokens * 4 * config.hidden_size * DTYPE_BYTES[dtype] + buffers + max_batch * config.vocab_size * 4)


@dataclass(frozen=True)
class ModelPieces:
    """A model config as the planner sees it (`raytp.parallel.plan.Splittable`)."""

    config: ModelConfig

    @property
    def quant(self) -> str | None:
        return self.config.quant.describe() if self.config.quant else None

    def describe(self, shape: PlanShape) -> str:
        return f"{shape.dtype}, {self.quant}" if self.quant else shape.dtype

    def replicated_bytes(self, shape: PlanShape) -> int:
        return replicated_overhead_bytes(self.config, max_context=shape.max_context, max_batch=shape.max_batch,
                                         dtype=shape.dtype)

    def pieces(self, shape: PlanShape) -> Sequence[Piece]:
        c = self.config
        layers = (p for i in range(layer_count(c)) for kind in layer_kinds(c, i) for p in kind.pieces(c, shape))
        return sum_pieces((*layers, vocab_piece(c, shape)))


def plan_model(config: ModelConfig, budgets: Sequence[tuple[str, int]], **kwargs) -> ShardPlan:
    """`plan_shards` of a model config (keyword arguments as there)."""
    return plan_shards(ModelPieces(config), budgets, **kwargs)


def plan_with_draft(config: ModelConfig, draft: ModelConfig, budgets: Sequence[tuple[str, int]],
                    **kwargs) -> tuple[ShardPlan, ShardPlan]:
    """(target plan, draft plan) of a target and its draft model (speculative decoding) on the same ranks: the draft
    is split first, by the same rule and cache shape, then the target over what each rank has left; so both are
    split in proportion to the ranks (within a block), and each rank's budget holds both. The target plan's budgets
    are those remainders."""
    try:
        draft_plan = plan_model(draft, budgets, **kwargs)
    except PlanError as e:
        raise PlanError(f"the draft model {e}") from None
    held = [r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes for r in draft_plan.ranks]
    try:
        return plan_model(config, [(name, cap - h) for (name, cap), h in zip(budgets, held)], **kwargs), draft_plan
    except PlanError as e:
        raise PlanError(f"beside the draft model ({', '.join(format_bytes(h) for h in held)} of the devices' "
                        f"budgets, in order), the model {e}") from None


def decode_read_bytes(config: ModelConfig, plan: ShardPlan, batch: int, context: float) -> list[int]:
    """Bytes each rank reads in one decode step of `batch` sequences `context` tokens long: the weights the planner
    says a step streams (all but the embedding table; quantized ones as stored), plus the part of each state those
    sequences fill - a KV cache its positions up to the context, a window cache up to its window, a recurrent state
    (linear attention) all of it, whatever the context."""
    def filled(name: str) -> float:
        if name == KV_CACHE:
            return min(context, plan.max_context) / plan.max_context
        if name == WINDOW_CACHE:
            window = min(config.sliding_window, plan.max_context)
            return min(context, window) / window
        return 1.0

    rows = batch / plan.max_batch
    return [r.read_bytes + int(sum(n * rows * filled(name) for name, n in r.state_bytes.items())) for r in plan.ranks]
