"""What a layer keeps of each sequence between steps: the interface every per-layer state implements.

    KVCache      keys and values of every position up to max_context (full attention, raytp.model.kv_cache)
    WindowCache  the last `window` positions only, in a ring (sliding-window attention)
    a recurrent state (linear attention): a fixed-size state per sequence, whatever its length

A layer kind (raytp.model.kinds) allocates its layer's state from the plan and declares the same bytes to the
planner as `Piece.cache`, under the name plans show it by, so that what `tensors()` holds is what the plan counted.
A state that carries the past forward (a recurrence) starts a sequence from its own zero state at position 0: slots
are reused without being cleared.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayerState(Protocol):
    def tensors(self) -> list[torch.Tensor]:
        """Everything allocated: what the plan's kv_cache_bytes counts for this layer."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s state after `length` positions into slot `dst`: a prompt prefilled once serves several
        samples."""

    def keep(self, kept: torch.Tensor) -> None:
        """After a verify step (speculative decoding), what each row keeps: its first kept[b] + 1 positions."""
