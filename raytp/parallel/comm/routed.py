"""`--comm auto` on one node of GPUs: each all-reduce goes to the backend that measured fastest at its size.

P2P wins decode-sized messages where GPUs reach each other's memory, host-staged where they do not, NCCL over
NVLink tends to win large (prefill-sized) ones. The group times every backend that can run at start-up on the
same sizes, every rank takes the slowest rank's figures, so every rank gets the same routes and a given message
takes the same backend on all ranks (identical bits).
"""

from __future__ import annotations

from raytp.parallel.comm.base import Communicator

EVERY_SIZE = 1 << 62  # the last route's bound: it takes every larger message too


def choose_routes(us: dict[str, dict[int, float]]) -> tuple[tuple[int, str], ...]:
    """((largest size in elements, backend), ...) ascending: the fastest backend at each measured size, sizes
    with the same winner merged. A message takes the first route whose bound it does not exceed (so a size between
    two measured ones takes the winner at the larger); the last route has no bound. Ties go to the backend named
    first in `us`."""
    sizes = sorted(next(iter(us.values())))
    routes: list[list] = []
    for n in sizes:
        best = min(us, key=lambda name: us[name][n])
        if routes and routes[-1][1] == best:
            routes[-1][0] = n
        else:
            routes.append([n, best])
    routes[-1][0] = EVERY_SIZE
    return tuple((n, name) for n, name in routes)


def routes_table(us: dict[str, dict[int, float]], routes) -> list[str]:
    """The table `auto` logs: one line per measured size, every backend's microseconds and the pick."""
    return [f"{n:>8} elements: " + ", ".join(f"{name} {times[n]:.1f} us" for name, times in us.items())
            + f" -> {route_of(routes, n)}" for n in sorted(next(iter(us.values())))]


def route_of(routes, n: int) -> str:
    return next(name for bound, name in routes if n <= bound)


class SizeRoutedCommunicator(Communicator):
    """Each all-reduce goes to the communicator of its size's route (`choose_routes`, with communicators in place of
    names); gathers and broadcasts (a few bytes per step: commands, sampling candidates) go to the first communicator
    that a CUDA graph can capture them on, else to the first route's."""

    def __init__(self, routes):
        self.routes = tuple(routes)
        comms = list({id(c): c for _, c in self.routes}.values())
        self.rank, self.world_size = comms[0].rank, comms[0].world_size
        assert all((c.rank, c.world_size) == (self.rank, self.world_size) for c in comms)
        self.comms = comms
        self.graph_safe = all(c.graph_safe for c in comms)
        # the sampler's small exchange goes where a graph can capture it, so the whole step stays one replay
        self.gatherer = next((c for c in comms if c.gather_graph_safe), self.routes[0][1])
        self.gather_graph_safe = self.graph_safe and self.gatherer.gather_graph_safe

    def all_reduce(self, t):
        n = t.numel()
        return next(c for bound, c in self.routes if n <= bound).all_reduce(t)

    def all_gather_equal(self, t):
        self.check()
        return self.gatherer.all_gather_equal(t)

    def check(self) -> None:
        for c in self.comms:
            c.check()

    def abort(self) -> None:
        for c in self.comms:
            c.abort()

    def close(self):
        for c in self.comms:
            c.close()
