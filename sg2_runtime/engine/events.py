"""Typed events a session emits to its transport.

Times called ``*_ms`` on the input side are positions in the caller's audio (milliseconds of audio
pushed since the session opened), so they are exact and independent of wall-clock jitter. Agent
audio is addressed per response: chunk ``index`` k covers ``[k*120, (k+1)*120)`` ms of that reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ResponseStatus = Literal["completed", "interrupted", "cancelled", "length", "error"]


@dataclass(frozen=True)
class Event:
    """Base class; ``type`` names the event for logging and JSON transports."""

    @property
    def type(self) -> str:
        return _TYPE_NAMES[type(self)]


@dataclass(frozen=True)
class SpeechStarted(Event):
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped(Event):
    audio_end_ms: int


@dataclass(frozen=True)
class TurnCommitted(Event):
    """The user's turn ended (VAD silence, commit(), push_text() or length cap) and is in history."""

    turn_id: str
    kind: Literal["audio", "text"]
    audio_start_ms: int
    audio_end_ms: int
    reason: Literal["vad", "commit", "text", "max_turn"]


@dataclass(frozen=True)
class TurnDiscarded(Event):
    """Audio that started a turn was dropped (``clear()`` or too short to keep)."""

    turn_id: str


@dataclass(frozen=True)
class ResponseStarted(Event):
    """A reply is released to the listener. ``context_positions``: LM positions of history it answers
    (0 for the greeting, which is part of the prompt head)."""

    response_id: str
    turn_id: str | None
    greeting: bool = False
    context_positions: int = 0


@dataclass(frozen=True)
class TextDelta(Event):
    response_id: str
    text: str


@dataclass(frozen=True)
class AudioChunk(Event):
    """120 ms (or less at the end) of 24 kHz mono float32 agent audio."""

    response_id: str
    index: int
    start_ms: int
    pcm: np.ndarray = field(repr=False)
    sample_rate: int = 24000

    @property
    def duration_ms(self) -> int:
        return len(self.pcm) * 1000 // self.sample_rate


@dataclass(frozen=True)
class OutputPaused(Event):
    """The user started talking over the reply: stop playing queued audio now, keep it queued."""

    response_id: str


@dataclass(frozen=True)
class OutputResumed(Event):
    """It was only a short sound: resume playing the queued audio where it stopped."""

    response_id: str


@dataclass(frozen=True)
class ResponseDone(Event):
    """Generation ended. On ``interrupted``/``cancelled`` the transport drops unplayed audio."""

    response_id: str
    status: ResponseStatus
    generated_ms: int
    played_ms: int
    text: str
    error: str | None = None
    realtime_factor: float | None = (
        None  # generation wall time / audio generated (< 1: faster than real time)
    )
    generated_positions: int = 0  # LM positions generated (speech and text-only ones)


@dataclass(frozen=True)
class HistoryTruncated(Event):
    """A reply's turn in history was cut to what was heard: a barge-in during the tail of a reply
    already fully generated, or ``Session.truncate_reply`` (then always, after any ResponseDone)."""

    response_id: str
    played_ms: int


@dataclass(frozen=True)
class Metrics(Event):
    """Per-reply latency figures, emitted when a reply's first audio leaves the engine."""

    response_id: str
    endpointing_ms: float | None
    prefill_ms: float
    first_step_ms: float
    commit_to_first_audio_ms: float
    speculative_hit: bool
    steps_after_commit: int


@dataclass(frozen=True)
class ErrorEvent(Event):
    """``ref``: the id the caller gave the command that failed (``create_response``'s
    ``response_id``, ``truncate_reply``'s ``response_id``), so transports can answer the request."""

    code: str
    message: str
    fatal: bool = False
    ref: str | None = None


@dataclass(frozen=True)
class SessionClosed(Event):
    reason: str


_TYPE_NAMES: dict[type, str] = {
    SpeechStarted: "speech_started",
    SpeechStopped: "speech_stopped",
    TurnCommitted: "turn_committed",
    TurnDiscarded: "turn_discarded",
    ResponseStarted: "response_started",
    TextDelta: "text_delta",
    AudioChunk: "audio_chunk",
    OutputPaused: "output_paused",
    OutputResumed: "output_resumed",
    ResponseDone: "response_done",
    HistoryTruncated: "history_truncated",
    Metrics: "metrics",
    ErrorEvent: "error",
    SessionClosed: "session_closed",
}
