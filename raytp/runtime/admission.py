"""Which waiting requests the leader admits to the cache slots that are free: what fits, in arrival order, without
letting a large request starve.

A request for n samples needs n free slots at once. Admitted strictly first-in-first-out, one that does not fit
yet (n = max_batch while anything runs) would hold up every request behind it, however small. So a request that
does not fit is passed over, and later ones that fit go ahead of it; but only `overtakes_max` times: after that
nothing more is admitted ahead of it, the slots that free up are kept, and it runs as soon as they are enough.
Counting overtakes rather than seconds makes the bound the same on every machine: a large request waits for at
most `overtakes_max` smaller ones that came after it (and for those before it), never for an endless stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from raytp.runtime.sampling import SamplingParams


class Waiting(Protocol):
    """What admission reads of a request (a raytp.runtime.engine.Request): its id, and the n slots it needs."""

    id: str
    params: SamplingParams


@dataclass(eq=False)
class _Entry:
    request: Waiting
    overtaken: int = 0  # later requests admitted while this one waited


class AdmissionQueue:
    def __init__(self, overtakes_max: int):
        self.overtakes_max = overtakes_max
        self._waiting: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Waiting]:
        return (e.request for e in self._waiting)

    def push(self, request: Waiting) -> None:
        self._waiting.append(_Entry(request))

    def remove(self, request_id: str) -> bool:
        """Drop a waiting request (cancelled); whether it was waiting."""
        kept = [e for e in self._waiting if e.request.id != request_id]
        removed = len(kept) < len(self._waiting)
        self._waiting = kept
        return removed

    def can_admit(self, free: int) -> bool:
        """Whether `admit(free)` would admit anything."""
        return bool(self._chosen(free))

    def admit(self, free: int) -> list[Waiting]:
        """Take the requests that go in now, with `free` slots, in the order they came."""
        chosen = self._chosen(free)
        for i, entry in enumerate(self._waiting):
            if entry not in chosen:
                entry.overtaken += sum(1 for later in self._waiting[i + 1 :] if later in chosen)
        self._waiting = [e for e in self._waiting if e not in chosen]
        return [e.request for e in chosen]

    def _chosen(self, free: int) -> list[_Entry]:
        chosen = []
        for entry in self._waiting:
            n = entry.request.params.n
            if n <= free:
                chosen.append(entry)
                free -= n
            elif entry.overtaken >= self.overtakes_max:
                break  # it has been passed over enough: the slots that free up are kept for it
        return chosen
