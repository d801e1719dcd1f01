"""Host-staged all-reduce: partial sums meet in one shared-memory segment per node.

Layout of the segment (all offsets 64-byte aligned so flags never share a cache line):

    [abort word][flag of rank 0]...[flag of rank W-1][bank 0: slot 0 .. slot W-1][bank 1: slot 0 .. slot W-1]

Protocol for the collective with sequence number `seq` (every rank counts collectives identically):
  1. write my partial into my slot of bank `seq % 2`;
  2. publish `flag[me] = seq` (x86 stores are seen in program order, so the data is visible first);
  3. wait until every flag >= seq;
  4. read all slots of the bank and sum them in rank order 0..W-1, accumulating in float32, so every
     rank computes the same bits.
Two banks are enough: a rank writes bank `seq % 2` again only at `seq + 2`, after it has seen every flag
reach `seq + 1`, which each rank raises only after it finished reading bank `seq % 2`.

This is the CPU-driven path (cpu ranks, and cuda ranks through a host copy). A rank that stops arriving
turns into a CommError after `timeout_s`; a rank that fails raises the abort word so its peers fail at once.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from raytp.parallel.comm.base import CommError, Communicator, labelled
from raytp.parallel.comm.shm import SharedSegment

LINE = 64  # bytes per flag: one cache line each
DEFAULT_SLOT_BYTES = 1 << 20  # larger messages go in chunks
SPIN_CHECKS = 64  # flag checks before a waiting rank gives its core away (see _wait_all)
YIELD_S = 0.002  # then yields for this long before it starts sleeping
MAX_NAP_S = 0.01  # the longest sleep between checks: an idle rank's wake-up rate and a late peer's extra delay


def segment_bytes(world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> int:
    return LINE * (1 + world_size) + 2 * world_size * slot_bytes


class HostStagedCommunicator(Communicator):
    def __init__(self, segment: SharedSegment, rank: int, world_size: int, *,
                 slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 30.0):
        assert segment.size == segment_bytes(world_size, slot_bytes)
        self.segment, self.rank, self.world_size = segment, rank, world_size
        self.slot_bytes, self.timeout_s = slot_bytes, timeout_s
        header = np.ndarray((1 + world_size,), dtype=np.int64, buffer=segment.buf, strides=(LINE,))
        self._abort, self._flags = header[0:1], header[1:]
        data = torch.frombuffer(segment.buf, dtype=torch.uint8, offset=LINE * (1 + world_size))
        # slots[bank][rank] is a byte view of slot_bytes
        self._slots = data.view(2, world_size, slot_bytes)
        self._seq = 0

    def _wait_all(self, seq: int) -> None:
        """Until every rank published `seq`: spin briefly, then yield the core, then sleep.

        Spinning catches a peer microseconds behind (the busy path: ranks in lock-step). Yielding for up to
        YIELD_S hands the core to a peer that still computes when ranks outnumber cores (12 ranks on 2 cores).
        Past that the wait is long (an idle server between requests, a much slower peer): sleep, each nap an
        eighth of the time waited so far, so a late peer is noticed at most ~12% late, capped at MAX_NAP_S so
        an idle rank wakes about 100 times a second (~1% of a loaded 2-core machine's core) and a request that
        reaches an idle server starts at most 10 ms late."""
        spins = 0
        started = None
        while (self._flags < seq).any():
            if self._abort[0]:
                raise CommError("a peer aborted the host-staged group")
            spins += 1
            if spins < SPIN_CHECKS:
                continue
            now = time.monotonic()
            if started is None:
                started = now
            waited = now - started
            if waited > self.timeout_s:
                late = [r for r in range(self.world_size) if self._flags[r] < seq]
                self._abort[0] = 1
                raise CommError(f"host-staged collective #{seq}: ranks {late} did not arrive within "
                                f"{self.timeout_s:.0f} s (dead or stuck)")
            if waited < YIELD_S:
                os.sched_yield()
            else:
                time.sleep(min(MAX_NAP_S, waited / 8))

    def _exchange(self, chunk: torch.Tensor) -> torch.Tensor:
        """Publish `chunk` (flat, at most slot_bytes) and return the bank: (world_size, nbytes) bytes."""
        self._seq += 1
        bank = self._slots[self._seq % 2]
        raw = chunk.view(torch.uint8)
        bank[self.rank, : raw.numel()].copy_(raw)
        self._flags[self.rank] = self._seq
        self._wait_all(self._seq)
        return bank[:, : raw.numel()]

    def _chunks(self, flat: torch.Tensor):
        per = self.slot_bytes // flat.element_size()
        for start in range(0, max(flat.numel(), 1), per):
            yield flat[start : start + per]

    @labelled("raytp::hoststaged_all_reduce")
    def all_reduce(self, t):
        if self.world_size == 1:
            return t  # a sum of one
        acc_dtype = torch.float32 if t.is_floating_point() else t.dtype
        wire = t.detach().reshape(-1).to("cpu", acc_dtype).contiguous()
        out = torch.empty_like(wire)
        for piece, dst in zip(self._chunks(wire), self._chunks(out)):
            bank = self._exchange(piece).view(acc_dtype)
            dst.copy_(bank[0])
            for r in range(1, self.world_size):  # fixed order: identical bits on every rank
                dst.add_(bank[r])
        t.copy_(out.view(t.shape))
        return t

    @labelled("raytp::hoststaged_all_gather")
    def all_gather_equal(self, t):
        if self.world_size == 1:  # nothing to exchange: stays on the device, so a CUDA graph can capture it
            return t.unsqueeze(0).clone()
        flat = t.detach().reshape(-1).to("cpu").contiguous()
        out = torch.empty((self.world_size, flat.numel()), dtype=flat.dtype)
        offset = 0
        for piece in self._chunks(flat):
            bank = self._exchange(piece).view(flat.dtype)
            out[:, offset : offset + piece.numel()] = bank
            offset += piece.numel()
        return out.view(self.world_size, *t.shape).to(t.device)

    def abort(self) -> None:
        self._abort[0] = 1

    def close(self):
        self.segment.close()
