"""torch.distributed backends: gloo (CPU tensors, any host) and nccl (CUDA tensors, one rank per GPU).

torch allows one default process group per process. The first communicator of a process joins it (over TCP at
`init_method`, backend gloo: cheap, and never used for collectives); every communicator then runs its collectives
in its own `dist.new_group` of its backend. So a gloo group and an nccl group can live in one process, as vLLM
pairs a CPU group with a device group, and closing one never destroys a group the other still uses.

Nothing listens beyond the address the ranks meet at (loopback for a local Ray, the node's own Ray address on
several nodes): torch's TCPStore binds every interface when left to itself, so rank 0 binds the store's socket
itself and hands it over; gloo's and NCCL's own connections are pinned to the network interface that carries
that address (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), unless the operator already chose one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from urllib.parse import urlsplit

import psutil
import torch
import torch.distributed as dist

from raytp.parallel.comm.base import CommError, Communicator, labelled

# Communicators of this process that use the default group: it is destroyed with the last of them. torch keeps
# the default group per process, so its users are counted per process too.
_default_group_users = 0


def nccl_unavailable() -> str | None:
    """Why NCCL cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "NCCL needs CUDA, and this process sees no CUDA device"
    if not dist.is_nccl_available():
        return "this torch build has no NCCL"
    return None


def _store(init_method: str, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The TCPStore at init_method (tcp://HOST:PORT), rank 0 its server, listening on HOST alone."""
    url = urlsplit(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
    host, port = url.hostname, url.port
    _pin_interfaces(host, port)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    # detach: the store owns the descriptor from here (closing the Python object would close its socket)
    return dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def _pin_interfaces(host: str, port: int) -> None:
    """Have gloo and NCCL listen on the interface this process reaches `host` through (loopback for a loopback
    `host`), where the operator has not named one."""
    address = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0][4][0]  # a name such as localhost too
    ip = address if ipaddress.ip_address(address).is_loopback else _local_address_towards(address, port)
    interface = next((name for name, addresses in psutil.net_if_addrs().items()
                      if any(a.address.split("%")[0] == ip for a in addresses)), None)
    if interface is None:
        return  # an address no interface lists (a NAT'ed container): the libraries' own choice stands
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, interface)


def _local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


class TorchDistCommunicator(Communicator):
    """Rank `rank` of `world_size` in a `backend` group, the processes meeting at `init_method` (tcp://HOST:PORT)."""

    def __init__(self, backend: str, init_method: str, rank: int, world_size: int, timeout_s: float = 30.0):
        global _default_group_users
        if backend == "nccl" and (why := nccl_unavailable()):
            raise CommError(f"rank {rank}: cannot open an nccl group: {why}")
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.graph_safe = self.gather_graph_safe = backend == "nccl"
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            store = _store(init_method, rank, world_size, timeout)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()} in its "
                             f"torch.distributed group; a communicator as rank {rank} of {world_size} cannot share it")
        _default_group_users += 1
        self.group = dist.new_group(backend=backend, timeout=timeout)
        # NCCL needs CUDA tensors; gloo works on host memory, so CUDA tensors are staged through it.
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @labelled("raytp::torchdist_all_reduce")  # the wait for peers is no torch op: without it, a profile's idle time
    def all_reduce(self, t):
        if self.world_size == 1:
            return t  # a sum of one
        # gloo sums half precision poorly (and slowly): accumulate in float32 as the host-staged path does
        wire = torch.float32 if self.backend == "gloo" and t.is_floating_point() else t.dtype
        staged = t if (t.device, t.dtype) == (self._device, wire) else t.to(self._device, wire)
        try:
            dist.all_reduce(staged, group=self.group)
        except RuntimeError as e:  # gloo/nccl report dead peers and timeouts as RuntimeError
            raise CommError(f"{self.backend} all-reduce failed: {e}") from e
        if staged is not t:
            t.copy_(staged)
        return t

    @labelled("raytp::torchdist_all_gather")
    def all_gather_equal(self, t):
        staged = t.contiguous().to(self._device)
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=self._device)
        try:
            if self.backend == "nccl":
                dist.all_gather_into_tensor(out, staged, group=self.group)
            else:
                dist.all_gather(list(out.unbind(0)), staged, group=self.group)
        except RuntimeError as e:
            raise CommError(f"{self.backend} all-gather failed: {e}") from e
        return out.to(t.device)

    def close(self):
        global _default_group_users
        if self.group is None:
            return
        dist.destroy_process_group(self.group)
        self.group = None
        _default_group_users -= 1
        if _default_group_users == 0:
            dist.destroy_process_group()
