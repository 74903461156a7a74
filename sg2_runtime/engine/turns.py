"""Voice-activity timeline -> turn-taking signals. Pure logic: no audio, no models, no clocks.

The detector sees one speech probability per 32 ms VAD window, stamped with the window's end in
milliseconds of the caller's audio, and answers with what happened: speech started (onset),
the silence got long enough to prepare a reply (speculate), speech resumed (resume), the turn
ended (end_of_turn). Every decision is a function of the audio alone, so a call replayed faster
than real time makes the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .options import TurnDetection
from .vad import WINDOW_MS


class Signal(Enum):
    ONSET = "onset"  # speech started at .time_ms (the first voiced window's start)
    SPECULATE = "speculate"  # silence since .time_ms reached speculative_silence_ms
    RESUME = "resume"  # voice came back after SPECULATE (or after a short pause)
    END_OF_TURN = "end_of_turn"  # silence since .time_ms reached silence_ms
    SHORT_SOUND_OVER = "short_sound_over"  # a sound shorter than the interruption minimum ended
    INTERRUPTION = "interruption"  # voiced long enough over a reply to cancel it


@dataclass(frozen=True)
class TurnSignal:
    kind: Signal
    time_ms: int


class TurnDetector:
    """Hysteresis state machine over VAD windows.

    ``speaking`` flips on after ``min_speech_ms`` of windows at or above ``threshold`` and off
    after ``silence_ms`` of windows under ``release``. While the agent is replying the caller sets
    ``agent_speaking``; an onset then starts the barge-in check: enough voiced audio means
    INTERRUPTION, a short sound followed by a brief silence means SHORT_SOUND_OVER.
    """

    SHORT_SOUND_SILENCE_MS = 160

    def __init__(self, options: TurnDetection) -> None:
        self.opts = options
        self.speaking = False
        self.agent_speaking = False
        self._voiced_run_ms = 0
        self._voiced_run_start = 0
        self._silence_ms = 0
        self._silence_start = 0
        self._speculated = False
        self._barge_in_voiced_ms: int | None = None

    def reset(self) -> None:
        self.__init__(self.opts)  # type: ignore[misc]

    @property
    def in_barge_in(self) -> bool:
        return self._barge_in_voiced_ms is not None

    def end_barge_in(self) -> None:
        """The reply was stopped from outside: speech in progress is an ordinary user turn now."""
        self._barge_in_voiced_ms = None

    def silence_start_ms(self) -> int | None:
        """Start of the silence in progress inside a speech turn, or None while voiced."""
        return self._silence_start if self.speaking and self._silence_ms > 0 else None

    def feed(self, prob: float, end_ms: int) -> list[TurnSignal]:
        start_ms = end_ms - WINDOW_MS
        if not self.speaking:
            return self._feed_silent(prob, start_ms)
        return self._feed_speaking(prob, start_ms, end_ms)

    def _feed_silent(self, prob: float, start_ms: int) -> list[TurnSignal]:
        if prob < self.opts.threshold:
            self._voiced_run_ms = 0
            return []
        if self._voiced_run_ms == 0:
            self._voiced_run_start = start_ms
        self._voiced_run_ms += WINDOW_MS
        if self._voiced_run_ms < max(self.opts.min_speech_ms, WINDOW_MS):
            return []
        self.speaking = True
        self._silence_ms = 0
        self._speculated = False
        self._barge_in_voiced_ms = self._voiced_run_ms if self.agent_speaking else None
        out = [TurnSignal(Signal.ONSET, self._voiced_run_start)]
        out += self._check_interruption(self._voiced_run_start)
        return out

    def _feed_speaking(self, prob: float, start_ms: int, end_ms: int) -> list[TurnSignal]:
        out: list[TurnSignal] = []
        if prob >= self.opts.release:
            if self._speculated:
                out.append(TurnSignal(Signal.RESUME, start_ms))
            self._silence_ms = 0
            self._speculated = False
            if self._barge_in_voiced_ms is not None:
                self._barge_in_voiced_ms += WINDOW_MS
                out += self._check_interruption(start_ms)
            return out
        if self._silence_ms == 0:
            self._silence_start = start_ms
        self._silence_ms += WINDOW_MS
        if self._barge_in_voiced_ms is not None:
            if self._silence_ms >= self.SHORT_SOUND_SILENCE_MS:
                self._barge_in_voiced_ms = None
                self.speaking = False
                self._voiced_run_ms = 0
                out.append(TurnSignal(Signal.SHORT_SOUND_OVER, self._silence_start))
            return out
        spec = self.opts.speculative_silence_ms
        if spec is not None and not self._speculated and self._silence_ms >= spec:
            self._speculated = True
            out.append(TurnSignal(Signal.SPECULATE, self._silence_start))
        if self._silence_ms >= self.opts.silence_ms:
            self.speaking = False
            self._voiced_run_ms = 0
            self._speculated = False
            out.append(TurnSignal(Signal.END_OF_TURN, self._silence_start))
        return out

    def _check_interruption(self, time_ms: int) -> list[TurnSignal]:
        voiced = self._barge_in_voiced_ms
        if voiced is None or voiced < max(self.opts.interruption_min_speech_ms, WINDOW_MS):
            return []
        self._barge_in_voiced_ms = None  # from here on it is an ordinary user turn
        return [TurnSignal(Signal.INTERRUPTION, time_ms)]
