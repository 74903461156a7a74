"""A conversation's token history: the single source of truth the LM cache follows.

History is the reference prompt format's 4-channel matrix, one column group per 120 ms position
(text id + 3 frames x 3 codec tokens). The LM cache always holds a prefix of it: the scheduler
prefills ``history[cache_len:len]`` and a rewrite of the tail (barge-in cut, speculative start
rolled back, old turns dropped) is a ``truncate`` followed by ``append`` — the cache is rolled
back to match. Turns are recorded so the oldest whole ones can be dropped near the context limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 3  # codec frames per position
CHANNELS = 4  # text + 3 codebooks


@dataclass
class TurnSpan:
    role: str  # "system" (system text + greeting), "user", "agent"
    start: int  # first position
    end: int | None = None  # one past the last position; None while open


class History:
    """Preallocated (4, 3*capacity) buffer of positions, plus turn spans."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = torch.full((CHANNELS, GROUP * capacity), -100, dtype=torch.long)
        self.length = 0
        self.turns: list[TurnSpan] = []

    def append(self, matrix: torch.Tensor) -> int:
        """Append whole positions; returns the index of the first appended position."""
        if matrix.dim() != 2 or matrix.shape[0] != CHANNELS or matrix.shape[1] % GROUP:
            raise ValueError(f"history matrix must be (4, 3*n), got {tuple(matrix.shape)}")
        n = matrix.shape[1] // GROUP
        if self.length + n > self.capacity:
            raise OverflowError(f"history full: {self.length} + {n} > {self.capacity} positions")
        start = self.length
        self._buf[:, GROUP * start : GROUP * (start + n)] = matrix
        self.length += n
        return start

    def truncate(self, length: int) -> None:
        """Keep positions [0, length); turns that start later are dropped, one spanning it reopens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate history of {self.length} positions to {length}")
        self.length = length
        self.turns = [t for t in self.turns if t.start < length]
        if self.turns and self.turns[-1].end is not None and self.turns[-1].end > length:
            self.turns[-1].end = None

    def replace(self, start: int, end: int, matrix: torch.Tensor) -> int:
        """Replace positions ``[start, end)`` with ``matrix``; what follows moves up or down, turn
        spans with it (the span holding the range grows or shrinks). Returns the shift."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot replace [{start}, {end}) in a history of {self.length} positions")
        if matrix.dim() != 2 or matrix.shape[0] != CHANNELS or matrix.shape[1] % GROUP:
            raise ValueError(f"history matrix must be (4, 3*n), got {tuple(matrix.shape)}")
        n = matrix.shape[1] // GROUP
        delta = n - (end - start)
        if self.length + delta > self.capacity:
            raise OverflowError(f"history full: {self.length} + {delta} > {self.capacity} positions")
        tail = self.matrix(end).clone()
        self._buf[:, GROUP * start : GROUP * (start + n)] = matrix
        self._buf[:, GROUP * (start + n) : GROUP * (start + n) + tail.shape[1]] = tail
        self.length += delta
        for turn in self.turns:
            if turn.start >= end and turn.start > start:
                turn.start += delta
            if turn.end is not None and turn.end >= end:
                turn.end += delta
        return delta

    def matrix(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.length if end is None else end
        return self._buf[:, GROUP * start : GROUP * end]

    def text_ids(self, start: int, end: int | None = None) -> torch.Tensor:
        """Text channel of positions [start, end) (one id per position)."""
        return self.matrix(start, end)[0, ::GROUP]

    def open_turn(self, role: str) -> None:
        self.close_turn()
        self.turns.append(TurnSpan(role, self.length))

    def close_turn(self) -> None:
        if self.turns and self.turns[-1].end is None:
            self.turns[-1].end = self.length

    def drop_oldest_turns(self, keep_from_role: str, target: int) -> int | None:
        """Remove the oldest whole user/agent turns after the system turn until ``length <= target``.

        Returns the first position that changed (the cache must be rolled back there), or None if
        nothing could be dropped. The open (last) turn is never dropped.
        """
        if not self.turns or self.turns[0].role != keep_from_role:
            return None
        keep_end = self.turns[0].end or 0
        closed = [t for t in self.turns[1:] if t.end is not None]
        drop_until = keep_end
        removed = 0
        for turn in closed:
            if self.length - removed <= target:
                break
            removed = turn.end - keep_end  # type: ignore[operator]
            drop_until = turn.end  # type: ignore[assignment]
        # keep dialogue pairs aligned: never start the kept history with an agent turn
        remaining = [t for t in self.turns[1:] if t.start >= drop_until]
        while remaining and remaining[0].role == "agent" and remaining[0].end is not None:
            drop_until = remaining[0].end
            remaining = remaining[1:]
        if drop_until == keep_end:
            return None
        tail = self.matrix(drop_until).clone()
        shift = drop_until - keep_end
        self.length = keep_end
        self.append(tail)
        self.turns = [self.turns[0]] + [
            TurnSpan(t.role, t.start - shift, None if t.end is None else t.end - shift) for t in remaining
        ]
        return keep_end
