"""The uneven tensor-parallel split: which slice of every split dimension each rank holds, proportional to its memory.

`plan_shards` is a pure function of a model's declaration and one memory budget per rank; its `ShardPlan` is
computed once and only read afterwards. The model declares its `Piece`s, the dimensions it can split (for a Llama:
KV groups with their query heads, MLP columns, vocab rows; `raytp.model.pieces` says so), each with its block unit
and the bytes one unit costs a rank; and what every rank holds whole (norms, working buffers). The planner knows
no piece by name: it deals each one out in whole blocks and gives every rank a range of each.

Each range is contiguous, in rank order, and the ranges of all ranks cover their dimension exactly once. Any range
may be empty: with more ranks than KV heads (12 ranks, 3 KV heads) most ranks are zero-width for attention and add
nothing to the o_proj all-reduce. That beats replicating KV heads, which would store their weights and cache twice
and need the replicas excluded from the sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Protocol

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
class Span:
    """A range a rank holds that follows a piece's range: `per_unit` items per unit of the piece (a KV group's
    query heads), named `name` on the RankShard and `title` in tables."""

    name: str
    title: str
    per_unit: int = 1


@dataclass(frozen=True)
class Piece:
    """One dimension dealt out to ranks: `size` units (KV groups, MLP columns, vocab rows, ...) in blocks of `block`.

    A unit costs a rank `weight_bytes` of weights (all layers, as held in memory), the per-sequence state of
    `cache` (bytes for max_batch sequences by what keeps them, "KV cache", "window cache", a recurrent state: the
    names tables show), and a batch-1 decode step reads `read_bytes` of it. Quantized row-parallel weights add
    `group_bytes` (their scales and zero points) per started group of `group` units, of which a step reads
    `group_read_bytes` (None: all; a mixture of experts reads only its selected experts' scales); `group` divides
    `block`, so every rank's range starts on a group boundary and the count is exact. `spans` name the ranges a rank holds of it: the first is the piece's own
    range (`RankShard.<name>`), the others follow it (`per_unit` items per unit).
    """

    spans: tuple[Span, ...]
    size: int
    block: int
    weight_bytes: int
    read_bytes: int
    cache: tuple[tuple[str, int], ...] = ()  # (what keeps it, bytes) per state a unit keeps
    group: int = 1
    group_bytes: int = 0
    group_read_bytes: int | None = None
    unit: str = ""  # what one block is called in messages: "KV group", "MLP block"

    @property
    def name(self) -> str:
        return self.spans[0].name

    @property
    def cache_bytes(self) -> int:
        return sum(n for _, n in self.cache)

    def weights(self, n: int) -> int:
        """Weight bytes of n units starting on a block boundary."""
        return n * self.weight_bytes + -(-n // self.group) * self.group_bytes

    @property
    def group_reads_per_group(self) -> int:
        return self.group_bytes if self.group_read_bytes is None else self.group_read_bytes

    def reads(self, n: int) -> int:
        return n * self.read_bytes + -(-n // self.group) * self.group_reads_per_group

    def total(self, n: int) -> int:
        return self.weights(n) + n * self.cache_bytes

    @property
    def block_bytes(self) -> int:
        return self.total(self.block)

    def ranges(self, blocks: Sequence[int]) -> list[range]:
        """Block counts per rank -> contiguous unit ranges; the last block of the dimension may be partial."""
        bounds = [min(self.size, self.block * b) for b in accumulate(blocks, initial=0)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def sum_pieces(shares: Iterable[Piece]) -> tuple[Piece, ...]:
    """Shares of the same piece added into one, in order of first appearance: each layer declares what a unit costs
    it (`raytp.model.kinds`), and a dimension split across all layers (the KV groups of every attention layer) costs
    a unit the sum. The shares of one piece agree on everything but their bytes."""
    total: dict[str, Piece] = {}
    for p in shares:
        if p.name not in total:
            total[p.name] = p
            continue
        t = total[p.name]
        assert (t.spans, t.size, t.block, t.group) == (p.spans, p.size, p.block, p.group), (t, p)
        reads_all = t.group_read_bytes is None and p.group_read_bytes is None
        group_reads = None if reads_all else t.group_reads_per_group + p.group_reads_per_group
        total[p.name] = replace(t, weight_bytes=t.weight_bytes + p.weight_bytes, read_bytes=t.read_bytes + p.read_bytes,
                                cache=add_states(t.cache, p.cache), group_bytes=t.group_bytes + p.group_bytes,
                                group_read_bytes=group_reads)
    return tuple(total.values())


def add_states(*states: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """(name, bytes) pairs added up by name, in order of first appearance."""
    total: dict[str, int] = {}
    for name, n in (pair for pairs in states for pair in pairs):
        total[name] = total.get(name, 0) + n
    return tuple(total.items())


@dataclass(frozen=True)
class PlanShape:
    """What the declared bytes depend on besides the model: the cache's extent and storage, the dtype, and the
    block (in units) asked of each piece by name (a declaration may widen it, e.g. to whole quantization groups)."""

    max_context: int
    max_batch: int
    dtype: str
    kv_dtype: str = "auto"
    blocks: Mapping[str, int] = field(default_factory=dict)

    def block(self, piece: str, default: int) -> int:
        return self.blocks.get(piece, default)


class Splittable(Protocol):
    """What the planner needs of a model: its pieces and what every rank holds whole, for one shape."""

    def pieces(self, shape: PlanShape) -> Sequence[Piece]: ...

    def replicated_bytes(self, shape: PlanShape) -> int:
        """Bytes every rank holds whatever its share: norms, quantization data kept whole, working buffers."""

    def describe(self, shape: PlanShape) -> str:
        """How its weights are stored, for messages: "bfloat16", "bfloat16, w4a16 int, groups of 128, ..."."""

    @property
    def quant(self) -> str | None:
        """The quantized weights' format, when the model has one."""


@dataclass(frozen=True)
class RankShard:
    rank: int
    device: str  # the DeviceSpec string, e.g. "cuda:1@24GiB"
    budget_bytes: int  # memory this rank may use
    spans: Mapping[str, range]  # every piece's range (and the ranges that follow one), by name
    weight_bytes: int  # sharded weights only; the replicated norms count in overhead_bytes
    state_bytes: Mapping[str, int]  # its units' per-sequence state for max_batch sequences, by what keeps it
    overhead_bytes: int  # replicated on every rank: norms and working buffers
    read_bytes: int  # weight bytes one batch-1 decode step streams: all but the embedding table
    bandwidth: float | None = None  # device memory bandwidth, bytes/s, when known

    def __getattr__(self, name: str) -> range:
        """A span by name, `shard.kv_heads`: the model's layers read their ranges so."""
        spans = self.__dict__.get("spans")  # absent while unpickling
        if spans is None or name not in spans:
            raise AttributeError(f"RankShard has no attribute or span {name!r}")
        return spans[name]

    @property
    def kv_cache_bytes(self) -> int:
        """All its state: KV and window caches, recurrent states."""
        return sum(self.state_bytes.values())

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
    pieces: tuple[Piece, ...]  # what was split, as the model declared it (blocks as widened)
    split: str = "memory"  # what the shares follow: "memory" (budgets) or "speed" (bandwidths, within budgets)
    quant: str | None = None  # the quantized weights' format, when the model has one
    kv_dtype: str = "auto"  # the KV cache's storage, one of KV_DTYPES

    @property
    def spans(self) -> tuple[Span, ...]:
        """Every range a rank holds, in table order: of each piece, its following spans, then its own."""
        return tuple(s for p in self.pieces for s in (*p.spans[1:], p.spans[0]))

    def block(self, piece: str) -> int:
        return next(p.block for p in self.pieces if p.name == piece)

    @property
    def states(self) -> tuple[str, ...]:
        """What keeps per-sequence state, in table order ("KV cache", "window cache", ...)."""
        return tuple(name for name, _ in add_states(*(p.cache for p in self.pieces)))

    def describe_pieces(self) -> str:
        """One line naming what was split and in which blocks."""
        return "split: " + ", ".join(f"{p.size} {p.spans[0].title} in blocks of {p.block} ({p.unit})"
                                     for p in self.pieces)

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
        """JSON-ready summary: per rank, the count and [start, stop) of every span (`kv_heads`,
        `kv_heads_range`, ...); `pieces` lists the split dimensions with their size, block and unit."""
        ranks = []
        for r in self.ranks:
            ranks.append(
                {"rank": r.rank, "device": r.device, "budget_bytes": r.budget_bytes}
                | {s.name: len(r.spans[s.name]) for s in self.spans}
                | {f"{s.name}_range": [r.spans[s.name].start, r.spans[s.name].stop] for s in self.spans}
                | {"weight_bytes": r.weight_bytes, "kv_cache_bytes": r.kv_cache_bytes,
                   "state_bytes": {name: r.state_bytes.get(name, 0) for name in self.states},
                   "overhead_bytes": r.overhead_bytes, "headroom_bytes": r.headroom_bytes,
                   "read_bytes": r.read_bytes, "bandwidth": r.bandwidth, "step_seconds": r.step_seconds}
            )
        pieces = [{"name": p.name, "unit": p.unit, "size": p.size, "block": p.block,
                   "spans": [{"name": s.name, "title": s.title, "per_unit": s.per_unit} for s in p.spans]}
                  for p in self.pieces]
        return {"dtype": self.dtype, "quant": self.quant, "kv_dtype": self.kv_dtype, "max_context": self.max_context,
                "max_batch": self.max_batch, "pieces": pieces, "split": self.split,
                "step_seconds": self.step_seconds, "pacing_rank": self.pacing_rank, "ranks": ranks}

    def format_table(self) -> str:
        def span(s: range) -> str:
            return f"{len(s)} [{s.start}:{s.stop}]" if s else "0"

        def step(r: RankShard) -> str:
            pace = " <- paces" if r.rank == self.pacing_rank else ""
            return f"{1000 * r.step_seconds:.2f} ms{pace}"

        timed = self.step_seconds is not None  # the predicted step needs every rank's bandwidth
        spans = self.spans
        states = self.states
        header = (("rank", "device", "budget") + tuple(s.title for s in spans) + ("weights", *states, "headroom")
                  + (("step (weights / bandwidth)",) if timed else ()))
        rows = [header] + [
            (str(r.rank), r.device, format_bytes(r.budget_bytes)) + tuple(span(r.spans[s.name]) for s in spans)
            + (format_bytes(r.weight_bytes), *(format_bytes(r.state_bytes.get(n, 0)) for n in states),
               format_bytes(r.headroom_bytes))
            + ((step(r),) if timed else ())
            for r in self.ranks
        ]
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        title = [f"weights: {self.quant}"] if self.quant else []
        if self.kv_dtype == "fp8":
            title.append("KV cache: fp8 (e4m3 and a float32 scale per token and KV head)")
        return "\n".join(title + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows])


