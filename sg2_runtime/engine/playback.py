"""How much of a reply the listener has actually heard.

Generation may only run a margin ahead of playback, and a barge-in cuts history to what was
heard, so the engine needs a playback position per reply. Transports that know it report it with
``playback_ack`` (authoritative once received); otherwise, in ``realtime`` mode, playback is
assumed to proceed at real time from the first emitted chunk, frozen while output is paused.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]


class PlaybackClock:
    def __init__(self, mode: str, now: Clock) -> None:
        self.mode = mode  # "ack" | "realtime" | "none"
        self._now = now
        self.emitted_ms = 0
        self.acked_ms: int | None = None
        self._started_at: float | None = None
        self._paused_at: float | None = None
        self._paused_total = 0.0

    def on_emitted(self, ms: int) -> None:
        if self._started_at is None:
            self._started_at = self._now()
        self.emitted_ms += ms

    def ack(self, ms: int) -> None:
        self.acked_ms = max(self.acked_ms or 0, min(int(ms), self.emitted_ms))

    def set_played(self, ms: int) -> None:
        """Authoritative playback position (the listener says exactly this much was heard)."""
        self.acked_ms = max(0, min(int(ms), self.emitted_ms))

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._now()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_total += self._now() - self._paused_at
            self._paused_at = None

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def played_ms(self) -> int:
        if self.acked_ms is not None or self.mode == "ack":
            return self.acked_ms or 0
        if self.mode == "none":
            return self.emitted_ms
        if self._started_at is None:
            return 0
        end = self._paused_at if self._paused_at is not None else self._now()
        elapsed = (end - self._started_at - self._paused_total) * 1000.0
        return int(max(0.0, min(elapsed, self.emitted_ms)))

    def finished(self) -> bool:
        return self.played_ms() >= self.emitted_ms
