"""Explicit per-slot streaming state, and the per-call view of which slots advance.

The codec modules hold weights only; everything a stream remembers between calls lives in a
:class:`StreamState`: one preallocated tensor per stateful layer buffer with the slot index as its
first dimension (conv left context, mel/resampler padding, ring-buffer KV caches), plus host-side
frame counters. Positions (RoPE, attention windows) and the "first call" flags are derived from
those counters, so each slot has its own timeline that starts at 0 when the slot is reset.

A :class:`StepContext` resolves the `slots` argument of one call once: all slots or a contiguous
range are addressed with slicing (views, no copies); any other subset with index tensors
(gather before, scatter after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class StateSpec:
    """Shape of one buffer for a single slot, and whether it is kept in float32."""

    shape: tuple[int, ...]
    float32: bool = False


def resolve_slots(slots: Sequence[int] | None, num_slots: int) -> slice | np.ndarray:
    """Validate `slots` and return a slice (all / contiguous ascending) or an index array."""
    if slots is None:
        return slice(0, num_slots)
    if isinstance(slots, Tensor):
        slots = slots.tolist()
    idx = np.asarray(list(slots), dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("slots must name at least one slot (use slots=None for all)")
    if idx.min() < 0 or idx.max() >= num_slots:
        raise ValueError(f"slot index out of range 0..{num_slots - 1}: {idx.tolist()}")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"duplicate slot indices: {idx.tolist()}")
    if np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


class StreamState:
    """All mutable state of one streaming encoder or decoder, for `num_slots` independent slots."""

    def __init__(
        self,
        specs: dict[str, StateSpec],
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.device = device
        self.tensors: dict[str, Tensor] = {
            name: torch.zeros(
                (num_slots, *spec.shape), device=device, dtype=torch.float32 if spec.float32 else dtype
            )
            for name, spec in specs.items()
        }
        # Frames (token steps) each slot has consumed since its reset; 0 means "fresh".
        self.frames_done = np.zeros(num_slots, dtype=np.int64)

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Give the listed slots (all if None) a fresh, empty state; other slots are untouched."""
        sel = resolve_slots(slots, self.num_slots)
        if isinstance(sel, slice):
            for t in self.tensors.values():
                t[sel].zero_()
        else:
            index = torch.as_tensor(sel, device=self.device)
            for t in self.tensors.values():
                t.index_fill_(0, index, 0)
        self.frames_done[sel] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class StepContext:
    """One streaming call: the active slots, their positions, and state read/write helpers."""

    def __init__(self, state: StreamState, slots: Sequence[int] | None):
        self.state = state
        sel = resolve_slots(slots, state.num_slots)
        self.frames_before = state.frames_done[sel].copy()  # host copy, one entry per active slot
        self.n = int(self.frames_before.shape[0])
        device = state.device
        if isinstance(sel, slice):
            self._slice: slice | None = sel
            self._index: Tensor | None = None
            self.rows = torch.arange(sel.start, sel.stop, device=device)
        else:
            self._slice = None
            self._index = torch.as_tensor(sel, device=device)
            self.rows = self._index
        self._sel_host = sel
        fresh = self.frames_before == 0
        self.any_fresh = bool(fresh.any())
        self.fresh_mask = torch.as_tensor(fresh, device=device) if self.any_fresh else None
        self.frames_before_t = torch.as_tensor(self.frames_before, device=device)

    def tensor(self, name: str) -> Tensor:
        """The full (num_slots, ...) state tensor, for in-place scatters such as KV writes."""
        return self.state.tensors[name]

    def read(self, name: str) -> Tensor:
        """The active slots' rows of a state tensor (a view for slices, a gathered copy otherwise)."""
        t = self.state.tensors[name]
        if self._slice is not None:
            return t[self._slice]
        return t.index_select(0, self._index)

    def write(self, name: str, value: Tensor) -> None:
        """Store new values for the active slots' rows."""
        t = self.state.tensors[name]
        if self._slice is not None:
            t[self._slice].copy_(value)
        else:
            t.index_copy_(0, self._index, value.to(t.dtype))

    def replicate_first_if_fresh(self, buf: Tensor, x: Tensor) -> Tensor:
        """For fresh slots, replace a left-context buffer (n, P, C) by copies of x's first frame.

        This is how the causal layers that pad by replication (mel, resamplers, transposed convs)
        start a stream: the same left padding the whole-utterance path applies.
        """
        if not self.any_fresh:
            return buf
        first = x[:, :1].expand_as(buf)
        return torch.where(self.fresh_mask.view(-1, *([1] * (buf.dim() - 1))), first, buf)

    def advance(self, frames: int) -> None:
        self.state.frames_done[self._sel_host] += frames