def _split(piece: Piece, weights: Sequence[int]) -> list[int]:
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
    if R == 0:  # a step reads nothing: every split is as fast, so fill by room
        return caps
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
    return [b + sum(shares[i] for shares in per_piece) for i, b in enumerate(base)]


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
    model: Splittable,
    budgets: Sequence[tuple[str, int]],
    *,
    max_context: int,
    max_batch: int,
    dtype: str = "bfloat16",
    blocks: Mapping[str, int] | None = None,
    bandwidths: Sequence[float] | None = None,
    split: str | None = None,
    kv_dtype: str = "auto",
) -> ShardPlan:
    """Split `model`'s pieces over ranks with `budgets` = (device, bytes) per rank; raise PlanError if it cannot fit.

    Every rank first pays the replicated overhead; what is left of each budget is its room. The piece with the
    largest block (for a Llama, the KV group: its query heads' q/o weights, its k/v weights and its cache share) is
    split first, then the finer pieces together, each in proportion to the rank's share. Rounding can leave a rank
    one block of each piece over its ideal share, which for the coarse piece may be more than it has; such ranks
    hand blocks to ranks with headroom (see `_relieve`), the coarse piece first, so that the finer blocks can then
    fill the space it leaves. `blocks` asks a block (in units) of pieces by name; the declaration has defaults.

    The shares follow `split`:
      memory  in proportion to each rank's room, so every device fills alike;
      speed   minimize the predicted batch-1 decode step, max over ranks of (weights read / bandwidth), subject
              to every rank's room (`_speed_shares`, exact in the continuous limit); of this and the memory split
              the one predicting the faster step after rounding to blocks is kept, so it is never slower.
    The default is speed when `bandwidths` (bytes/s per rank) are given, else memory.
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
    blocks = dict(blocks or {})
    for what, value in (("max_context", max_context), ("max_batch", max_batch), ("number of devices", len(budgets)),
                        *((f"the block of {name}", b) for name, b in blocks.items())):
        if value < 1:
            raise ValueError(f"{what} must be at least 1, got {value}")
    shape = PlanShape(max_context, max_batch, dtype, kv_dtype, blocks)
    pieces = tuple(model.pieces(shape))
    unknown = set(blocks) - {p.name for p in pieces}
    if unknown:
        raise ValueError(f"no piece named {', '.join(sorted(unknown))} to set a block of; this model splits "
                         f"{', '.join(p.name for p in pieces)}")
    names, caps = [name for name, _ in budgets], [cap for _, cap in budgets]
    overhead = model.replicated_bytes(shape)
    room = [cap - overhead for cap in caps]
    sharded = sum(p.total(p.size) for p in pieces)
    states = add_states(*([(name, p.size * n) for name, n in p.cache] for p in pieces))
    cache = sum(n for _, n in states)
    kept = ", ".join(f"{format_bytes(n)} of {name}" for name, n in states) or "no per-sequence state"
    stored = model.describe(shape) + (", fp8 KV cache" if kv_dtype == "fp8" else "")
    summary = (f"the model needs {format_bytes(sharded - cache)} of weights and {kept} "
               f"(max_context={max_context}, max_batch={max_batch}, {stored}), plus {format_bytes(overhead)} of norms "
               f"and working buffers on every device")
    if min(room) < 0 or sharded > sum(room):
        # Each device's proportional share of what would be needed, so the message blames every short device.
        usable = [max(x, 0) for x in room]
        needs = [overhead + (-(-sharded * u // sum(usable)) if sum(usable) else -(-sharded // len(caps)))
                 for u in usable]
        raise _plan_error(f"does not fit: {summary}", names, caps, needs, pieces, kv_dtype)
    base = [overhead] * len(caps)
    dealt = _deal(pieces, room, base, caps)
    if split == "speed":
        fractions = _speed_shares(room, bandwidths, pieces)
        fast = _deal(pieces, [round(f * SHARE_SCALE) for f in fractions], base, caps)
        fits = all(n <= c for n, c in zip(_usage(pieces, fast, base), caps))
        if fits and _read_seconds(pieces, fast, bandwidths) <= _read_seconds(pieces, dealt, bandwidths):
            dealt = fast
    needs = _usage(pieces, dealt, base)
    if any(need > cap for need, cap in zip(needs, caps)):
        raise _plan_error(f"does not fit in indivisible pieces, although the total would: {summary}",
                          names, caps, needs, pieces, kv_dtype)
    ranges = [p.ranges(b) for p, b in zip(pieces, dealt)]  # per piece, per rank
    return ShardPlan(
        ranks=tuple(
            RankShard(
                rank=i, device=names[i], budget_bytes=caps[i],
                spans={s.name: range(r[i].start * s.per_unit, r[i].stop * s.per_unit)
                       for p, r in zip(pieces, ranges) for s in p.spans},
                weight_bytes=sum(p.weights(len(r[i])) for p, r in zip(pieces, ranges)),
                state_bytes=dict(add_states(*([(name, len(r[i]) * n) for name, n in p.cache]
                                              for p, r in zip(pieces, ranges)))),
                overhead_bytes=overhead,
                read_bytes=sum(p.reads(len(r[i])) for p, r in zip(pieces, ranges)),
                bandwidth=bandwidths[i] if bandwidths is not None else None,
            )
            for i in range(len(caps))
        ),
        dtype=dtype, max_context=max_context, max_batch=max_batch, pieces=pieces, split=split, quant=model.quant,
        kv_dtype=kv_dtype,
    )


def _deal(pieces, shares: Sequence[int], base: Sequence[int], caps: Sequence[int]):
    """Blocks of every piece per rank in proportion to `shares`: the coarsest piece first, relieved of overflows
    alone, then the finer ones together in the room it leaves. Returned in the order of `pieces`."""
    coarse = max(range(len(pieces)), key=lambda i: pieces[i].block_bytes)
    fine = [i for i in range(len(pieces)) if i != coarse]
    first = _relieve((pieces[coarse],), (tuple(_split(pieces[coarse], shares)),), base, caps)
    rest = _relieve(tuple(pieces[i] for i in fine), tuple(tuple(_split(pieces[i], shares)) for i in fine),
                    _usage((pieces[coarse],), first, base), caps)
    dealt = dict(zip(fine, rest)) | {coarse: first[0]}
    return tuple(dealt[i] for i in range(len(pieces)))


def _plan_error(reason: str, names: Sequence[str], caps: Sequence[int], needs: Sequence[int], pieces,
                kv_dtype: str) -> PlanError:
    lines = [f"{reason}:"]
    for i, (name, cap, need) in enumerate(zip(names, caps, needs)):
        short = f" (short {format_bytes(need - cap)})" if need > cap else ""
        lines.append(f"  rank {i} {name}: needs {format_bytes(need)}, has {format_bytes(cap)}{short}")
    units = ", ".join(f"one {p.unit} {format_bytes(p.block_bytes)}" + (" (weights and cache)" if p.cache_bytes else "")
                      for p in pieces)
    fp8 = ", --kv-dtype fp8 (a KV cache of about 1 byte per element)" if kv_dtype != "fp8" else ""
    lines.append(f"Indivisible pieces: {units}. Try more devices, more memory per device, a smaller --max-context "
                 f"or --max-batch{fp8}, or a lower --dtype.")
    return PlanError("\n".join(lines))
