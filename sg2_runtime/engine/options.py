"""Session and engine options: validated once at the boundary, then trusted inside the engine.

Every field has a documented default so a transport can open a session with ``SessionOptions()``.
Durations are in milliseconds because that is what transports and the Realtime protocol speak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TurnDetection(_Strict):
    """Voice-activity based turn-taking (Silero VAD on 32 ms windows at 16 kHz).

    The end-of-turn silence default (500 ms) comes from measuring pauses inside utterances of the
    reference speech clips with this VAD (see BENCHMARKS.md, "Turn detection"): shorter values
    cut speakers off mid-sentence, longer ones only add latency. Generation starts speculatively
    after ``speculative_silence_ms`` and its audio is released only once the turn is committed.
    """

    enabled: bool = True
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="speech probability that starts speech")
    release_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="probability under which speech counts as stopped (threshold-0.15)"
    )
    min_speech_ms: int = Field(64, ge=0, le=2000, description="voiced time before speech counts as started")
    silence_ms: int = Field(500, ge=64, le=10000, description="silence that ends the user's turn")
    speculative_silence_ms: int | None = Field(
        250, ge=32, le=10000, description="silence after which a reply is prepared ahead (None: off)"
    )
    prefix_padding_ms: int = Field(300, ge=0, le=2000, description="audio kept before the detected onset")
    interruption_min_speech_ms: int = Field(
        400, ge=0, le=5000, description="speech over a reply needed to cancel it (shorter: resume)"
    )
    max_turn_ms: int = Field(60000, ge=1000, le=600000, description="a longer monologue is committed anyway")

    @model_validator(mode="after")
    def _check(self) -> TurnDetection:
        if self.release_threshold is not None and self.release_threshold > self.threshold:
            raise ValueError("release_threshold must not exceed threshold")
        if self.speculative_silence_ms is not None and self.speculative_silence_ms >= self.silence_ms:
            raise ValueError("speculative_silence_ms must be shorter than silence_ms")
        return self

    @property
    def release(self) -> float:
        return (
            self.release_threshold if self.release_threshold is not None else max(0.01, self.threshold - 0.15)
        )


class Sampling(_Strict):
    """Sampling of the text head and the three speech heads (reference defaults 0.8 / 0.9)."""

    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, description="0 disables top-k (50 is what the reference generate() applies)")
    greedy: bool = False
    seed: int | None = Field(None, ge=0, description="per-session seed; None draws one at random")


class SessionOptions(_Strict):
    """Everything a caller may choose for one call."""

    greeting: int | list[list[int]] | None = Field(
        0,
        description="index into the greetings file, or [text_ids, flat_audio_tokens], or None for no greeting",
    )
    play_greeting: bool = Field(True, description="speak the greeting when the call starts")
    instructions: str | None = Field(None, max_length=4000, description="extra system/style text")
    sampling: Sampling = Field(default_factory=Sampling)
    turn_detection: TurnDetection = Field(default_factory=TurnDetection)
    max_response_ms: int = Field(30000, ge=240, le=600000, description="cap on one reply's audio")
    max_call_ms: int = Field(3600_000, ge=1000, description="the call ends after this much input audio")
    output_margin_ms: int = Field(
        480, ge=120, le=10000, description="how far generation may run ahead of playback"
    )
    flow_control: Literal["ack", "realtime", "none"] = Field(
        "realtime",
        description=(
            "how playback progress is known: 'ack' only from playback_ack(), 'realtime' assumes audio plays "
            "in real time from emission until acks arrive, 'none' generates as fast as possible"
        ),
    )
    force_speech_reply: bool = Field(True, description="start every reply with <|sosp|> (speech answers)")
    auto_reply: bool = Field(
        True,
        description=(
            "answer every user turn as soon as it ends (VAD end of turn, commit, typed turn); False: the "
            "turn only enters the history and the reply waits for Session.create_response()"
        ),
    )

    @field_validator("greeting")
    @classmethod
    def _greeting_shape(cls, v: int | list[list[int]] | None) -> int | list[list[int]] | None:
        if isinstance(v, list) and len(v) != 2:
            raise ValueError("greeting tokens must be [text_ids, flat_audio_tokens]")
        if isinstance(v, int) and v < 0:
            raise ValueError("greeting index must be >= 0")
        return v


class EngineConfig(_Strict):
    """Per-device engine settings (from configs/*.yaml)."""

    max_sessions: int = Field(8, ge=1, le=1024)
    max_positions: int = Field(4096, ge=256, description="LM context per session, in 120 ms positions")
    context_high_water: float = Field(
        0.85, gt=0.1, lt=1.0, description="history share of max_positions that triggers dropping old turns"
    )
    prefill_budget: int = Field(256, ge=8, description="LM prefill positions per scheduler tick")
    prefill_budget_while_decoding: int = Field(
        32, ge=1, description="prefill positions per tick while replies are streaming (decode has priority)"
    )
    greetings_path: Path | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    vad_threads: int = Field(1, ge=1, le=16)
    max_input_backlog_ms: int = Field(
        20000, ge=1000, description="unprocessed input audio per session before push_audio refuses more"
    )
