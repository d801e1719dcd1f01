"""The uneven tensor-parallel split: which slice of every layer each rank holds, proportional to its memory.

`plan_shards` is a pure function of the model config and one memory budget per rank; its `ShardPlan` is computed
once and only read afterwards. What rank r holds, in every layer:

    attention  q/k/v columns of its KV heads `kv_heads` and of their query heads `q_heads` (column-parallel),
               o_proj input columns of those query heads (row-parallel, partial sums all-reduced)
    MLP        gate/up output columns `mlp_cols` (column-parallel), down_proj input columns `mlp_cols`
               (row-parallel, partial sums all-reduced)
    vocab      embedding rows and lm_head rows `vocab_rows` (masked lookup all-reduced; local logits gathered)
    replicated RMSNorm weights and working buffers (`overhead_bytes`)

Each slice is contiguous, in rank order, and the slices of all ranks cover their dimension exactly once. Any slice
may be empty: with more ranks than KV heads (12 ranks, 3 KV heads) most ranks are zero-width for attention and add
nothing to the o_proj all-reduce. That beats replicating KV heads, which would store their weights and cache twice
and need the replicas excluded from the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass
from itertools import accumulate

from raytp.model.config import ModelConfig, QuantConfig
from raytp.parallel.devices import format_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The KV cache's storage: auto, the model dtype; fp8, float8 e4m3 with a float32 scale per row (raytp.kernels.kv_fp8)
KV_DTYPES = ("auto", "fp8")
# Prefill runs at most this many tokens per sequence per step; it sizes the working buffers in the overhead.
PREFILL_CHUNK = 512
SPLITS = ("memory", "speed")
SHARE_SCALE = 1 << 48  # fractional speed shares become integers for the exact integer split


class PlanError(ValueError):
    """The model does not fit on the devices; the message gives each device's need and budget."""


@dataclass(frozen=True)
class RankShard:
    rank: int
    device: str  # the DeviceSpec string, e.g. "cuda:1@24GiB"
    budget_bytes: int  # memory this rank may use
    kv_heads: range  # global KV head indices
    q_heads: range  # the query heads served by those KV heads
    mlp_cols: range  # slice of intermediate_size
    vocab_rows: range  # slice of vocab_size
    weight_bytes: int  # sharded weights only; the replicated norms count in overhead_bytes
    kv_cache_bytes: int  # K and V of its KV heads for max_batch x max_context tokens (FP8: their scales too)
    overhead_bytes: int  # replicated on every rank: norms and working buffers
    read_bytes: int  # weight bytes one batch-1 decode step streams: all but the embedding table
    bandwidth: float | None = None  # device memory bandwidth, bytes/s, when known

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.weight_bytes - self.kv_cache_bytes - self.overhead_bytes

    @property
    def step_seconds(self) -> float | None:
        """Predicted batch-1 decode step of this rank alone: its weight reads at its bandwidth."""
        return self.read_bytes / self.bandwidth if self.bandwidth else None


