"""Parallel layers that own their uneven slice (vLLM's vocabulary, ranges from the ShardPlan).

Each layer is given the `Slice`s of `raytp.model.layout` it holds and reads them through a `WeightReader`, the one
interface every weight source implements (the safetensors checkpoint, the synthetic generator). How a matrix is
stored and applied is a format apart from the slice (`raytp.model.formats`: dense, packed integers, float8), each
with the same `apply`.

    ColumnParallelLinear    x (..., in) replicated      -> y (..., local rows)  no communication
    RowParallelLinear       x (..., local cols)         -> y (..., out)         all-reduce of partial sums
    VocabParallelEmbedding  tokens                      -> x (..., hidden)      all-reduce of masked lookups
    ParallelLMHead          x (batch, hidden)           -> logits (batch, local vocab), float32, no communication

A zero-width rank (no heads, no MLP columns or no vocab rows) still joins every all-reduce, adding zeros, which
is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from raytp.model.formats import DenseWeight, WeightReader, for_device, fuse, read_linear
from raytp.model.slice import Slice
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import DTYPE_BYTES, Piece, PlanShape, Span

VOCAB_ROWS = "vocab_rows"
VOCAB_BLOCK = 64  # vocab rows move between ranks in blocks of this many (the last may be partial)


def vocab_piece(config, shape: PlanShape) -> Piece:
    """The embedding's and lm_head's rows (one table when tied), as declared to the planner: a decode step reads all
    of lm_head but one embedding row per token, so the embedding is not counted as read."""
    row = config.hidden_size * DTYPE_BYTES[shape.dtype]
    return Piece((Span(VOCAB_ROWS, "vocab rows"),), config.vocab_size, shape.block(VOCAB_ROWS, VOCAB_BLOCK),
                 (1 if config.tie_word_embeddings else 2) * row, row, unit="vocab block")


class ColumnParallelLinear:
    """y = x @ W[rows].T + b[rows]: this rank's output rows of one or more global matrices, fused into one matmul.

    The parts are concatenated in layout order (q, k, v or gate, up) into one matrix of their format; the bias,
    when there is one, is sliced like the rows.
    """

    def __init__(self, parts: Sequence[Slice], bias: Sequence[Slice] = ()):
        self.parts, self.bias_parts = tuple(parts), tuple(bias)

    def load(self, reader: WeightReader, act_quant_weight_only: bool) -> ColumnParallelLinear:
        """`act_quant_weight_only`: the group runs activation-quantized weights weight-only (formats.for_device)."""
        bias = torch.cat([reader.read(p) for p in self.bias_parts]) if self.bias_parts else None
        self.weight = for_device(fuse([read_linear(reader, p) for p in self.parts], bias), reader.dtype,
                                 act_quant_weight_only)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.apply(x)


class RowParallelLinear:
    """y = all_reduce(x @ W[:, cols].T) + b: partial sums over this rank's input columns, summed over all ranks.

    Every rank gets the same bits (the communicator sums in rank order). A bias (gpt-oss's o_proj) is held whole by
    every rank and added by one, the rank whose columns start the row, before the all-reduce.
    """

    def __init__(self, part: Slice, comm: Communicator, bias: Slice | None = None):
        self.part, self.comm, self.bias_part = part, comm, bias
        self.out_features, self.width = part.shape[0], len(part.cols)

    def load(self, reader: WeightReader, act_quant_weight_only: bool) -> RowParallelLinear:
        """`act_quant_weight_only`: the group runs activation-quantized weights weight-only (formats.for_device)."""
        self.bias = reader.read(self.bias_part) if self.bias_part is not None else None  # (out,)
        self.adds_bias = self.bias is not None and self.width > 0 and self.part.cols.start == 0
        self.weight = for_device(read_linear(reader, self.part), reader.dtype, act_quant_weight_only)
        # Whether the ranks exchange each token's amax, which all must agree on: a rank without columns keeps its
        # empty slice as read, though the others hold theirs repacked for the weight-only kernel.
        self.row_amax = self.weight.takes_amax and not act_quant_weight_only
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        amax = self._row_amax(x) if self.row_amax else None  # every rank joins it
        if self.width:
            partial = self.weight.apply(x) if amax is None else self.weight.apply(x, amax)
        else:  # no columns here: this rank's share of the sum is zero
            partial = x.new_zeros((*x.shape[:-1], self.out_features))
        if self.adds_bias:
            partial = partial + self.bias
        return self.comm.all_reduce(partial)

    def _row_amax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each token's largest magnitude over the whole input row (..., 1), whose columns the ranks share: the
        per-token scale of activation-quantized weights, the one a single device computes. Every rank puts its own
        maximum in its own slot of zeros and one sum all-reduce gathers them (adding zeros is exact, and a sum is
        what every backend has, in CUDA graphs too); None on one rank."""
        if self.comm.world_size == 1:
            return None
        mine = x.abs().amax(dim=-1) if self.width else x.new_zeros(x.shape[:-1])
        slots = x.new_zeros((*x.shape[:-1], self.comm.world_size))
        slots[..., self.comm.rank] = mine
        return self.comm.all_reduce(slots).amax(dim=-1, keepdim=True)


class VocabParallelEmbedding:
    """x = all_reduce(lookup in E[vocab_rows], zeros for tokens outside them): each token's row comes from the one
    rank that holds it."""

    def __init__(self, part: Slice, comm: Communicator):
        self.part, self.comm = part, comm
        self.start, self.width, self.hidden = part.rows.start, len(part.rows), part.shape[1]

    def load(self, reader: WeightReader) -> VocabParallelEmbedding:
        self.table = reader.read(self.part)  # (local vocab, hidden)
        return self

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.width:
            x = self.table.new_zeros((*tokens.shape, self.hidden))
        else:
            local = tokens - self.start
            mine = (local >= 0) & (local < self.width)
            x = F.embedding(local.clamp(0, self.width - 1), self.table) * mine.unsqueeze(-1).to(self.table.dtype)
        return self.comm.all_reduce(x)


class ParallelLMHead:
    """logits = x @ E[vocab_rows].T in float32: this rank's slice of the vocabulary; the sampler gathers candidates,
    never full logits."""

    def __init__(self, part: Slice):
        self.part, self.width = part, len(part.rows)

    def load(self, reader: WeightReader) -> ParallelLMHead:
        self.weight = DenseWeight(reader.read(self.part))
        return self

    def tie(self, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        """Share the embedding's tensor (tied word embeddings): one copy in memory."""
        assert embedding.part.rows == self.part.rows
        self.weight = DenseWeight(embedding.table)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.width:
            return x.new_zeros((x.shape[0], 0), dtype=torch.float32)
        return self.weight.apply(x).float()
