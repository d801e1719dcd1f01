"""The small interface every backend implements, and the uneven all-gather built on it."""

from __future__ import annotations

import functools
import hashlib

import torch


class CommError(RuntimeError):
    """A collective could not complete: a peer died, timed out or aborted the group."""


def labelled(name: str):
    """Mark a collective of host code as `name` in a torch.profiler trace, so a profile of a CPU rank counts its
    copies, sums and waits as all-reduce time (raytp.bench.profile); free while no profiler runs."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args):
            if not torch.autograd._profiler_enabled():
                return fn(*args)
            with torch.profiler.record_function(name):
                return fn(*args)
        return call
    return wrap


class Communicator:
    """Sum all-reduce, all-gather and broadcast among `world_size` ranks.

    Every rank calls every collective in the same order. Results are bit-identical on all ranks: a
    backend must reduce in one fixed order (or broadcast one rank's result), never in per-rank order.
    """

    rank: int
    world_size: int
    graph_safe = False  # collectives are device kernels on the current stream, so CUDA graphs may capture them
    gather_graph_safe = False  # all_gather_equal too (the sampler's exchange then joins the captured step)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place; returns `t`."""
        raise NotImplementedError

    def all_gather_equal(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's `t` (same shape on all ranks) into (world_size, *t.shape)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise CommError if an all-reduce kernel of this rank gave up waiting for a peer. Kernels cannot raise, so
        backends whose all-reduces are kernels check an error word here; called once per step, outside any graph.
        Nothing to check for the others: their collectives raise themselves."""

    def abort(self) -> None:
        """Make every peer's pending or next collective fail now with CommError (this rank failed).

        Called from any thread. A backend without a way to reach its peers does nothing: they fail at their
        collective timeout instead."""

    def close(self) -> None:
        """Release resources; idempotent."""

    # Built on the two primitives above, shared by every backend.

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose first dimension may differ per rank (e.g. uneven vocab shards)."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = self.all_gather_equal(n).view(-1).tolist()
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        stacked = self.all_gather_equal(padded)
        return [stacked[r, : sizes[r]] for r in range(self.world_size)]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank `src`'s `t` into every rank's `t` (same shape and dtype on all ranks)."""
        t.copy_(self.all_gather_equal(t)[src])
        return t

    def barrier(self) -> None:
        self.all_gather_equal(torch.zeros(1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IdentityCheckingCommunicator(Communicator):
    """Debug wrapper: after every all-reduce, checks that all ranks hold bit-identical results.

    Enabled with RuntimeOptions.check_identical (`--check-identical`). Each rank hashes its result and the
    hashes are gathered; one differing byte anywhere raises. Costs an extra collective per all-reduce, so it is
    for tests only.
    """

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.checked = 0

    def all_reduce(self, t):
        self.inner.all_reduce(t)
        digest = hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()
        mine = torch.frombuffer(bytearray(digest[:8]), dtype=torch.int64)
        hashes = self.inner.all_gather_equal(mine.to(t.device)).view(-1).tolist()
        if len(set(hashes)) != 1:
            raise CommError(f"all-reduce #{self.checked}: ranks hold different results (hashes {hashes})")
        self.checked += 1
        return t

    def all_gather_equal(self, t):
        return self.inner.all_gather_equal(t)

    def check(self):
        self.inner.check()

    def abort(self):
        self.inner.abort()

    def close(self):
        self.inner.close()