@dataclass(frozen=True)
class ShardPlan:
    ranks: tuple[RankShard, ...]
    dtype: str  # weights, activations and (kv_dtype auto) the KV cache
    max_context: int  # tokens per sequence the KV cache holds
    max_batch: int  # sequences the KV cache holds
    mlp_block: int  # MLP columns move between ranks in blocks of this many (the last may be partial)
    vocab_block: int  # vocab rows likewise
    split: str = "memory"  # what the shares follow: "memory" (budgets) or "speed" (bandwidths, within budgets)
    quant: str | None = None  # the quantized weights' format, when the model has one
    kv_dtype: str = "auto"  # the KV cache's storage, one of KV_DTYPES

    @property
    def step_seconds(self) -> float | None:
        """Predicted batch-1 decode step: the slowest rank's weight reads (None without every bandwidth)."""
        times = [r.step_seconds for r in self.ranks]
        return None if None in times else max(times)

    @property
    def pacing_rank(self) -> int | None:
        """The rank whose weight reads take longest: it sets the pace of every step."""
        times = [r.step_seconds for r in self.ranks]
        return None if None in times else max(range(len(times)), key=times.__getitem__)

    def to_dict(self) -> dict:
        """JSON-ready summary: counts as integers, with the [start, stop) of each range alongside."""
        ranks = []
        for r in self.ranks:
            spans = {"q_head": r.q_heads, "kv_head": r.kv_heads, "mlp_col": r.mlp_cols, "vocab_row": r.vocab_rows}
            ranks.append(
                {"rank": r.rank, "device": r.device, "budget_bytes": r.budget_bytes}
                | {f"{key}s": len(span) for key, span in spans.items()}
                | {f"{key}_range": [span.start, span.stop] for key, span in spans.items()}
                | {"weight_bytes": r.weight_bytes, "kv_cache_bytes": r.kv_cache_bytes,
                   "overhead_bytes": r.overhead_bytes, "headroom_bytes": r.headroom_bytes,
                   "read_bytes": r.read_bytes, "bandwidth": r.bandwidth, "step_seconds": r.step_seconds}
            )
        return {"dtype": self.dtype, "quant": self.quant, "kv_dtype": self.kv_dtype, "max_context": self.max_context,
                "max_batch": self.max_batch, "mlp_block": self.mlp_block, "vocab_block": self.vocab_block,
                "split": self.split, "step_seconds": self.step_seconds, "pacing_rank": self.pacing_rank, "ranks": ranks}

    def format_table(self) -> str:
        def span(s: range) -> str:
            return f"{len(s)} [{s.start}:{s.stop}]" if s else "0"

        def step(r: RankShard) -> str:
            pace = " <- paces" if r.rank == self.pacing_rank else ""
            return f"{1000 * r.step_seconds:.2f} ms{pace}"

        timed = self.step_seconds is not None  # the predicted step needs every rank's bandwidth
        header = ("rank", "device", "budget", "query heads", "KV heads", "MLP columns", "vocab rows", "weights",
                  "KV cache", "headroom") + (("step (weights / bandwidth)",) if timed else ())
        rows = [header] + [
            (str(r.rank), r.device, format_bytes(r.budget_bytes), span(r.q_heads), span(r.kv_heads),
             span(r.mlp_cols), span(r.vocab_rows), format_bytes(r.weight_bytes), format_bytes(r.kv_cache_bytes),
             format_bytes(r.headroom_bytes)) + ((step(r),) if timed else ())
            for r in self.ranks
        ]
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        title = [f"weights: {self.quant}"] if self.quant else []
        if self.kv_dtype == "fp8":
            title.append("KV cache: fp8 (e4m3 and a float32 scale per token and KV head)")
        return "\n".join(title + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows])


