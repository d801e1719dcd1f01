"""A POSIX shared-memory segment that disappears from /dev/shm as soon as every rank has mapped it.

The leader creates `/dev/shm/raytp-<random>` (mode 0600, O_EXCL), the other ranks of the node open it,
and then it is unlinked: the mapping lives on in each process, but no name is left behind even if a rank
is killed with SIGKILL a moment later. Names are unguessable so another user cannot pre-create them.
"""

from __future__ import annotations

import mmap
import os
import secrets

SHM_DIR = "/dev/shm"
PREFIX = "raytp-"


def new_segment_name() -> str:
    return PREFIX + secrets.token_hex(12)


class SharedSegment:
    def __init__(self, name: str, size: int, create: bool):
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"bad segment name {name!r}")
        self.name, self.size = name, size
        self.path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"segment {name} has {os.fstat(fd).st_size} bytes, expected {size}")
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, name: str, size: int) -> SharedSegment:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str, size: int) -> SharedSegment:
        return cls(name, size, create=False)

    def unlink(self) -> None:
        """Remove the name; the mapping stays valid. Idempotent."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        if not self.buf.closed:
            try:
                self.buf.close()
            except BufferError:  # tensors still view it; the mapping goes when they do
                pass
