"""Hierarchical collectives for ranks spread over several nodes: host-staged within a node, gloo between nodes.

    node 0: global ranks [0, 2, 3]     node 1: global ranks [1, 4]        (any grouping, any sizes)

    all-reduce  1. each node sums its ranks' partials in its own shared-memory segment, in local rank order
                   (a HostStagedCommunicator among the node's ranks)
                2. the node leaders (local rank 0 of each node) all-reduce the node sums over gloo, in their
                   own torch.distributed group of one process per node
                3. each leader copies the total back to its node: a host-staged broadcast from local rank 0
    all-gather  the same three steps: gather within the node, the leaders exchange their nodes' blocks
                (padded to the largest node), each leader scatters the result back in global rank order

Everything is accumulated in float32 (integers in their own type) and cast back to the tensor's dtype once, at
the end, as the host-staged path does. Every rank of a node holds its leader's bits because step 3 copies them;
every leader holds the same bits because gloo reduces each chunk on one rank and passes the finished chunk on.
So all ranks on all nodes hold identical results, and the sum is the same for a given node grouping. With one
node this is exactly the host-staged path (no leaders' group is made).
"""

from __future__ import annotations

import torch

from raytp.parallel.comm.base import Communicator


def node_layout(node_ids: list[str]) -> list[list[int]]:
    """Global ranks grouped by node: node_ids[r] is rank r's node. Nodes are ordered by their lowest rank, and
    each node's ranks ascend, so rank 0 leads node 0 and the layout is the same whoever computes it."""
    nodes: dict[str, list[int]] = {}
    for rank, node in enumerate(node_ids):
        nodes.setdefault(node, []).append(rank)
    return list(nodes.values())


class HierarchicalCommunicator(Communicator):
    """Rank `rank` of the group whose nodes hold `node_ranks` (see `node_layout`).

    `local` is this node's communicator (its rank is the local rank, its world the node's ranks); `leaders`
    connects the node leaders (rank = node index, world = number of nodes) and is given on leaders only, when
    there is more than one node.
    """

    def __init__(self, rank: int, node_ranks: list[list[int]], local: Communicator, leaders: Communicator | None):
        self.rank = rank
        self.node_ranks = [list(ranks) for ranks in node_ranks]
        self.world_size = sum(len(ranks) for ranks in self.node_ranks)
        assert sorted(r for ranks in self.node_ranks for r in ranks) == list(range(self.world_size)), node_ranks
        self.node = next(i for i, ranks in enumerate(self.node_ranks) if rank in ranks)
        mine = self.node_ranks[self.node]
        assert (local.rank, local.world_size) == (mine.index(rank), len(mine)), "local rank is the node position"
        self.local, self.leaders = local, leaders
        self.multi_node = len(self.node_ranks) > 1
        assert (leaders is not None) == (self.multi_node and local.rank == 0), "leaders' group on leaders only"
        if leaders is not None:
            assert (leaders.rank, leaders.world_size) == (self.node, len(self.node_ranks))
        # where each node's block lands in a global gather: flat index node * widest + local rank
        self._widest = max(len(ranks) for ranks in self.node_ranks)
        where = {r: n * self._widest + j for n, ranks in enumerate(self.node_ranks) for j, r in enumerate(ranks)}
        self._gather_index = torch.tensor([where[r] for r in range(self.world_size)])

    @property
    def segment(self):
        """This node's shared-memory segment (the group unlinks its name once the whole node has mapped it)."""
        return self.local.segment

    def _to_node(self, t: torch.Tensor) -> torch.Tensor:
        """Leader's `t` to every rank of the node (in place)."""
        if self.local.world_size > 1:
            self.local.broadcast(t, src=0)
        return t

    def all_reduce(self, t):
        acc = torch.float32 if t.is_floating_point() else t.dtype
        wire = t.detach().reshape(-1).to("cpu", acc, copy=True)
        self.local.all_reduce(wire)  # the node's sum, in local rank order, exact in float32 accumulation
        if self.multi_node:
            if self.leaders is not None:
                self.leaders.all_reduce(wire)
            self._to_node(wire)
        t.copy_(wire.view(t.shape))
        return t

    def all_gather_equal(self, t):
        flat = t.detach().reshape(-1).to("cpu").contiguous()
        node_block = self.local.all_gather_equal(flat)  # (local ranks, n)
        if not self.multi_node:
            return node_block.view(self.world_size, *t.shape).to(t.device)
        out = flat.new_empty((self.world_size, flat.numel()))
        if self.leaders is not None:
            padded = flat.new_zeros((self._widest, flat.numel()))
            padded[: node_block.shape[0]] = node_block
            every = self.leaders.all_gather_equal(padded)  # (nodes, widest, n)
            out.copy_(every.view(-1, flat.numel())[self._gather_index])
        self._to_node(out)
        return out.view(self.world_size, *t.shape).to(t.device)

    def abort(self) -> None:
        self.local.abort()  # the node's peers fail at once; other nodes' leaders fail at their gloo timeout

    def close(self):
        self.local.close()
        if self.leaders is not None:
            self.leaders.close()