@dataclass(frozen=True)
class _Piece:
    """One dimension dealt out to ranks: `size` items (KV heads, MLP columns, vocab rows) in blocks of `block`.

    Quantized row-parallel weights add `group_bytes` (their scales and zero points) per started group of `group`
    items; `group` divides `block`, so every rank's range starts on a group boundary and the count is exact.
    """

    size: int
    block: int
    weight_bytes: int  # per item, all layers
    read_bytes: int  # per item: what a batch-1 decode step streams of its weights
    cache_bytes: int = 0  # per item, all layers (KV heads only)
    group: int = 1
    group_bytes: int = 0  # per group of `group` items, all layers (streamed too)

    def weights(self, n: int) -> int:
        """Weight bytes of n items starting on a block boundary."""
        return n * self.weight_bytes + -(-n // self.group) * self.group_bytes

    def reads(self, n: int) -> int:
        return n * self.read_bytes + -(-n // self.group) * self.group_bytes

    def total(self, n: int) -> int:
        return self.weights(n) + n * self.cache_bytes

    @property
    def block_bytes(self) -> int:
        return self.total(self.block)

    def ranges(self, blocks: Sequence[int]) -> list[range]:
        """Block counts per rank -> contiguous item ranges; the last block of the dimension may be partial."""
        bounds = [min(self.size, self.block * b) for b in accumulate(blocks, initial=0)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _group_entry(quant: QuantConfig, nbytes: int) -> int:
    """Bytes per output row and group of an integer-quantized matrix: its scale (and zero point), model dtype."""
    return nbytes * (1 if quant.symmetric else 2)


def _quant_row_bytes(quant: QuantConfig, width: int, nbytes: int) -> int:
    """One output row of a quantized matrix holding all `width` of its input columns (column-parallel): packed
    values and the row's scales (float8, and int8 with dynamic activations: one byte per value unpacked, one float32
    scale per row; per-tensor scales become per-row when the q/k/v or gate/up parts fuse)."""
    if quant.kind == "fp8" or quant.dynamic_activations:
        return width + 4
    groups = -(-width // quant.group_size) if quant.group_size else 1
    return -(-width * quant.bits // 32) * 4 + groups * _group_entry(quant, nbytes)


def quant_replicated_bytes(config: ModelConfig, dtype: str) -> int:
    """Quantization data every rank holding a share of the layers keeps whole, whatever its share.

    Row-parallel layers (o_proj, down_proj) with one scale per output row hold all of them on every rank; act-order
    checkpoints keep the column groups of q/k/v and gate/up (their input is every column) and, for o_proj, whose
    columns stay in head order, scales for up to every group; and an o_proj split at head boundaries that are not
    group boundaries shares one group's scales between two ranks. (Every decoder Linear is counted as quantized.)
    """
    q, nbytes, h, L = config.quant, DTYPE_BYTES[dtype], config.hidden_size, config.num_layers
    if q is None:
        return 0
    if q.kind == "fp8" or q.dynamic_activations:
        return L * 2 * (4 if q.per_tensor else 4 * h)
    entry = _group_entry(q, nbytes)
    if q.group_size is None:
        return L * 2 * h * entry
    o_cols = config.num_heads * config.head_dim
    if q.act_order:
        return L * (2 * h * 4 + h * -(-o_cols // q.group_size) * entry)
    return L * h * entry if (config.q_per_kv * config.head_dim) % q.group_size else 0


def _mlp_block(config: ModelConfig, mlp_block: int) -> int:
    """MLP columns move in blocks of whole quantization groups of down_proj."""
    q = config.quant
    return math.lcm(mlp_block, q.group_size) if q is not None and q.group_size else mlp_block


def kv_row_bytes(head_dim: int, nbytes: int, kv_dtype: str) -> int:
    """Bytes of one cached row, the keys (or the values) of one KV head at one position: head_dim elements in the
    model dtype (`nbytes` each), or with fp8 one byte each plus the row's float32 scale."""
    return head_dim + 4 if kv_dtype == "fp8" else head_dim * nbytes


def _pieces(config: ModelConfig, max_context: int, max_batch: int, nbytes: int, mlp_block: int, vocab_block: int,
            kv_dtype: str):
    h, d, q, layers = config.hidden_size, config.head_dim, config.q_per_kv, config.num_layers
    bias = (q + 2) * d * config.attention_bias * nbytes
    cache = 2 * layers * max_batch * max_context * kv_row_bytes(d, nbytes, kv_dtype)
    quant, group, group_bytes = config.quant, 1, 0
    if quant is None:
        # One KV group: q and o_proj slices of its q query heads, its k and v rows (+ q/k/v biases), and its cache.
        kv_group = layers * (2 * (q + 1) * d * h * nbytes + bias)
        mlp = 3 * h * layers * nbytes  # gate, up and down per column
    else:
        row = _quant_row_bytes(quant, h, nbytes)  # a q/k/v or gate/up row
        col = h if quant.kind == "fp8" else h * quant.bits // 8  # an o_proj or down_proj column's packed values
        o_cols, o_scales, col_extra = q * d, 0, 0  # per-row scales of o_proj and down_proj are replicated
        if quant.kind == "int" and quant.group_size:
            if quant.act_order:
                col_extra = 4  # o_proj keeps each column's group (int32); its scales are replicated
            else:
                o_scales = -(-o_cols // quant.group_size) * h * _group_entry(quant, nbytes)
            group, group_bytes = quant.group_size, layers * h * _group_entry(quant, nbytes)  # down_proj's scales
        kv_group = layers * ((q + 2) * d * row + o_cols * (col + col_extra) + o_scales + bias)
        mlp = layers * (2 * row + col)
    # A step reads all of lm_head but only one embedding row per token: the embedding table is not streamed.
    vocab = (1 if config.tie_word_embeddings else 2) * h * nbytes
    return (
        _Piece(config.num_kv_heads, 1, kv_group, kv_group, cache),
        _Piece(config.intermediate_size, _mlp_block(config, mlp_block), mlp, mlp, group=group,
               group_bytes=group_bytes),
        _Piece(config.vocab_size, vocab_block, vocab, h * nbytes),
    )


def replicated_overhead_bytes(config: ModelConfig, *, max_context: int, max_batch: int, dtype: str) -> int:
    """What every rank holds whatever its share: norm weights plus working buffers.

    Quantized models add what `quant_replicated_bytes` lists. The buffers are one layer's activations for a prefill
    chunk of max_batch * min(max_context, PREFILL_CHUNK) tokens at full width (residual, normed input, attention and
    MLP outputs, q/k/v, gate and up), an upper bound of the local slices so that the overhead does not depend on the
    split it feeds, plus the gathered float32 logits of one step. Attention scores are not counted: torch's fused
    SDPA kernels never materialise them.
    """
    nbytes = DTYPE_BYTES[dtype]
    tokens = max_batch * min(max_context, PREFILL_CHUNK)
    width = 4 * config.hidden_size + (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    norms = (2 * config.num_layers + 1) * config.hidden_size * nbytes
    return (norms + quant_replicated_bytes(config, dtype) + tokens * (width + 2 * config.intermediate_size) * nbytes
            + max_batch * config.vocab_size * 4)


def _split(piece: _Piece, weights: Sequence[int]) -> list[int]:
    """Blocks per rank in proportion to `weights`, summing exactly to the piece's block count.

    Like exllamav2's integer_split the parts are exact integers that add up to the whole, but instead of handing
    out remainders we put each split point at the block boundary nearest its ideal position: every rank then gets
    within one block of its ideal share even when the dimension's last block is partial.
    """
    total, nblocks = sum(weights), -(-piece.size // piece.block)
    # nearest boundary to size * W_k / total, in exact integer arithmetic (round half up)
    inner = [(2 * piece.size * w + total * piece.block) // (2 * total * piece.block) for w in accumulate(weights)]
    points = [0] + inner[:-1] + [nblocks]
    return [b - a for a, b in zip(points, points[1:])]


def _speed_shares(room: Sequence[int], bandwidths: Sequence[float], pieces) -> list[float]:
    """Each rank's fraction of the model that minimizes the slowest rank's weight reads over its bandwidth,
    with no rank holding more than its room: water-filling.

    With fraction f_r of every piece, rank r holds f_r * M bytes (M: all sharded bytes, cache included) and reads
    f_r * R per step (R: all streamed bytes), taking f_r * R / bw_r. The optimum gives every rank the same time T,
    except ranks whose memory caps them below it: f_r = min(room_r / M, T * bw_r / R), with T the smallest time at
    which the fractions reach 1. The caller checked that sum(room) >= M, so that T exists.
    """
    M = sum(p.total(p.size) for p in pieces)
    R = sum(p.reads(p.size) for p in pieces)
    caps = [max(r, 0) / M for r in room]
    rates = [bw / R for bw in bandwidths]  # fraction per second of step time
    # g(T) = sum(min(cap, T * rate)) rises piecewise linearly; walk its breakpoints T_r = cap_r / rate_r.
    capped, free_rate = 0.0, sum(rates)
    for cap, rate in sorted(zip(caps, rates), key=lambda cr: cr[0] / cr[1]):
        if capped + cap / rate * free_rate >= 1:  # the answer lies before this rank's breakpoint
            break
        capped, free_rate = capped + cap, free_rate - rate
    else:
        return caps  # the model just fits: every rank is full
    T = (1 - capped) / free_rate
    return [min(cap, T * rate) for cap, rate in zip(caps, rates)]


def _read_seconds(pieces, blocks, bandwidths: Sequence[float]) -> float:
    """The slowest rank's predicted step for a block assignment."""
    reads = [sum(p.reads(len(r)) for p, r in zip(pieces, ranges))
             for ranges in zip(*(p.ranges(b) for p, b in zip(pieces, blocks)))]
    return max(read / bw for read, bw in zip(reads, bandwidths))


def _usage(pieces, blocks, base: Sequence[int]) -> list[int]:
    """Bytes per rank: `base` plus each piece's share (exact, partial last block included)."""
    per_piece = [[p.total(len(r)) for r in p.ranges(b)] for p, b in zip(pieces, blocks)]
    return [b + sum(rank) for b, rank in zip(base, zip(*per_piece))]


def _relieve(pieces, blocks, base: Sequence[int], budgets: Sequence[int]):
    """Move blocks off over-budget ranks onto ranks with room, until all fit or no move helps.

    Smallest blocks move first, to the rank with the most headroom. A move is kept only if it shrinks the
    over-budget rank and pushes no other rank over its budget (nor further over it), so the total excess strictly
    falls and the loop ends.
    """
    while True:
        use = _usage(pieces, blocks, base)
        moved = next((trial for r, trial in _moves(pieces, blocks, use, budgets)
                      if _improves(_usage(pieces, trial, base), use, budgets, r)), None)
        if moved is None:
            return blocks
        blocks = moved


def _moves(pieces, blocks, use: Sequence[int], budgets: Sequence[int]):
    """Candidate (over-budget rank, new blocks): just enough blocks of one piece to one rank that has room."""
    n = len(budgets)
    for r in (r for r in range(n) if use[r] > budgets[r]):
        for i in sorted(range(len(pieces)), key=lambda i: pieces[i].block_bytes):
            step = pieces[i].block_bytes
            for s in sorted(range(n), key=lambda s: use[s] - budgets[s]):
                k = min(blocks[i][r], -(-(use[r] - budgets[r]) // step), (budgets[s] - use[s]) // step)
                if s != r and k > 0:
                    counts = list(blocks[i])
                    counts[r], counts[s] = counts[r] - k, counts[s] + k
                    yield r, blocks[:i] + (tuple(counts),) + blocks[i + 1:]


def _improves(new: Sequence[int], use: Sequence[int], budgets: Sequence[int], r: int) -> bool:
    # A move shifts the ranges of the ranks in between, which can swap one's partial last block for a full one; so
    # every other rank must stay within its budget, or at least get no worse.
    return new[r] < use[r] and all(v <= max(u, b) for v, u, b in zip(new, use, budgets))


def plan_shards(
    config: ModelConfig,
    budgets: Sequence[tuple[str, int]],
    *,
    max_context: int,
    max_batch: int,
    dtype: str = "bfloat16",
    mlp_block: int = 64,
    vocab_block: int = 64,
    bandwidths: Sequence[float] | None = None,
    split: str | None = None,
    kv_dtype: str = "auto",
) -> ShardPlan:
    """Split `config` over ranks with `budgets` = (device, bytes) per rank; raise PlanError if it cannot fit.

    Every rank first pays the replicated overhead; what is left of each budget is its room. KV heads are split
    first (a unit is one KV group: its query heads' q/o weights, its k/v weights and its cache share), then MLP
    columns in blocks of `mlp_block` (widened to whole quantization groups of down_proj), then vocab rows in blocks
    of `vocab_block`, each in proportion to the rank's share. Rounding can leave a rank one block of each piece over
    its ideal share, which for KV groups may be more than it has; such ranks hand blocks to ranks with headroom (see
    `_relieve`), KV groups first, so that the finer MLP and vocab blocks can then fill the space the KV groups leave.

    The shares follow `split`:
      memory  in proportion to each rank's room, so every device fills alike;
      speed   minimize the predicted batch-1 decode step, max over ranks of (weights read / bandwidth), subject
              to every rank's room (`_speed_shares`, exact in the continuous limit); of this and the memory split
              the one predicting the faster step after rounding to blocks is kept, so it is never slower.
    The default is speed when `bandwidths` (bytes/s per rank) are given, else memory.

    `kv_dtype` fp8 counts the KV cache at 1 + 4/head_dim bytes per element (e4m3 values and a float32 scale per row)
    instead of the dtype's bytes.
    """
    split = split or ("speed" if bandwidths is not None else "memory")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if bandwidths is not None and (len(bandwidths) != len(budgets) or min(bandwidths, default=1) <= 0):
        raise ValueError(f"give one positive bandwidth per device: {len(budgets)} devices, bandwidths {bandwidths}")
    if split == "speed" and bandwidths is None:
        raise ValueError("the speed split needs every device's memory bandwidth")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    for what, value in (("max_context", max_context), ("max_batch", max_batch), ("mlp_block", mlp_block),
                        ("vocab_block", vocab_block), ("number of devices", len(budgets))):
        if value < 1:
            raise ValueError(f"{what} must be at least 1, got {value}")
    names, caps = [name for name, _ in budgets], [cap for _, cap in budgets]
    pieces = _pieces(config, max_context, max_batch, DTYPE_BYTES[dtype], mlp_block, vocab_block, kv_dtype)
    overhead = replicated_overhead_bytes(config, max_context=max_context, max_batch=max_batch, dtype=dtype)
    room = [cap - overhead for cap in caps]
    sharded = sum(p.total(p.size) for p in pieces)
    cache = pieces[0].size * pieces[0].cache_bytes
    stored = f"{dtype}, {config.quant.describe()}" if config.quant else dtype
    stored += ", fp8 KV cache" if kv_dtype == "fp8" else ""
    summary = (f"the model needs {format_bytes(sharded - cache)} of weights and {format_bytes(cache)} of KV cache "
               f"(max_context={max_context}, max_batch={max_batch}, {stored}), plus {format_bytes(overhead)} of norms "
               f"and working buffers on every device")
    if min(room) < 0 or sharded > sum(room):
        # Each device's proportional share of what would be needed, so the message blames every short device.
        usable = [max(x, 0) for x in room]
        needs = [overhead + (-(-sharded * u // sum(usable)) if sum(usable) else -(-sharded // len(caps)))
                 for u in usable]
        raise _plan_error(f"does not fit: {summary}", names, caps, needs, pieces, kv_dtype)
    base = [overhead] * len(caps)
    blocks = _deal(pieces, room, base, caps)
    if split == "speed":
        fractions = _speed_shares(room, bandwidths, pieces)
        fast = _deal(pieces, [round(f * SHARE_SCALE) for f in fractions], base, caps)
        fits = all(n <= c for n, c in zip(_usage(pieces, fast, base), caps))
        if fits and _read_seconds(pieces, fast, bandwidths) <= _read_seconds(pieces, blocks, bandwidths):
            blocks = fast
    needs = _usage(pieces, blocks, base)
    if any(need > cap for need, cap in zip(needs, caps)):
        raise _plan_error(f"does not fit in indivisible pieces, although the total would: {summary}",
                          names, caps, needs, pieces, kv_dtype)
    kv, mlp, vocab = (p.ranges(b) for p, b in zip(pieces, blocks))
    q = config.q_per_kv
    return ShardPlan(
        ranks=tuple(
            RankShard(
                rank=i, device=names[i], budget_bytes=caps[i], kv_heads=kv[i],
                q_heads=range(kv[i].start * q, kv[i].stop * q), mlp_cols=mlp[i], vocab_rows=vocab[i],
                weight_bytes=sum(p.weights(len(r[i])) for p, r in zip(pieces, (kv, mlp, vocab))),
                kv_cache_bytes=len(kv[i]) * pieces[0].cache_bytes, overhead_bytes=overhead,
                read_bytes=sum(p.reads(len(r[i])) for p, r in zip(pieces, (kv, mlp, vocab))),
                bandwidth=bandwidths[i] if bandwidths is not None else None,
            )
            for i in range(len(caps))
        ),
        dtype=dtype, max_context=max_context, max_batch=max_batch, mlp_block=pieces[1].block,
        vocab_block=vocab_block, split=split, quant=config.quant.describe() if config.quant else None,
        kv_dtype=kv_dtype,
    )


def _deal(pieces, shares: Sequence[int], base: Sequence[int], caps: Sequence[int]):
    """Blocks of every piece per rank in proportion to `shares`, KV groups first, then relieved of overflows."""
    kv_piece, fine = pieces[0], pieces[1:]
    kv_blocks = _relieve((kv_piece,), (tuple(_split(kv_piece, shares)),), base, caps)
    with_kv = _usage((kv_piece,), kv_blocks, base)
    return kv_blocks + _relieve(fine, tuple(tuple(_split(p, shares)) for p in fine), with_kv, caps)


def _plan_error(reason: str, names: Sequence[str], caps: Sequence[int], needs: Sequence[int], pieces,
                kv_dtype: str) -> PlanError:
    lines = [f"{reason}:"]
    for i, (name, cap, need) in enumerate(zip(names, caps, needs)):
        short = f" (short {format_bytes(need - cap)})" if need > cap else ""
        lines.append(f"  rank {i} {name}: needs {format_bytes(need)}, has {format_bytes(cap)}{short}")
    kv, mlp, vocab = (format_bytes(p.block_bytes) for p in pieces)
    fp8 = ", --kv-dtype fp8 (a KV cache of about 1 byte per element)" if kv_dtype != "fp8" else ""
    lines.append(f"Indivisible pieces: one KV group {kv} (weights and cache), one MLP block {mlp}, one vocab block "
                 f"{vocab}. Try more devices, more memory per device, a smaller --max-context or --max-batch{fp8}, "
                 f"or a lower --dtype.")
    return PlanError("\n".join(lines))
