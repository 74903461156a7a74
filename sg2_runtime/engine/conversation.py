"""One call's conversation state on the engine thread: input framing, turn-taking, barge-in,
history, and the reply being generated. No model code: the engine batches the work this object
asks for (encode a frame, run VAD on a window, prefill history, step the LM, decode a chunk) across
every live call and hands the results back.

Invariants:
- ``history`` is the truth; the LM cache holds ``history[:cache_len]`` and is rolled back (through
  ``lm_rollback``) whenever the tail it covers is rewritten.
- A reply's audio and text leave the engine only once the user's turn is committed; a
  speculative reply started during the silence is rolled back if the user goes on talking.
- A barge-in cuts the reply's turn in history to the chunks the listener heard; a transport that
  knows exactly what was heard (``truncate_reply``) can re-cut the latest reply to that, even after
  the next user turn has begun.
- With ``auto_reply`` off a committed user turn waits for ``create_response``; if another user turn
  comes first, the agent's turn in between is recorded as an empty reply (the format needs one).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import events as ev
from .audio_input import NormalisedAudio, SampleQueue
from .base import FRAME, FRAME_MS, GROUP, SessionFailure, new_id
from .history import History
from .options import SessionOptions
from .replies import Replies
from .response import CHUNK_MS, Response
from .turn_format import TurnFormat
from .turns import Signal, TurnDetector, TurnSignal
from .user_turns import UserTurn, UserTurns
from .vad import WINDOW

__all__ = ["Conversation", "SessionFailure", "UserTurn"]


class Conversation(UserTurns, Replies):
    """A call's state and its input side; turn-taking lives in :class:`UserTurns`, replies in
    :class:`Replies` (mixins over this same state, split only to keep each file readable)."""

    def __init__(
        self,
        *,
        session_id: str,
        slot: int,
        options: SessionOptions,
        fmt: TurnFormat,
        capacity: int,
        greeting: object | None,
        greeting_frames: torch.Tensor | None,
        emit: Callable[[ev.Event], None],
        lm_rollback: Callable[[int], None],
        high_water: float = 0.85,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.id = session_id
        self.slot = slot
        self.opts = options
        self.fmt = fmt
        self.emit_event = emit
        self._lm_rollback = lm_rollback
        self._now = now
        self.history = History(capacity)
        self.cache_len = 0
        self.pending_ok = False
        self.detector = TurnDetector(options.turn_detection)
        self.vad_enabled = options.turn_detection.enabled
        # input framing
        self._pcm24 = SampleQueue()
        self._pcm16 = SampleQueue()
        self.frames: list[np.ndarray] = []  # codec tokens (3,) per frame, absolute index = _frame_base + i
        self._frame_base = 0
        self.frames_encoded = 0
        self.vad_windows = 0
        self.input_ms = 0.0
        # turn-taking
        self.turn: UserTurn | None = None
        self.response: Response | None = None
        self.closed = False
        self.lm_session: object | None = None  # set by the engine; for inspection only
        self.stats = {"speculations": 0, "speculation_rollbacks": 0, "speculative_hits": 0, "trims": 0}
        self.decoder_needs_reset = True
        self.steps_done = 0  # LM steps taken by this session (for latency accounting)
        self._candidate_start_frame: int | None = None  # barge-in: where the interrupting turn starts
        self._last_turn_end_frame = 0
        self._awaiting_reply = False  # a committed user turn waits for create_response (auto_reply off)
        self._last_user_turn_id: str | None = None
        self._last_reply: Response | None = None  # the latest finished reply (truncate_reply re-cuts it)
        self._non_finite_reported = False
        self._max_turn_frames = options.turn_detection.max_turn_ms // FRAME_MS
        self._max_response_positions = max(2, options.max_response_ms // CHUNK_MS)
        self._capacity = capacity
        self._high_water = high_water
        self._start(greeting, greeting_frames)

    # ------------------------------------------------------------------ setup
    def _start(self, greeting: object | None, greeting_frames: torch.Tensor | None) -> None:
        self.history.open_turn("system")
        self.history.append(self.fmt.first_turn(greeting, self.opts.instructions))
        self.history.close_turn()
        self._system_len = self.history.length
        if greeting_frames is not None and self.opts.play_greeting and len(greeting_frames) >= GROUP:
            resp = self._new_response(turn_id=None, greeting=True)
            resp.released = True
            resp.generating = False
            usable = (len(greeting_frames) // GROUP) * GROUP
            for i in range(0, usable, GROUP):
                resp.audio_positions.append(-1)
                resp.to_decode.append(greeting_frames[i : i + GROUP])
            self.response = resp
            self.emit(ev.ResponseStarted(resp.id, None, greeting=True))
            # the greeting's words, for transcripts (a multi-byte character cut at the end is dropped)
            words = self.fmt.decode_text(list(getattr(greeting, "text_ids", ()))).rstrip("\ufffd").strip()
            if words:
                resp.text_emitted = words
                self.emit(ev.TextDelta(resp.id, words))
            self.detector.agent_speaking = True

    def emit(self, event: ev.Event) -> None:
        self.emit_event(event)

    # ------------------------------------------------------------------ inputs (from the session handle)
    def push_audio(self, audio: NormalisedAudio) -> None:
        if audio.non_finite and not self._non_finite_reported:
            self._non_finite_reported = True
            self.emit(
                ev.ErrorEvent("invalid_audio", f"{audio.non_finite} non-finite samples replaced by silence")
            )
        self._pcm24.push(audio.codec)
        self.input_ms += audio.codec.size / 24.0
        if self.vad_enabled:
            self._pcm16.push(audio.vad)
        if self.input_ms >= self.opts.max_call_ms:
            raise SessionFailure(f"maximum call length of {self.opts.max_call_ms} ms reached")

    def push_text(self, text: str, respond: bool = True) -> None:
        if not text.strip():
            raise ValueError("empty text turn")
        self._stop_agent_for_new_turn(status="cancelled")
        if self.turn is not None and not self.turn.committed:
            self._discard_turn()
        self._fill_unanswered_turn()
        matrix = self.fmt.user_text_turn(text)
        self._maybe_trim_history(incoming=matrix.shape[1] // GROUP)
        turn = UserTurn(
            new_id("turn"), "text", self.frames_encoded, self.history.length, self.history.length, 0
        )
        self.history.open_turn("user")
        self.history.append(matrix)
        self.history.close_turn()
        turn.committed = True
        self.turn = None
        ms = int(self.input_ms)
        self.emit(ev.TurnCommitted(turn.id, "text", ms, ms, "text"))
        if respond:
            self._start_reply(turn.id, released=True)
        else:
            self._await_reply(turn.id)

    def create_response(self, response_id: str | None = None) -> None:
        """Start a reply now (auto_reply off, or the agent speaking first / again).

        It answers the committed user turn still waiting for one, or else continues the agent's side
        of the conversation. A reply that finished generating and is still playing is let finish
        first; one still generating is an error. Audio appended since the last commit stays buffered
        for the next turn when the client controls turns; with VAD on, a turn in progress is an error.
        """
        resp = self.response
        if resp is not None:
            if resp.generating or not resp.done_sent:
                what = "the greeting is" if resp.greeting else "a reply is"
                raise ValueError(f"{what} already in progress; cancel it first")
            self._end_reply()
        turn = self.turn
        if turn is not None and not turn.committed:
            if self.vad_enabled:
                raise ValueError(
                    "the user is speaking (a turn is in progress): commit or clear the audio first"
                )
            self._drop_open_turn()  # its frames stay buffered; poll() reopens the turn after the reply
        if self._awaiting_reply:
            self._start_reply(self._last_user_turn_id, released=True, response_id=response_id)
        else:
            self._start_reply(None, released=True, response_id=response_id, agent_prefix=True)

    def _await_reply(self, turn_id: str) -> None:
        self._awaiting_reply = True
        self._last_user_turn_id = turn_id

    def _fill_unanswered_turn(self) -> int | None:
        """Before a new user turn: close the previous one's missing reply as an empty agent turn."""
        if not self._awaiting_reply:
            return None
        self._awaiting_reply = False
        pos = self.history.length
        self.history.open_turn("agent")
        self.history.append(self.fmt.agent_close(False))
        self.history.close_turn()
        return pos

    def commit(self) -> None:
        """End the user's turn now (client-controlled turns, or a manual override of the VAD)."""
        if (
            self.turn is None
            and self.response is not None
            and self.frames_encoded > self._last_turn_end_frame
        ):
            self._cut_response(status="cancelled")
        if self.turn is None and self.frames_encoded > self._last_turn_end_frame and self.response is None:
            self._open_audio_turn(self._last_turn_end_frame, int(self._last_turn_end_frame * FRAME_MS))
        if self.turn is None:
            raise ValueError("nothing to commit: no user audio since the last turn")
        self._commit_turn(self.frames_encoded, "commit")

    def clear(self) -> None:
        """Drop the user audio buffered so far (the turn in progress, if any)."""
        if self.turn is not None and not self.turn.committed:
            self._discard_turn()
        self._last_turn_end_frame = self.frames_encoded

    def interrupt(self) -> None:
        """Cancel the reply: cut its history to what was heard."""
        if self.response is not None:
            self._cut_response(status="cancelled")
            self._promote_barge_in()

    def playback_ack(self, ms: int, response_id: str | None) -> None:
        resp = self.response
        if resp is not None and (response_id is None or response_id == resp.id):
            resp.clock.ack(ms)

    def update_options(self, new: SessionOptions, greeting: object | None) -> list[str]:
        """Apply changed options mid-call; returns the names of fields that could not change.

        Turn detection, sampling (next reply), reply caps and flow control change at once. The
        system instructions and the greeting are the head of the prompt: they can change only
        before the first user turn (the prompt is then rebuilt); later they are reported back.
        """
        refused: list[str] = []
        old = self.opts
        head_changed = new.instructions != old.instructions or new.greeting != old.greeting
        if head_changed:
            if (
                len(self.history.turns) == 1
                and self.turn is None
                and (self.response is None or self.response.greeting)
            ):
                self._truncate(0)
                self.history.turns.clear()
                self.history.open_turn("system")
                self.history.append(self.fmt.first_turn(greeting, new.instructions))
                self.history.close_turn()
            else:
                refused += [f for f in ("instructions", "greeting") if getattr(new, f) != getattr(old, f)]
                new = new.model_copy(update={"instructions": old.instructions, "greeting": old.greeting})
        if not new.auto_reply and self.turn is not None and self.turn.spec_pos is not None:
            self._on_resume(0)  # no reply may start on its own any more
        if new.turn_detection != old.turn_detection:
            self.detector.opts = new.turn_detection
            self.vad_enabled = new.turn_detection.enabled
            self._max_turn_frames = new.turn_detection.max_turn_ms // FRAME_MS
        self._max_response_positions = max(2, new.max_response_ms // CHUNK_MS)
        self.opts = new
        return refused

    # ------------------------------------------------------------------ codec encode
    def input_pending(self) -> bool:
        """Pushed audio not yet encoded (whole frames) or, with VAD on, not yet judged by it."""
        if self._pcm24.size >= FRAME:
            return True
        return self.vad_enabled and self._pcm16.size >= WINDOW and self._vad_window_encoded()

    def _vad_window_encoded(self) -> bool:
        return (self.vad_windows + 1) * WINDOW * 1000 // 16000 <= self.frames_encoded * FRAME_MS

    def next_encode_input(self, max_frames: int = 1) -> np.ndarray | None:
        """Up to ``max_frames`` whole codec frames of pushed audio, flat (None if not one yet)."""
        frames = min(max_frames, self._pcm24.size // FRAME)
        return self._pcm24.take(frames * FRAME) if frames else None

    def add_frames(self, tokens: np.ndarray) -> None:
        """(k, 3) tokens of consecutive frames, in order."""
        for frame in tokens:
            self.add_frame(frame)

    def add_frame(self, tokens: np.ndarray) -> None:
        self.frames.append(tokens)
        self.frames_encoded += 1
        if not self.vad_enabled and self.turn is None and self.response is None and not self._awaiting_reply:
            self._open_audio_turn(self._last_turn_end_frame, self._last_turn_end_frame * FRAME_MS)
        self._sync_user_groups()
        self._enforce_turn_cap()
        self._trim_frames()

    # ------------------------------------------------------------------ VAD
    def next_vad_window(self) -> np.ndarray | None:
        # never judge audio the codec has not encoded yet: turn decisions cut the codec frames
        if not self._vad_window_encoded():
            return None
        return self._pcm16.take(WINDOW)

    @property
    def vad_ms(self) -> int:
        return self.vad_windows * WINDOW * 1000 // 16000

    def on_vad(self, prob: float) -> None:
        self.vad_windows += 1
        for sig in self.detector.feed(prob, self.vad_ms):
            self._on_signal(sig)
        self._sync_user_groups()

    def _on_signal(self, sig: TurnSignal) -> None:
        handler = {
            Signal.ONSET: self._on_onset,
            Signal.SPECULATE: self._on_speculate,
            Signal.RESUME: self._on_resume,
            Signal.END_OF_TURN: self._on_end_of_turn,
            Signal.SHORT_SOUND_OVER: self._on_short_sound_over,
            Signal.INTERRUPTION: self._on_interruption,
        }[sig.kind]
        handler(sig.time_ms)

    # ------------------------------------------------------------------ history housekeeping
    def _truncate(self, length: int) -> None:
        if length < self.cache_len:
            self._lm_rollback(length)
            self.cache_len = length
        self.pending_ok = self.pending_ok and self.cache_len == length == self.history.length
        self.history.truncate(length)
        if self.cache_len < self.history.length:
            self.pending_ok = False

    def _reserve(self) -> int:
        """Positions one more exchange may need: a whole user turn and a whole reply, plus markers."""
        return min(self._max_turn_frames // GROUP + self._max_response_positions + 32, self._capacity // 2)

    def _maybe_trim_history(self, incoming: int = 0) -> None:
        """Drop the oldest whole turns (system text and greeting stay) when the next exchange might
        not fit, or when the history passed the high-water mark. The cache is rolled back to the
        first changed position and the scheduler re-prefills the rest, so the call has no gap."""
        reserve = self._reserve()
        high = int(self._capacity * self._high_water)
        if self.history.length + incoming + reserve <= self._capacity and self.history.length <= high:
            return
        target = int(min(high, self._capacity - reserve - incoming) * 0.75)
        changed = self.history.drop_oldest_turns("system", max(target, 0))
        if changed is not None:
            self.stats["trims"] += 1
        if changed is not None and changed < self.cache_len:
            self._lm_rollback(changed)
            self.cache_len = changed
            self.pending_ok = False

    def prefill_need(self) -> int:
        return self.history.length - self.cache_len

    def prefill_slice(self, n: int) -> torch.Tensor:
        return self.history.matrix(self.cache_len, self.cache_len + n)

    def on_prefilled(self, n: int) -> None:
        self.cache_len += n
        self.pending_ok = self.cache_len == self.history.length

    # ------------------------------------------------------------------ helpers
    def _frame_tensor(self, start: int, end: int) -> torch.Tensor:
        if end <= start:
            return torch.zeros((0, 3), dtype=torch.long)
        a, b = start - self._frame_base, end - self._frame_base
        if a < 0:
            raise SessionFailure(f"codec frames {start}..{end} were already discarded")
        return torch.from_numpy(np.stack(self.frames[a:b])).long()

    def _trim_frames(self) -> None:
        keep_from = self.frames_encoded - (self.opts.turn_detection.prefix_padding_ms // FRAME_MS + 50)
        if self.turn is not None:
            keep_from = min(keep_from, self.turn.start_frame)
        if self._candidate_start_frame is not None:
            keep_from = min(keep_from, self._candidate_start_frame)
        if not self.vad_enabled:
            keep_from = min(keep_from, self._last_turn_end_frame)
        drop = keep_from - self._frame_base
        if drop > 256:
            del self.frames[:drop]
            self._frame_base += drop
