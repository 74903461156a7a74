"""One agent reply (or the greeting) while it is generated, held, emitted and played."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .playback import PlaybackClock

CHUNK_MS = 120  # one LM position = 3 codec frames = 120 ms


@dataclass
class Response:
    id: str
    turn_id: str | None
    clock: PlaybackClock
    greeting: bool = False
    start_pos: int = 0  # history index of the reply's first position (its <|sosp|>)
    head_len: int = 0  # positions opening the reply before generation (the forced <|sosp|>)
    span: object | None = None  # its agent TurnSpan in the history (identity checked on re-cut)
    kept_chunks: int | None = None  # audio chunks left in history after a cut (None: all)
    released: bool = False  # False while speculative: audio and text are held back
    generating: bool = True
    status: str | None = None  # final status once generation stopped
    max_positions: int = 250
    generated_positions: int = 0
    # audio bookkeeping: chunk j is the j-th position that carried speech
    audio_positions: list[int] = field(default_factory=list)  # history index of each audio chunk
    to_decode: deque[torch.Tensor] = field(default_factory=deque)  # (3 frames, 3) tokens per chunk
    decoded: int = 0
    held: deque[object] = field(default_factory=deque)  # events waiting for release
    emitted_chunks: int = 0
    text_ids: list[int] = field(default_factory=list)
    text_emitted: str = ""
    done_sent: bool = False
    decoder_reset: bool = False
    # latency bookkeeping (perf_counter seconds)
    commit_time: float | None = None
    commit_step: int | None = None
    end_of_speech_ms: int | None = None
    endpoint_ms: float | None = None
    prefill_started: float | None = None
    prefill_ms: float = 0.0
    first_step_ms: float | None = None
    first_step_at: float | None = None
    last_step_at: float | None = None
    speculative: bool = False
    metrics_sent: bool = False
    greeting_frames: torch.Tensor | None = None  # (F, 3) for the greeting

    @property
    def generated_ms(self) -> int:
        return len(self.audio_positions) * CHUNK_MS

    def realtime_factor(self) -> float | None:
        """Wall time spent generating per second of audio generated (excludes waiting on playback)."""
        if self.first_step_at is None or self.last_step_at is None or len(self.audio_positions) < 2:
            return None
        return (self.last_step_at - self.first_step_at) * 1000 / ((len(self.audio_positions) - 1) * CHUNK_MS)

    def within_margin(self, margin_ms: int) -> bool:
        played = self.clock.played_ms() if self.released else 0
        return self.generated_ms - played < margin_ms

    def fully_played(self) -> bool:
        return not self.generating and self.decoded == len(self.audio_positions) and self.clock.finished()
